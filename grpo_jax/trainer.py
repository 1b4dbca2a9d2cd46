"""The GRPO experiment: an optional SFT warm start, then GRPO with evaluation, checkpoints, metrics.

`train(config, workdir)` reads top to bottom in labelled blocks (big_vision style):

  config checks -> mesh -> task data -> tokenizer -> model -> jitted steps -> checkpoint/resume
  -> SFT phase -> GRPO phase (eval at step 0, every N steps and at the end)

One GRPO step (DeepSeekMath Algorithm 1, inner loop):
  P prompts -> sample G completions each -> decode -> K reward functions [K, P, G] ->
  group advantages -> reference log-probs (beta > 0) / old log-probs (mu > 1) -> mu updates.

Everything that touches the device is a pure jitted function from `sampling` and `train_step`;
this module is the thin host-side driver: data order, reward scoring on text, logging and
checkpointing. Every step's randomness is `fold_in(seed key, step)`, and the checkpoint holds
params, optimizer state, reference params, the data position and the metrics-file position, so a
killed run resumes to exactly the metrics of an uninterrupted one.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import math
import os
import time
from fractions import Fraction
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from grpo_jax import advantages as advantages_lib
from grpo_jax import checkpointing, metrics as metrics_lib, models, sampling, sharding
from grpo_jax import tokenizer as tokenizer_lib
from grpo_jax import train_step as ts
from grpo_jax.data import arithmetic, gsm8k, iterator, prompts
from grpo_jax import rewards as rewards_lib
from grpo_jax.rewards import reward_model as rm_lib


class ConfigError(ValueError):
  """A bad experiment config or input path, reported before anything compiles."""


# The unified paradigm of DeepSeekMath 5.2.1 (data source x reward x gradient coefficient), all
# starting from the same warm start and run for the same number of steps:
#   sft:        teacher solutions,                     coefficient 1
#   rft:        samples of the frozen warm-start model, coefficient 1[correct]  (offline)
#   online_rft: samples of the live policy,            coefficient 1[correct]
#   grpo:       samples of the live policy,            group-relative advantage + clipped ratio
ALGORITHMS = ("grpo", "online_rft", "rft", "sft")


# ----------------------------------------------------------------------------- rewards by name


def reward_functions(cfg: ml_collections.ConfigDict) -> tuple[list[Callable], list[float], list[str]]:
  """The configured reward functions, their weights and names (config: grpo.rewards)."""
  table = {
      "exact_answer": rewards_lib.exact_answer_reward,
      "format": rewards_lib.format_reward,
      "overlong": functools.partial(
          rewards_lib.overlong_penalty_reward, max_length=cfg.grpo.max_completion_length,
          cache_length=cfg.grpo.get("overlong_cache_length", 8)),
  }
  fns, weights, names = [], [], []
  for name, weight in cfg.grpo.rewards.items():
    if name not in table:
      raise ConfigError(f"config.grpo.rewards: unknown reward {name!r}; known: {sorted(table)} "
                        "(add a function to grpo_jax/rewards and to trainer.reward_functions)")
    if not weight:
      continue  # listed with weight 0: off (so that a flag can switch it on)
    fns.append(table[name])
    weights.append(float(weight))
    names.append(name)
  rm = cfg.get("reward_model")
  learned = bool(rm and rm.enabled and (rm.kind == "prm" or rm.weight))
  if not fns and not learned and cfg.grpo.get("supervision", "outcome") == "outcome":
    raise ConfigError("config.grpo.rewards: all weights are 0; GRPO needs at least one reward")
  return fns, weights, names


# ----------------------------------------------------------------------------- config checks


def check_config(cfg: ml_collections.ConfigDict, num_devices: int) -> None:
  """Fail fast, naming the field, on sizes that cannot work (before any compile)."""
  g = cfg.grpo
  if g.num_samples < 2:
    raise ConfigError(f"config.grpo.num_samples = {g.num_samples}: GRPO needs G >= 2 samples per "
                      "prompt (the group baseline and std)")
  for name in ("steps", "num_prompts", "max_prompt_length", "max_completion_length",
               "num_iterations"):
    if g[name] < (0 if name == "steps" else 1):
      raise ConfigError(f"config.grpo.{name} = {g[name]} must be positive")
  if cfg.sft.steps < 0:
    raise ConfigError(f"config.sft.steps = {cfg.sft.steps} must be >= 0")
  try:
    mesh_shape = sharding.mesh_shape(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor, num_devices)
  except ValueError as e:
    raise ConfigError(f"config.mesh: {e}") from None
  dp = mesh_shape[0] * mesh_shape[1]
  rows = g.num_prompts * g.num_samples
  if rows % dp:
    raise ConfigError(f"config.grpo: num_prompts * num_samples = {rows} rows is not divisible by "
                      f"the data-parallel size data * fsdp = {dp}")
  if g.num_prompts % dp:
    raise ConfigError(f"config.grpo.num_prompts = {g.num_prompts} is not divisible by the "
                      f"data-parallel size data * fsdp = {dp} (prompts are sharded over it)")
  if cfg.eval.batch_size % dp:
    raise ConfigError(f"config.eval.batch_size = {cfg.eval.batch_size} is not divisible by the "
                      f"data-parallel size {dp}")
  mbs = g.get("micro_batch_size") or rows
  if rows % mbs or (mbs % dp):
    raise ConfigError(f"config.grpo.micro_batch_size = {mbs} must divide the {rows} rows and be "
                      f"divisible by the data-parallel size {dp}")
  if cfg.sft.steps and cfg.sft.batch_size % dp:
    raise ConfigError(f"config.sft.batch_size = {cfg.sft.batch_size} is not divisible by the "
                      f"data-parallel size {dp}")
  if g.get("algorithm", "grpo") not in ALGORITHMS:
    raise ConfigError(f"config.grpo.algorithm = {g.algorithm!r}: expected one of {ALGORITHMS}")
  if g.loss.beta < 0:
    raise ConfigError(f"config.grpo.loss.beta = {g.loss.beta} must be >= 0")
  if g.get("advantage_scale", "group") not in ("group", "batch", "none"):
    raise ConfigError(f"config.grpo.advantage_scale = {g.advantage_scale!r}: expected group, "
                      "batch or none")
  if cfg.eval.every < 0 or cfg.checkpoint.every < 0:
    raise ConfigError("config.eval.every and config.checkpoint.every must be >= 0")
  if g.get("prompt_truncation", "left") not in ("left", "error"):
    raise ConfigError(f"config.grpo.prompt_truncation = {g.prompt_truncation!r}: 'left' or 'error'")


# ----------------------------------------------------------------------------- task data


@dataclasses.dataclass
class Task:
  """Records with `question`, `answer` (worked solution), `final_answer` (and task columns)."""
  train: list[dict]       # GRPO prompts
  sft: list[dict]         # warm-start targets (may hold a flawed teacher's solutions)
  eval: list[dict]        # held out
  prompt: Callable[[str], str]


def load_task(cfg: ml_collections.ConfigDict) -> Task:
  d = cfg.data
  template = d.get("chat_template")
  prompt = (functools.partial(prompts.chat_prompt, template=prompts.CHAT_TEMPLATES.get(
      template, template)) if template else prompts.plain_prompt)
  if d.task == "arithmetic":
    train, heldout = arithmetic.make_splits(d.num_train, d.num_eval, d.seed, flaw_p=d.flaw_p)
    return Task(train=train, sft=train, eval=heldout, prompt=prompt)
  if d.task == "gsm8k":
    if not d.path:
      raise ConfigError("config.data.path: the GSM8K task needs a local directory with "
                        "train.jsonl and test.jsonl (e.g. ../shared/data/gsm8k)")
    if not os.path.exists(d.path):
      raise ConfigError(f"config.data.path: {d.path} does not exist")
    try:
      train = gsm8k.load_gsm8k(d.path, "train")
      test = gsm8k.load_gsm8k(d.path, "test")
    except (ValueError, FileNotFoundError) as e:
      raise ConfigError(f"config.data.path: {e}") from None
    limit = lambda rows, n: rows[:n] if n else rows
    return Task(train=limit(train, d.num_train), sft=limit(train, d.num_train),
                eval=limit(test, d.num_eval), prompt=prompt)
  raise ConfigError(f"config.data.task = {d.task!r}: expected 'arithmetic' or 'gsm8k'")


def build_tokenizer(cfg, workdir: str, task: Task) -> tokenizer_lib.Tokenizer:
  """The configured tokenizer, or a SentencePiece model trained on the task (offline default)."""
  path = cfg.tokenizer.path or (cfg.model.get("hf_checkpoint") or "")
  if not path and cfg.get("init_from"):
    path = os.path.join(cfg.init_from, "tokenizer.model")
  if path:
    if not os.path.exists(path):
      raise ConfigError(f"config.tokenizer.path: {path} does not exist")
    try:
      return tokenizer_lib.load_tokenizer(path)
    except (ValueError, FileNotFoundError, OSError) as e:
      raise ConfigError(f"config.tokenizer.path: cannot load a tokenizer from {path}: {e}") from None
  prefix = os.path.join(workdir, "tokenizer")
  if os.path.exists(prefix + ".model"):  # resume: the same tokenizer, bit for bit
    return tokenizer_lib.SentencePieceTokenizer(prefix + ".model")
  texts = [task.prompt(r["question"]) + " " + r["answer"] for r in task.train]
  if jax.process_index() != 0:
    raise ConfigError("multi-host runs need config.tokenizer.path (train it once beforehand)")
  return tokenizer_lib.train_sentencepiece(texts, model_prefix=prefix,
                                           vocab_size=cfg.tokenizer.vocab_size)


def build_model(cfg, tokenizer) -> tuple[models.ModelConfig, Any]:
  """(model config, host params or None to init randomly)."""
  m = cfg.model
  if m.get("hf_checkpoint"):
    if not os.path.exists(m.hf_checkpoint):
      raise ConfigError(f"config.model.hf_checkpoint: {m.hf_checkpoint} does not exist")
    model_config, params = models.load_hf_checkpoint(m.hf_checkpoint, dtype=m.get("dtype",
                                                                                  "float32"))
    return model_config, params
  overrides = dict(m.get("overrides", {}) or {})
  overrides.setdefault("vocab_size", tokenizer.vocab_size)
  model_config = models.get_config(m.preset, **overrides)
  if model_config.vocab_size < tokenizer.vocab_size:
    raise ConfigError(f"config.model: vocab_size {model_config.vocab_size} < the tokenizer's "
                      f"{tokenizer.vocab_size}")
  return model_config, None


# ----------------------------------------------------------------------------- host helpers


def encode_prompts(tokenizer, task: Task, records: Sequence[dict], max_len: int, truncate: str):
  texts = [task.prompt(r["question"]) for r in records]
  try:
    out = tokenizer.encode_batch_padded(texts, max_length=max_len, truncate=truncate)
  except ValueError as e:
    raise ConfigError(f"config.grpo.max_prompt_length = {max_len}: {e}") from None
  return out.ids_NxL, out.mask_NxL, out.num_truncated


def encode_targets(tokenizer, records: Sequence[dict], max_len: int):
  """Right-padded answer tokens + EOS, [N, max_len], and their mask (rows cut at max_len)."""
  ids = np.full((len(records), max_len), tokenizer.pad_id, np.int32)
  mask = np.zeros((len(records), max_len), np.int32)
  for i, r in enumerate(records):
    seq = (tokenizer.encode(" " + r["answer"]) + [tokenizer.eos_id])[:max_len]
    ids[i, :len(seq)] = seq
    mask[i, :len(seq)] = 1
  return ids, mask


def stop_token_ids(tokenizer, stop_tokens: str) -> tuple[int, ...]:
  """Extra EOS ids from a comma-separated list of single-token strings (e.g. a chat template's
  end-of-turn "<|im_end|>"); a string that is not one token is a config error."""
  ids = []
  for text in filter(None, (t.strip() for t in stop_tokens.split(","))):
    enc = tokenizer.encode(text)
    while len(enc) > 1 and not tokenizer.decode(enc[:1]).strip():
      enc = enc[1:]  # SentencePiece's word-boundary piece before the token
    if len(enc) != 1:
      raise ConfigError(f"config.grpo.stop_tokens: {text!r} is {len(enc)} tokens for this "
                        "tokenizer, not one")
    ids.append(int(enc[0]))
  return tuple(ids)


def to_host(x) -> np.ndarray:
  """A (possibly multi-host) global array as a NumPy array on every process."""
  if getattr(x, "is_fully_addressable", True):
    return np.asarray(x)
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def answer_key(text: str):
  value = rewards_lib.parse_number(rewards_lib.extract_answer(text) or "")
  return value if value is not None else None


def floats(tree) -> dict:
  return {k: float(v) for k, v in jax.device_get(tree).items()}


# ----------------------------------------------------------------------------- the experiment


class Experiment:
  """Everything built once per run: mesh, data, tokenizer, model, jitted functions."""

  def __init__(self, cfg: ml_collections.ConfigDict, workdir: str):
    self.cfg, self.workdir = cfg, workdir
    # --- mesh
    check_config(cfg, jax.device_count())
    self.mesh = sharding.make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
    # --- data
    self.task = load_task(cfg)
    if not self.task.train or not self.task.eval:
      raise ConfigError("config.data: empty train or eval set")
    self.tokenizer = build_tokenizer(cfg, workdir, self.task)
    g = cfg.grpo
    trunc = g.get("prompt_truncation", "left")
    self.train_prompts = encode_prompts(self.tokenizer, self.task, self.task.train,
                                        g.max_prompt_length, trunc)
    self.eval_prompts = encode_prompts(self.tokenizer, self.task, self.task.eval,
                                       g.max_prompt_length, trunc)
    if cfg.sft.steps:
      self.sft_prompts = encode_prompts(self.tokenizer, self.task, self.task.sft,
                                        g.max_prompt_length, trunc)
      self.sft_targets = encode_targets(self.tokenizer, self.task.sft, g.max_completion_length + 1)
    # --- model
    self.model_config, self.host_params = build_model(cfg, self.tokenizer)
    self.reward_fns, self.reward_weights, self.reward_names = reward_functions(cfg)
    self.eos_ids = (self.tokenizer.eos_id,) + stop_token_ids(self.tokenizer,
                                                             g.get("stop_tokens", ""))
    # --- jitted steps
    self.sft_optimizer = ts.make_optimizer(ts.OptimConfig(**cfg.sft.optim))
    self.grpo_optimizer = ts.make_optimizer(ts.OptimConfig(**g.optim))
    self.loss_cfg = ts.LossConfig(temperature=g.temperature,
                                  max_completion_length=g.max_completion_length + 1, **g.loss)
    rng = jax.random.key(cfg.seed)
    params_shapes = jax.eval_shape(functools.partial(models.init_params, self.model_config), rng)
    self.state_sh = {
        "sft": ts.state_shardings(self.mesh, self.model_config, self.sft_optimizer, params_shapes),
        "grpo": ts.state_shardings(self.mesh, self.model_config, self.grpo_optimizer,
                                   params_shapes)}
    rows = g.num_prompts * g.num_samples
    n_micro = rows // (g.get("micro_batch_size") or rows)
    self.grpo_update = ts.make_update_fn(
        self.mesh, self.state_sh["grpo"], model_config=self.model_config,
        optimizer=self.grpo_optimizer, loss_cfg=self.loss_cfg, num_microbatches=n_micro)
    self.logprob_fn = ts.make_logprob_fn(self.mesh, self.state_sh["grpo"].params,
                                         model_config=self.model_config,
                                         temperature=g.temperature, num_microbatches=n_micro)
    if cfg.sft.steps:
      sft_micro = cfg.sft.batch_size // (cfg.sft.get("micro_batch_size") or cfg.sft.batch_size)
      self.sft_update = ts.make_update_fn(
          self.mesh, self.state_sh["sft"], model_config=self.model_config,
          optimizer=self.sft_optimizer, loss_cfg=ts.LossConfig(objective="sft", loss_type="dapo"),
          num_microbatches=sft_micro)
    # --- learned reward model (ORM: an extra reward row; PRM: step rewards), iterative GRPO
    rm = cfg.get("reward_model")
    self.rm_enabled = bool(rm and rm.enabled)
    self.supervision = g.get("supervision", "outcome")
    if self.rm_enabled:
      self.rm_kind = rm.kind
      self.rm_optimizer = ts.make_optimizer(ts.OptimConfig(**rm.optim))
      rm_shapes = jax.eval_shape(
          lambda r: rm_lib.init_reward_model(self.model_config, r), rng)
      self.rm_state_sh = rm_lib.rm_state_shardings(self.mesh, self.model_config,
                                                   self.rm_optimizer, rm_shapes)
      self.rm_update = rm_lib.make_rm_update_fn(self.mesh, self.rm_state_sh,
                                                model_config=self.model_config,
                                                optimizer=self.rm_optimizer, kind=rm.kind)
      self.rm_score = rm_lib.make_rm_scorer(self.mesh, self.rm_state_sh.params,
                                            model_config=self.model_config, kind=rm.kind)
      if rm.kind == "orm" and rm.weight:
        self.reward_weights = self.reward_weights + [float(rm.weight)]
        self.reward_names = self.reward_names + ["reward_model"]
    self.algorithm = g.get("algorithm", "grpo")
    if self.algorithm != "grpo":  # gradient coefficient x NLL, per-sequence mean (eq. 5)
      self.coef_update = ts.make_update_fn(
          self.mesh, self.state_sh["grpo"], model_config=self.model_config,
          optimizer=self.grpo_optimizer,
          loss_cfg=ts.LossConfig(objective="sft", loss_type="grpo", temperature=g.temperature),
          num_microbatches=n_micro)
    if self.algorithm == "sft" and not cfg.sft.steps:
      self.sft_prompts = encode_prompts(self.tokenizer, self.task, self.task.sft,
                                        g.max_prompt_length, trunc)
      self.sft_targets = encode_targets(self.tokenizer, self.task.sft, g.max_completion_length + 1)
    self.sample_train = self._sampler(g.temperature, g.get("top_k"), g.get("top_p"),
                                      g.get("min_p"), g.num_samples)
    e = cfg.eval
    self.sample_greedy = self._sampler(0.0, None, None, None, 1)
    self.sample_eval_k = self._sampler(e.temperature, e.get("top_k"), e.get("top_p"),
                                       e.get("min_p"), e.k) if e.k > 1 else None
    self.base_key = rng

  def _sampler(self, temperature, top_k, top_p, min_p, num_samples):
    settings = sampling.SamplingSettings(
        num_samples=num_samples, max_new_tokens=self.cfg.grpo.max_completion_length + 1,
        temperature=float(temperature), top_k=top_k or None, top_p=top_p or None,
        min_p=min_p or None, eos_ids=self.eos_ids, pad_id=self.tokenizer.pad_id)  # 0: off
    return sampling.make_sampler(self.model_config, settings, self.mesh)

  def key(self, stream: int, step: int):
    return jax.random.fold_in(jax.random.fold_in(self.base_key, stream), step)

  # --------------------------------------------------------------------------- state

  def init_state(self, phase: str, params=None) -> ts.TrainState:
    optimizer = self.sft_optimizer if phase == "sft" else self.grpo_optimizer
    sh = self.state_sh[phase]
    if params is None and self.host_params is None:
      init = lambda r: ts.init_train_state(models.init_params(self.model_config, r), optimizer)
      return jax.jit(init, out_shardings=sh)(self.key(0, 0))
    if params is None:
      params = jax.device_put(self.host_params, sh.params)
    return jax.jit(functools.partial(ts.init_train_state, optimizer=optimizer),
                   out_shardings=sh)(params)

  # --------------------------------------------------------------------------- evaluation

  def evaluate(self, params, step: int) -> tuple[dict, list[dict]]:
    """Greedy pass@1 on the held-out set; pass@k and maj@k from k samples on a subset."""
    e, ids, mask, _ = self.cfg.eval, *self.eval_prompts
    n = min(len(self.task.eval), e.num_problems or len(self.task.eval))
    bs = e.batch_size
    greedy_texts = []
    for start in range(0, n, bs):
      rows = np.arange(start, start + bs) % n  # fixed shape: the last batch wraps around
      out = self.sample_greedy(params, *self._shard(ids[rows], mask[rows]), self.key(2, step))
      texts = self.tokenizer.decode_batch(to_host(out.tokens), to_host(out.mask))
      greedy_texts += texts[:min(bs, n - start)]
    answers = [r["final_answer"] for r in self.task.eval[:n]]
    correct = np.asarray(rewards_lib.exact_answer_reward(greedy_texts, answers)) > 0
    result = {"eval/accuracy": float(correct.mean()),
              "eval/format": float(np.mean(rewards_lib.format_reward(greedy_texts)))}
    flawed = np.asarray([bool(r.get("has_flawed_verb", False)) for r in self.task.eval[:n]])
    if flawed.any() and not flawed.all():
      result["eval/accuracy_flawed_verb"] = float(correct[flawed].mean())
      result["eval/accuracy_other"] = float(correct[~flawed].mean())
    if self.sample_eval_k is not None and e.pass_k_problems:
      m = min(n, e.pass_k_problems)
      dp = sharding.data_parallel_size(self.mesh)
      bs_k = max(dp, (bs // e.k) // dp * dp)  # prompts per batch, sharded over the data axes
      hits, votes = [], []
      for start in range(0, m, bs_k):
        rows = np.arange(start, start + bs_k) % m
        out = self.sample_eval_k(params, *self._shard(ids[rows], mask[rows]), self.key(3, step))
        texts = self.tokenizer.decode_batch(to_host(out.tokens), to_host(out.mask))
        for i in range(min(bs_k, m - start)):
          group = texts[i * e.k:(i + 1) * e.k]
          truth = answers[start + i]
          ok = rewards_lib.exact_answer_reward(group, [truth] * e.k)
          hits.append(max(ok) > 0)
          keys = [answer_key(t) for t in group]
          counted = collections.Counter(k for k in keys if k is not None)
          majority = counted.most_common(1)[0][0] if counted else None
          votes.append(majority is not None and majority == answer_key("#### " + truth))
      result[f"eval/pass_at_{e.k}"] = float(np.mean(hits))
      result[f"eval/maj_at_{e.k}"] = float(np.mean(votes))
    samples = [{"prompt": self.task.prompt(self.task.eval[i]["question"]),
                "completion": greedy_texts[i], "final_answer": answers[i],
                "correct": bool(correct[i])} for i in range(min(n, e.get("log_samples", 4)))]
    return result, samples

  def _shard(self, *arrays):
    return sharding.shard_batch(arrays, self.mesh)

  # --------------------------------------------------------------------------- GRPO rollout

  def rollout(self, params, it_state: dict, step: int, rm_params=None, stream: int = 1):
    """Sample, score and build the update batch (with DAPO dynamic sampling if configured).

    Returns (batch, iterator state, figures, samples, rm_examples): `rm_examples` are the
    completions with their verifier labels (outcome, and per step for a PRM), the reward
    model's training data in iterative GRPO (None without a reward model).
    """
    g = self.cfg.grpo
    P, G = g.num_prompts, g.num_samples
    ids_all, mask_all, _ = self.train_prompts
    kept, spare, stats = [], [], collections.Counter()
    t_sample = t_score = 0.0
    rounds = 1 + (g.get("max_resample_rounds", 0) if g.get("dynamic_sampling") else 0)
    for r in range(rounds):
      idx, it_state = iterator.next_indices(it_state, len(self.task.train), P)
      t0 = time.perf_counter()
      out = self.sample_train(params, *self._shard(ids_all[idx], mask_all[idx]),
                              jax.random.fold_in(self.key(stream, step), r))
      tokens, cmask = to_host(out.tokens), to_host(out.mask)
      truncated = to_host(out.truncated).astype(bool)
      t1 = time.perf_counter()
      texts = self.tokenizer.decode_batch(tokens, cmask)
      records = [self.task.train[i] for i in idx]
      columns = rewards_lib.expand_columns(
          {"final_answer": [r_["final_answer"] for r_ in records]}, G)
      columns["completion_length"] = cmask.sum(1).tolist()
      n_rule = len(self.reward_fns)
      scores_KxN = (rewards_lib.score(self.reward_fns, self.reward_weights[:n_rule], texts,
                                      columns) if n_rule else np.zeros((0, P * G), np.float32))
      if "reward_model" in self.reward_names:  # ORM score of the tokens the sampler produced
        rm_batch = rm_lib.RMBatch(np.repeat(ids_all[idx], G, 0), np.repeat(mask_all[idx], G, 0),
                                  tokens, cmask)
        rm_N = (to_host(self.rm_score(rm_params, self._shard(rm_batch)[0])) if rm_params
                is not None else np.zeros(P * G))  # no RM yet: bootstrap sampling only
        scores_KxN = np.concatenate([scores_KxN, rm_N[None].astype(np.float32)], 0)
      verified_N = np.asarray(rewards_lib.exact_answer_reward(texts, columns["final_answer"]),
                              np.float32)
      t_score += time.perf_counter() - t1
      t_sample += t1 - t0
      stats["rounds"] += 1
      stats["gen_tokens"] += int(cmask.sum())
      for p in range(P):
        rows = slice(p * G, (p + 1) * G)
        item = dict(ids=np.repeat(ids_all[idx[p]][None], G, 0),
                    pmask=np.repeat(mask_all[idx[p]][None], G, 0), tokens=tokens[rows],
                    cmask=cmask[rows], truncated=truncated[rows], scores=scores_KxN[:, rows],
                    texts=texts[rows], answer=records[p]["final_answer"], record=records[p],
                    verified=verified_N[rows])
        combined = np.asarray(self.reward_weights) @ item["scores"]
        has_spread = not np.all(combined == combined[0])
        if r == 0:
          stats["zero_spread"] += int(not has_spread)
        (kept if has_spread or not g.get("dynamic_sampling") else spare).append(item)
      if len(kept) >= P:
        break
    groups = (kept + spare)[:P]  # bounded: refill with zero-spread groups if rounds ran out
    scores = np.stack([gr["scores"] for gr in groups], 1)  # [K, P, G]
    cat = lambda k: np.concatenate([gr[k] for gr in groups], 0)
    steps = None
    if self.supervision == "process" or (self.rm_enabled and self.rm_kind == "prm"):
      steps = self.step_rewards(groups, rm_params, cat)
    if self.supervision == "process":
      step_end, step_mask, step_rewards, _ = steps
      S, C = step_end.shape[1], cat("tokens").shape[1]
      adv_PxG = np.asarray(advantages_lib.process_advantages(
          step_rewards.reshape(P, G, S), step_mask.reshape(P, G, S),
          step_end.reshape(P, G, S), C)).reshape(P * G, C)
    elif self.algorithm == "grpo":
      adv_PxG = advantages_lib.group_advantages(scores, scale=g.get("advantage_scale", "group"),
                                                weights=self.reward_weights)
    else:  # (online) RFT: gradient coefficient 1 on correct samples, 0 otherwise
      adv_PxG = (np.einsum("k,kpg->pg", np.asarray(self.reward_weights), scores) > 0).astype(
          np.float32)
    cmask = cat("cmask")
    truncated = cat("truncated")
    if g.get("mask_truncated_completions"):
      cmask = cmask * (~truncated[:, None])
    batch = ts.TrainBatch(prompt_tokens=cat("ids"), prompt_mask=cat("pmask"),
                          completion_tokens=cat("tokens"), completion_mask=cmask,
                          advantages=np.asarray(adv_PxG, np.float32).reshape(P * G, -1)
                          if self.supervision == "process"  # [P*G, C] per token
                          else np.asarray(adv_PxG, np.float32).reshape(P * G))
    combined = (np.einsum("k,kpg->pg", np.asarray(self.reward_weights), scores)
                if scores.shape[0] else np.zeros((P, G), np.float32))
    figures = {"reward": float(combined.mean()),
               "reward_std": float(combined.std()),
               "zero_spread_fraction": stats["zero_spread"] / P,
               "sample_rounds": stats["rounds"],
               "truncated_fraction": float(truncated.mean()),
               "sample_s": t_sample, "score_s": t_score,
               "tok_per_s": stats["gen_tokens"] / max(t_sample, 1e-9)}
    for k, name in enumerate(self.reward_names):
      figures[f"reward/{name}"] = float(scores[k].mean())
    figures["verified_accuracy"] = float(cat("verified").mean())
    samples = [{"question": groups[0]["record"]["question"], "completion": groups[0]["texts"][i],
                "final_answer": groups[0]["answer"], "reward": float(combined[0, i]),
                "advantage": float(np.asarray(batch.advantages)[i].mean())}
               for i in range(min(G, 2))]
    if steps is not None:  # per-step rewards and their token spans, for inspection
      step_end, step_mask, step_rewards, labels = steps
      for i, row in enumerate(samples):
        ends = step_end[i][step_mask[i] > 0].tolist()
        starts = [0] + [e + 1 for e in ends[:-1]]
        toks = cat("tokens")[i]
        row["steps"] = [{"span": [a, b], "text": self.tokenizer.decode(toks[a:b + 1].tolist()),
                         "reward": float(step_rewards[i, j]), "label": int(labels[i, j])}
                        for j, (a, b) in enumerate(zip(starts, ends))]
    rm_examples = None
    if self.rm_enabled:
      rm_examples = dict(prompt_tokens=cat("ids"), prompt_mask=cat("pmask"),
                         completion_tokens=cat("tokens"), completion_mask=cat("cmask"),
                         labels=cat("verified"))
      if self.rm_kind == "prm":
        rm_examples.update(step_end=steps[0], step_mask=steps[1],
                           labels=steps[3].astype(np.float32))
    if steps is not None:
      figures["step_reward"] = float((steps[2] * steps[1]).sum() / max(steps[1].sum(), 1))
    return batch, it_state, figures, samples, rm_examples

  def step_rewards(self, groups, rm_params, cat):
    """(step_end [N, S], step_mask, step rewards [N, S], verifier step labels [N, S]).

    Steps end at tokens containing `grpo.step_delimiter`; labels come from the task's step
    verifier (arithmetic: each equation right and consistent with the question); rewards are
    those labels (`grpo.process_reward = "verifier"`, an oracle PRM) or the learned PRM's
    probabilities (`"prm"`).
    """
    g = self.cfg.grpo
    S = g.get("max_steps", 8)
    tokens, cmask = cat("tokens"), cat("cmask")
    step_end, step_mask = rm_lib.batch_step_boundaries(
        tokens, cmask, self.tokenizer, max_steps=S, delimiter=g.get("step_delimiter", "."))
    texts = [t for gr in groups for t in gr["texts"]]
    records = [gr["record"] for gr in groups for _ in gr["texts"]]
    labels = np.zeros(step_end.shape, np.float32)
    for n, (text, record) in enumerate(zip(texts, records)):
      lab = rm_lib.arithmetic_step_labels(text, record) if "question" in record else []
      k = int(step_mask[n].sum())
      if len(lab) > k:  # the boundaries kept the first k - 1 steps and the last one
        lab = lab[:k - 1] + lab[-1:] if k else []
      labels[n, :len(lab)] = lab[:k]
    if g.get("process_reward", "verifier") == "prm" and rm_params is not None:
      rm_batch = rm_lib.RMBatch(cat("ids"), cat("pmask"), tokens, cmask, step_end=step_end,
                                step_mask=step_mask)
      rewards = to_host(self.rm_score(rm_params, self._shard(rm_batch)[0])).astype(np.float32)
    else:
      rewards = labels
    return step_end, step_mask, rewards * step_mask, labels

  def teacher_batch(self, it_state: dict):
    """The "sft" paradigm: P*G teacher solutions per step, gradient coefficient 1."""
    g = self.cfg.grpo
    rows = g.num_prompts * g.num_samples
    idx, it_state = iterator.next_indices(it_state, len(self.task.sft), rows)
    p_ids, p_mask, _ = self.sft_prompts
    t_ids, t_mask = self.sft_targets
    batch = ts.TrainBatch(p_ids[idx], p_mask[idx], t_ids[idx], t_mask[idx],
                          np.ones(rows, np.float32))
    return batch, it_state, {"sample_s": 0.0, "score_s": 0.0, "tok_per_s": 0.0}, [], None

  def grpo_step(self, state, ref_params, batch: ts.TrainBatch):
    """Reference / old log-prob passes and mu updates on one rollout batch."""
    g = self.cfg.grpo
    batch = self._shard(batch)[0]
    if self.algorithm != "grpo":
      state, m = self.coef_update(state, batch)
      return state, [m]
    if g.loss.beta != 0.0:
      batch = batch.replace(ref_logprobs=self.logprob_fn(ref_params, batch))
    if g.num_iterations > 1:
      batch = batch.replace(old_logprobs=self.logprob_fn(state.params, batch))
    step_metrics = []
    for _ in range(g.num_iterations):
      state, m = self.grpo_update(state, batch)
      step_metrics.append(m)
    return state, step_metrics


# ----------------------------------------------------------------------------- the driver


def _update_reference(cfg, ref_params, params, step: int):
  """Reference policy: frozen, reset to the policy every K steps, or an EMA of it."""
  g = cfg.grpo
  if g.loss.beta == 0.0:
    return ref_params
  if g.get("ref_reset_every") and step % g.ref_reset_every == 0:
    return jax.tree.map(jnp.copy, params)
  if g.get("ref_ema"):
    return _ema(ref_params, params, g.ref_ema)
  return ref_params


@jax.jit
def _ema(ref_params, params, rate):
  """ref <- (1 - rate) * ref + rate * policy, one fused program (not one dispatch per leaf)."""
  return jax.tree.map(lambda r, p: (1 - rate) * r + rate * p, ref_params, params)


# ----------------------------------------------------------------------------- iterative GRPO


_RM_FIELDS = ("prompt_tokens", "prompt_mask", "completion_tokens", "completion_mask", "labels",
              "step_end", "step_mask")


def _concat(examples: list[dict]) -> dict:
  return {k: np.concatenate([e[k] for e in examples]) for k in examples[0]} if examples else {}


def train_reward_model(exp: "Experiment", rm_state, buffer: rm_lib.ReplayBuffer, new: dict,
                       iteration: int):
  """Continue training the reward model on the new policy samples plus a replayed fraction of
  history (DeepSeekMath Algorithm 1), then add the new samples to history. Returns (state,
  figures); the figures count the rows actually used from each source."""
  rc = exp.cfg.reward_model
  mixed, source = buffer.mix(new, rc.replay_fraction, rng=exp.cfg.seed * 7919 + iteration)
  n = len(source)
  order = np.random.default_rng(exp.cfg.seed * 104729 + iteration).permutation(n)
  bs = rc.batch_size
  metrics = []
  for s in range(rc.train_steps):
    idx = order[(s * bs + np.arange(bs)) % n]
    batch = rm_lib.RMBatch(**{k: mixed[k][idx] for k in _RM_FIELDS if k in mixed})
    rm_state, m = exp.rm_update(rm_state, exp._shard(batch)[0])
    metrics.append(m)
  buffer.add(new)
  figures = {f"rm/{k}": v for k, v in floats(metrics[-1]).items()} if metrics else {}
  figures.update({"rm/iteration": iteration, "rm/new_rows": int((source < 0).sum()),
                  "rm/replayed_rows": int((source >= 0).sum()),
                  "rm/replayed_fraction": float((source >= 0).mean()) if n else 0.0,
                  "rm/history_rows": len(buffer),
                  "rm/label_mean": float(np.mean(new["labels"])) if n else 0.0})
  return rm_state, figures


def _rm_data_path(workdir: str, step: int) -> str:
  return os.path.join(workdir, "rm_data", f"{step}.npz")


def save_rm_data(workdir: str, step: int, buffer: rm_lib.ReplayBuffer, pending: list[dict]):
  """The replay history and the not-yet-trained samples, atomically (tmp file + rename)."""
  path = _rm_data_path(workdir, step)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  arrays = {f"history/{k}": v for k, v in buffer.state_dict()["columns"].items()}
  arrays.update({f"pending/{k}": v for k, v in _concat(pending).items()})
  tmp = path + ".tmp"
  with open(tmp, "wb") as f:
    np.savez(f, **arrays)
  os.replace(tmp, path)


def load_rm_data(workdir: str, step: int) -> tuple[rm_lib.ReplayBuffer, list[dict]]:
  path = _rm_data_path(workdir, step)
  if not os.path.exists(path):
    raise FileNotFoundError(f"reward-model data for checkpoint step {step} missing: {path}")
  with np.load(path) as data:
    history = {k.split("/", 1)[1]: data[k] for k in data.files if k.startswith("history/")}
    pending = {k.split("/", 1)[1]: data[k] for k in data.files if k.startswith("pending/")}
  return rm_lib.ReplayBuffer.from_state_dict({"columns": history}), [pending] if pending else []


def train(cfg: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs (or resumes) the experiment in `workdir`; returns the last eval metrics."""
  os.makedirs(workdir, exist_ok=True)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(cfg.to_json_best_effort(indent=2))
  exp = Experiment(cfg, workdir)
  logging.info("model: %s, %.2fM params; mesh %s; %d train / %d eval problems",
               exp.model_config.family,
               sum(math.prod(x.shape) for x in jax.tree.leaves(jax.eval_shape(
                   functools.partial(models.init_params, exp.model_config), exp.base_key))) / 1e6,
               dict(exp.mesh.shape), len(exp.task.train), len(exp.task.eval))
  if exp.train_prompts[2]:
    logging.warning("%d of %d training prompts were truncated on the left to %d tokens",
                    exp.train_prompts[2], len(exp.task.train), cfg.grpo.max_prompt_length)

  ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"),
                                    keep=cfg.checkpoint.keep)
  g = cfg.grpo
  sft_steps = 0 if cfg.get("init_from") else cfg.sft.steps
  # The reference slot also holds RFT's frozen sampling policy (the warm start).
  use_ref = g.loss.beta != 0.0 or exp.algorithm == "rft"

  # --- resume
  phase, phase_step, it_state, lines = ("sft" if sft_steps else "grpo"), 0, None, 0
  state = ref_params = rm_state = None
  rm_buffer, rm_pending = rm_lib.ReplayBuffer(), []  # iterative GRPO: RM history, new samples
  latest = ckpt.latest_step()
  if latest is not None:
    extra = ckpt.restore(latest)[1]
    phase, phase_step, it_state, lines = (extra["phase"], extra["phase_step"], extra["iterator"],
                                          extra["metrics_lines"])
    target = {"state": jax.eval_shape(lambda: exp.init_state(phase))}
    target["state"] = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype,
                                                                      sharding=sh),
                                   target["state"], exp.state_sh[phase])
    if phase == "grpo" and use_ref:
      target["ref_params"] = target["state"].params
    if phase == "grpo" and exp.rm_enabled and extra.get("rm_trained"):
      rm_shapes = jax.eval_shape(lambda: ts.init_train_state(
          rm_lib.init_reward_model(exp.model_config, exp.base_key), exp.rm_optimizer))
      target["rm_state"] = jax.tree.map(
          lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), rm_shapes,
          exp.rm_state_sh)
    restored, _ = ckpt.restore(latest, target)
    state, ref_params = restored["state"], restored.get("ref_params")
    rm_state = restored.get("rm_state")
    if phase == "grpo" and exp.rm_enabled:
      rm_buffer, rm_pending = load_rm_data(workdir, latest)
    logging.info("resumed from %s step %d (%s step %d)", ckpt.directory, latest, phase,
                  phase_step)
  writer = metrics_lib.MetricsWriter(workdir, enabled=jax.process_index() == 0,
                                     truncate_to=lines if latest is not None else 0)

  def save(global_step, phase_name, step_in_phase, it, st, ref, rm=None):
    tree = {"state": st}
    if ref is not None:
      tree["ref_params"] = ref
    if rm is not None:
      tree["rm_state"] = rm
    if phase_name == "grpo" and exp.rm_enabled and jax.process_index() == 0:
      save_rm_data(workdir, global_step, rm_buffer, rm_pending)  # before the checkpoint lands
    ckpt.save(global_step, tree, {"phase": phase_name, "phase_step": step_in_phase,
                                  "iterator": it, "metrics_lines": writer.num_lines,
                                  "rm_trained": rm is not None})

  # --- SFT warm start
  if phase == "sft":
    if state is None:
      state = exp.init_state("sft")
    it_state = it_state or {"epoch": 0, "index": 0, "seed": cfg.seed}
    progress = metrics_lib.Progress(sft_steps, "sft", every=cfg.log_every)
    p_ids, p_mask, _ = exp.sft_prompts
    t_ids, t_mask = exp.sft_targets
    t_last, step_last = time.perf_counter(), phase_step
    for step in range(phase_step, sft_steps):
      idx, it_state = iterator.next_indices(it_state, len(exp.task.sft), cfg.sft.batch_size)
      batch = ts.TrainBatch(p_ids[idx], p_mask[idx], t_ids[idx], t_mask[idx],
                            np.ones(len(idx), np.float32))
      state, m = exp.sft_update(state, exp._shard(batch)[0])
      if (step + 1) % cfg.log_every == 0 or step + 1 == sft_steps:
        figures = floats(m)  # waits for the queued steps: time them together
        now = time.perf_counter()
        figures["update_s"] = (now - t_last) / (step + 1 - step_last)
        t_last, step_last = now, step + 1
        writer.write(step + 1, "sft", figures)
        progress.update(step + 1, nll=figures["nll"], update_s=figures["update_s"])
      if cfg.checkpoint.every and (step + 1) % cfg.checkpoint.every == 0 and step + 1 < sft_steps:
        save(step + 1, "sft", step + 1, it_state, state, None)
    # Transition: a fresh optimizer for GRPO, the reference = the warm-started policy.
    state = exp.init_state("grpo", params=state.params)
    phase, phase_step, it_state = "grpo", 0, None
    ref_params = jax.tree.map(jnp.copy, state.params) if use_ref else None
    save(sft_steps, "grpo", 0, {"epoch": 0, "index": 0, "seed": cfg.seed + 1}, state, ref_params)

  # --- GRPO
  if state is None and cfg.get("init_from"):  # warm start from another run's checkpoint
    src = checkpointing.Checkpointer(os.path.join(cfg.init_from, "checkpoints"), read_only=True)
    params = jax.device_put(src.restore()[0]["state"]["params"], exp.state_sh["grpo"].params)
    src.close()
    state = exp.init_state("grpo", params=params)
    ref_params = jax.tree.map(jnp.copy, state.params) if use_ref else None
    logging.info("initialised from %s", cfg.init_from)
  if state is None:
    state = exp.init_state("grpo")
    ref_params = jax.tree.map(jnp.copy, state.params) if use_ref else None
  it_state = it_state or {"epoch": 0, "index": 0, "seed": cfg.seed + 1}
  progress = metrics_lib.Progress(g.steps, "grpo", every=cfg.log_every)
  nan_streak, last_eval = 0, {}
  for step in range(phase_step, g.steps + 1):
    if step == 0 or step == g.steps or (cfg.eval.every and step % cfg.eval.every == 0):
      t0 = time.perf_counter()
      last_eval, samples = exp.evaluate(state.params, step)
      last_eval["eval_s"] = time.perf_counter() - t0
      writer.write(step, "grpo", last_eval)
      if jax.process_index() == 0:
        metrics_lib.write_samples(workdir, step, samples, phase="eval")
      logging.info("eval @ grpo step %d: %s", step,
                   " ".join(f"{k}={v:.3f}" for k, v in last_eval.items()))
    if step == g.steps:
      break
    rc = cfg.get("reward_model")
    every = rc.iteration_steps if exp.rm_enabled else 0
    if exp.rm_enabled and (step == 0 or (every and step % every == 0)):
      # Outer iteration of iterative GRPO: retrain the RM on fresh policy samples (10% replay),
      # then reset the reference to the current policy.
      if step == 0:  # bootstrap data: samples of the warm-start policy
        boot_it = {"epoch": 0, "index": 0, "seed": cfg.seed + 2}
        for b in range(rc.bootstrap_rollouts):
          out = exp.rollout(state.params, boot_it, b, rm_params=None, stream=4)
          boot_it = out[1]
          rm_pending.append(out[4])
        rm_state, _ = rm_lib.init_sharded_rm_state(
            exp.mesh, exp.model_config, exp.rm_optimizer, exp.key(5, 0),
            backbone_params=state.params)
      iteration = step // every if every else 0
      rm_state, rm_figures = train_reward_model(exp, rm_state, rm_buffer, _concat(rm_pending),
                                                iteration)
      rm_pending = []
      writer.write(step, "rm", rm_figures)
      logging.info("reward model, iteration %d: %s", iteration,
                   " ".join(f"{k}={v:.3f}" for k, v in rm_figures.items()))
      if step > 0 and ref_params is not None and exp.algorithm != "rft":
        ref_params = jax.tree.map(jnp.copy, state.params)
    if exp.algorithm == "sft":
      batch, it_state, figures, samples, examples = exp.teacher_batch(it_state)
    else:
      policy = ref_params if exp.algorithm == "rft" else state.params
      rm_params = rm_state.params if rm_state is not None else None
      batch, it_state, figures, samples, examples = exp.rollout(policy, it_state, step,
                                                                rm_params=rm_params)
      if examples is not None:
        rm_pending.append(examples)
    t0 = time.perf_counter()
    state, step_metrics = exp.grpo_step(state, ref_params, batch)
    ms = [floats(m) for m in step_metrics]
    figures.update(ms[-1])
    figures["skipped"] = sum(m["skipped"] for m in ms)
    figures["update_s"] = time.perf_counter() - t0
    nan_streak = nan_streak + 1 if figures["skipped"] else 0
    if nan_streak >= cfg.get("max_nonfinite_streak", 3):
      raise FloatingPointError(f"{nan_streak} consecutive GRPO steps had a non-finite loss or "
                               f"gradient (last at step {step + 1}); stopping. Metrics are in "
                               f"{workdir}/metrics.jsonl, the last good checkpoint in "
                               f"{ckpt.directory}")
    ref_params = _update_reference(cfg, ref_params, state.params, step + 1)
    writer.write(step + 1, "grpo", figures)
    if jax.process_index() == 0 and (step + 1) % cfg.log_every == 0:
      metrics_lib.write_samples(workdir, step + 1, samples, phase="grpo")
    shown = dict(reward=figures.get("reward"), nll=figures.get("nll"),
                 acc=last_eval.get("eval/accuracy"),
                 kl=figures.get("kl"), clip=figures.get("clip_frac"),
                 len=figures.get("completion_length"), sample_s=figures["sample_s"],
                 score_s=figures["score_s"], update_s=figures["update_s"],
                 tok_per_s=figures["tok_per_s"])
    progress.update(step + 1, **{k: v for k, v in shown.items() if v is not None})
    if cfg.checkpoint.every and (step + 1) % cfg.checkpoint.every == 0 or step + 1 == g.steps:
      save(sft_steps + step + 1, "grpo", step + 1, it_state, state, ref_params, rm_state)
  ckpt.wait()
  ckpt.close()
  writer.close()
  return last_eval
