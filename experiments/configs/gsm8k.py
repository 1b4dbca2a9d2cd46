"""GRPO on GSM8K from a local Hugging Face checkpoint (Qwen2.5 / Qwen3 / Llama 3.2 / Gemma 3).

  python -m experiments.train --config=experiments/configs/gsm8k.py:qwen2.5-0.5b \
      --config.model.hf_checkpoint=/path/to/Qwen2.5-0.5B-Instruct \
      --workdir=/tmp/gsm8k_qwen

Data: `data.path = "hf:openai/gsm8k:main"` (the default: the `datasets` library, extra
`grpo_jax[data]`), or a local copy: a directory of {train,test}.jsonl (`--config.data.path=DIR`).

Variants (`:arg`): qwen2.5-0.5b, qwen2.5-1.5b, qwen2.5-7b, qwen3-0.6b, gemma3-1b, llama3.2-1b
(chat template and sizes for that model; the checkpoint directory must hold config.json,
model.safetensors[.index.json] and tokenizer.json or tokenizer.model), and "smoke": a tiny
random model in tests. Each variant also names its preset (`model.preset`), so the config states
the model's shape without a checkpoint: `python -m tools.memory_plan --config=...:qwen2.5-7b
--config.mesh.fsdp=8 --config.mesh.data=1` plans its memory per device.

Platforms (same command on every host; see README "Launching"):
- one GPU / one host:      defaults (mesh data=-1: all local devices data-parallel).
- multi-GPU node (8 GPUs): --config.mesh.fsdp=8 --config.mesh.data=1 (shard params and Adam
                           state; use --config.mesh.tensor=2 for models > ~7B).
- TPU pod slice (v5e-32):  --config.distributed.enabled=True --config.mesh.fsdp=-1
                           --config.mesh.data=1 on every host (jax.distributed auto-detects the
                           coordinator on TPU).
Expected: DeepSeekMath-style gains need hours on accelerators; on a CPU only "smoke" is sensible.
"""

import ml_collections

from experiments.configs import arithmetic
from grpo_jax.models.config import PRESETS

_STOP = {  # end-of-turn tokens of each model's chat template
    "qwen2.5-0.5b": "<|im_end|>,<|endoftext|>", "qwen2.5-1.5b": "<|im_end|>,<|endoftext|>",
    "qwen2.5-7b": "<|im_end|>,<|endoftext|>",
    "qwen3-0.6b": "<|im_end|>,<|endoftext|>", "gemma3-1b": "<end_of_turn>",
    "llama3.2-1b": "<|eot_id|>"}


def get_config(arg: str = "qwen2.5-0.5b") -> ml_collections.ConfigDict:
  c = arithmetic.get_config("local")
  # GSM8K as records: {train,test}.jsonl, final answer after "####", calculator notes removed;
  # the prompt is the checkpoint's own chat template (tokenizer_config.json) around the question.
  c.data.update(dict(task="records", num_train=0, num_eval=500, flaw_p=0.0,
                     path="hf:openai/gsm8k:main", train_split="train", eval_split="test",
                     prompt_template="{question}", chat_template="checkpoint",
                     system_prompt=("Solve the problem step by step. End with the final answer "
                                    "as '#### <number>'.")))
  c.data.fields.cleanup = "<<[^<>]*>>"
  c.tokenizer = dict(path="", vocab_size=0)  # from the checkpoint directory
  # float32 master weights and Adam state, bfloat16 compute: at lr 1e-6 a bfloat16 weight would
  # not move (an update far below half its ulp rounds away). Scanned layers: compile time
  # independent of depth (0.5B sampler 19.5 s against 75 s unrolled on a 2-core CPU) and the 7B
  # update at micro-batch 16 within an H100 (phase peak 59 GiB per device against 91 at fsdp =
  # 8); no remat: it fits without (remat="layer": 26 GiB, recomputing each layer's forward).
  c.model = dict(preset="", hf_checkpoint="", param_dtype="float32", dtype="bfloat16",
                 scan_layers=True, remat="none", overrides={}, lora=dict(rank=0, alpha=16.0, targets="qkv,o,gate_up,down",
                                         dropout=0.0))
  c.sft.steps = 0  # instruct models need no warm start
  g = c.grpo
  g.steps, g.num_prompts, g.num_samples = 500, 16, 8
  g.max_prompt_length, g.max_completion_length = 256, 512
  g.rewards.update(dict(exact_answer=1.0, format=0.1))
  g.micro_batch_size = 16
  g.length_bucket = 64  # C = 513: at most 9 widths (compilations) of the update and passes
  g.loss.beta = 0.04
  g.optim = dict(learning_rate=1e-6, warmup_steps=10, decay_steps=500, end_lr_factor=0.1,
                 weight_decay=0.0, max_grad_norm=1.0)
  c.eval = dict(every=50, num_problems=500, batch_size=64, k=8, pass_k_problems=64,
                temperature=0.6, top_k=0, top_p=0.95, min_p=0.0, log_samples=4)
  c.checkpoint = dict(every=50, keep=3)
  if arg == "smoke":  # a tiny random checkpoint + tokenizer, paths given by the test
    c.data.num_train, c.data.num_eval = 64, 8
    c.data.chat_template = ""
    c.data.prompt_template = "Question: {question}\nAnswer:"
    c.model.dtype = "float32"
    g.steps, g.num_prompts, g.num_samples = 2, 2, 2
    g.max_prompt_length, g.max_completion_length = 96, 8
    g.micro_batch_size = 0
    c.eval.update(every=0, num_problems=4, batch_size=4, k=2, pass_k_problems=2)
    c.checkpoint.every = 0
    c.log_every = 1
  elif arg in _STOP:
    g.stop_tokens = _STOP[arg]
    # The checkpoint's config.json wins when given; the preset names the shape without one.
    c.model.preset = arg if arg in PRESETS else ""
    if arg == "qwen3-0.6b":  # no <think> block: GSM8K answers are short
      c.data.chat_template_kwargs = dict(enable_thinking=False)
    if arg == "llama3.2-1b":  # its template prints today's date unless given one: fixed, so
      c.data.chat_template_kwargs = dict(date_string="26 Jul 2024")  # prompts never drift
  else:
    raise ValueError(f"gsm8k config: unknown variant {arg!r}; known: {sorted(_STOP)} + smoke")
  return c
