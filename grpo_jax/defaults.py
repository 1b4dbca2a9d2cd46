"""Every config field and its default value: the offline default recipe (generated arithmetic).

    c = defaults.config()     # what experiments/configs/*.py start from and change

A run's config.json written by an older grpo_jax is read with these defaults for the fields it
lacks (`runs.read_config`). A new field: add it here with its default and a comment, and read it
(with its check) in `settings.from_config`.
"""

import ml_collections


def config() -> ml_collections.ConfigDict:
  """Every field, at its default: the offline arithmetic recipe."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.init_from = ""  # a workdir whose last checkpoint warm-starts the policy (skips SFT)
  # grpo.algorithm = "distill": on-policy distillation from this teacher (a Hugging Face
  # checkpoint directory; distill.py), per-token advantage log pi_teacher - log pi_student
  c.distill = dict(teacher="")
  c.log_every = 10
  c.profile_steps = ""  # "N" or "first-last": a jax.profiler trace of those GRPO steps
  c.max_nonfinite_streak = 3

  # The problems and their prompts. task "records" reads your own data instead (a jsonl / json /
  # parquet file or directory of splits, or "hf:<dataset>"): see experiments/configs/gsm8k.py
  # and README "Your own reward and data". Reward functions receive every column of a record.
  c.data = dict(task="arithmetic", seed=0, num_train=20_000, num_eval=500, flaw_p=0.6, tool_p=0.5,
                path="",
                train_split="train", eval_split="test",
                fields=dict(question="question", answer="answer", final_answer="answer",
                            marker="####", cleanup=""),
                prompt_template="Question: {question}\nAnswer:",  # over the record's columns
                chat_template="",  # "checkpoint": the HF checkpoint's own Jinja template
                system_prompt="", chat_template_kwargs={})
  c.tokenizer = dict(path="", vocab_size=256)
  # A 2-layer Llama-style model (RoPE, SwiGLU, RMSNorm, tied embeddings), ~0.36M params.
  # param_dtype: the trained (master) weights and Adam state; dtype: forward, backward, sampling.
  c.model = dict(preset="tiny_llama", hf_checkpoint="", param_dtype="float32", dtype="float32",
                 overrides=dict(hidden_size=128, intermediate_size=256, num_layers=2, num_heads=4,
                                num_kv_heads=4, head_dim=32, rope_scaling_type=None,
                                rope_theta=10_000.0, max_position_embeddings=128),
                 # scan_layers: the layers as one lax.scan over stacked weights (compile time
                 # independent of depth); remat: what a layer keeps for the backward pass,
                 # "none", "layer" (its input only) or "matmuls" (its matmul outputs).
                 scan_layers=False, remat="none",
                 # LoRA: rank 0 = full fine-tuning; targets among qkv, o, gate_up, down.
                 lora=dict(rank=0, alpha=16.0, targets="qkv,o,gate_up,down", dropout=0.0))
  # decode_layout: the sampler's weights, "replicated" over data / fsdp (no per-token gathers),
  # "training" (the update's fsdp split), or "auto" (replicated when they fit easily).
  # rollout_devices = n > 0: the samplers on their own n devices (data-parallel, weights
  # whole on each, sent device to device after every update), the mesh above on the rest
  c.mesh = dict(data=-1, fsdp=1, tensor=1, decode_layout="auto", rollout_devices=0)
  c.distributed = dict(enabled=False, coordinator_address="", num_processes=0, process_id=-1)

  c.sft = dict(steps=800, batch_size=64, micro_batch_size=0,
               optim=dict(learning_rate=2e-3, warmup_steps=30, decay_steps=800, end_lr_factor=0.1,
                          weight_decay=0.0, max_grad_norm=1.0))

  c.grpo = ml_collections.ConfigDict(dict(
      algorithm="grpo",  # or a unified-paradigm baseline: sft, rft, online_rft, distill
      supervision="outcome",  # or "process": per-step rewards -> advantages.process_advantages
      process_reward="verifier",  # step rewards: "verifier" (rule-checked steps) or "prm"
      max_steps=8, step_delimiter=".",
      stop_tokens="",  # extra single-token EOS strings, comma-separated (chat end-of-turn)
      steps=100, num_prompts=16, num_samples=8, max_prompt_length=48, max_completion_length=40,
      prompt_truncation="left", temperature=1.0, top_k=0, top_p=0.0, min_p=0.0,
      # "continuous": rows that end free their decode work (the same samples as "static", which
      # decodes every row until the longest ends); decode_slots 0 = one slot per row, the tail
      # compacted; fewer: a slot takes the next pending sample (sampling.py, slots.py). The
      # single-turn sampler's: tool-using episodes (config.tools) decode in their own loop.
      batching="continuous", decode_slots=0,
      rewards=dict(exact_answer=1.0, format=0.0, overlong=0.0),  # weight 0 = off
      # Your own rewards: name -> "module:function" or "path/to/file.py:function", called as
      # fn(prompts=, completions=, completion_ids=, completion_length=, **record columns);
      # the weight is grpo.rewards.<name> (1.0 if absent).
      reward_fns={}, reward_timeout_s=0.0, reward_errors="raise",  # or "zero": score 0, count
      advantage_scale="group", num_iterations=1,
      micro_batch_size=0, mask_truncated_completions=False,
      # length_bucket > 0: the update and log-prob passes run each micro-batch (rows of
      # similar length) at the width it needs, rounded up to a multiple of it (a few
      # compilations; the step of the padded batch up to float rounding). 0 (here: the offline
      # default keeps its metrics bit for bit): always the whole budget. gsm8k.py: 64.
      length_bucket=0,
      # k > 0: the rollout trained at step t is sampled at step t - k by that step's policy,
      # and scored on the host while the device updates (staleness.py); 0: synchronous
      max_staleness=0,
      # with k > 0, in-flight weight updates: the rollout sampled during a step's update
      # decodes its first inflight_after steps with the weights it started with, the rest with
      # the update's (the samples in progress go on under them, each token's weights tagged);
      # 0: one set of weights per rollout
      inflight_after=0,
      dynamic_sampling=False, max_resample_rounds=2, overlong_cache_length=8,
      ref_reset_every=0, ref_ema=0.0,
      loss=dict(loss_type="grpo", epsilon_low=0.2, epsilon_high=0.2, beta=0.0, kl_estimator="k3",
                importance_sampling_level="token",
                # the policy term: "clip" (PPO / GRPO), "cispo" (clipped stop-gradient IS
                # weight x log-prob), "sapo" (soft sigmoid gate; its temperatures below),
                # "clip_cov" / "kl_cov" (covariance.py: a cov_fraction of the batch's tokens,
                # those whose log-prob and advantage co-vary most, get no gradient (Clip-Cov:
                # drawn among cov_low < Cov < cov_high) or a kl_cov_coef x |log ratio| penalty)
                policy_loss="clip", sapo_tau_pos=1.0, sapo_tau_neg=1.05,
                cov_fraction=2e-4, cov_low=1.0, cov_high=5.0, kl_cov_coef=1.0,
                # entropy bonus: loss -= entropy_coef x token entropy (logged as "entropy")
                entropy_coef=0.0,
                # the sampler / trainer mismatch (corrections.py; logged as mismatch/*): "none",
                # "tis" (token weight min(rho, cap)), "mis" (sequences with rho outside
                # [low, high] dropped), "icepop" (tokens with rho outside [low, high] masked)
                correction="none", correction_cap=2.0, correction_low=0.5,
                correction_high=2.0),
      optim=dict(learning_rate=1e-4, warmup_steps=0, decay_steps=0, end_lr_factor=1.0,
                 weight_decay=0.0, max_grad_norm=1.0)))

  # Learned reward model and iterative GRPO (DeepSeekMath Algorithm 1): off by default.
  # kind "orm": its probability is a reward (weight below); "prm": step rewards for
  # grpo.supervision = "process" with grpo.process_reward = "prm". Retrained every
  # `iteration_steps` GRPO steps (0: once, before GRPO) on the policy's samples labelled by the
  # verifier, with `replay_fraction` of historical data; the reference resets to the policy.
  c.reward_model = dict(enabled=False, kind="orm", weight=1.0, iteration_steps=0,
                        bootstrap_rollouts=4, train_steps=40, batch_size=64, replay_fraction=0.1,
                        optim=dict(learning_rate=1e-3, warmup_steps=0, decay_steps=0,
                                   end_lr_factor=1.0, weight_decay=0.0, max_grad_norm=1.0))
  c.eval = dict(every=20, num_problems=500, batch_size=250, k=8, pass_k_problems=128,
                temperature=1.0, top_k=0, top_p=0.0, min_p=0.0, log_samples=4)
  c.checkpoint = dict(every=100, keep=2)
  c.wandb = dict(project="", entity="", mode="", name="")  # mode: online / offline ("" = off)
  # Tool-integrated (multi-turn) rollouts: env "" = off, "python" = the sandboxed Python tool
  # (grpo_jax/python_tool.py, Qwen2.5-Math's ```python / ```output format), or "module:factory"
  # returning your multiturn.Environment. See experiments/configs/tool_arithmetic.py.
  c.tools = dict(env="", max_turns=3, max_observation_tokens=48, slots=0, max_workers=4,
                 timeout_s=5.0, memory_mb=512, stop_strings="```output",
                 code_pattern=r"```python\n(.*?)```", observation_template="\n{output}\n```\n",
                 # Tool code never sees home, the working directory, /root, the run's
                 # workdir, nor these (comma-separated); allow_unisolated: run it even where
                 # the sandbox cannot confine it (a throwaway machine only).
                 hidden_paths="", allow_unisolated=False)
  return c
