"""Learned reward models: outcome (ORM) and process (PRM) scoring heads on the decoder, their
losses, a jitted sharded training step, a reward-function adapter, and a replay buffer.

  params = {"backbone": decoder params, "head": {"w": [E], "b": []}}
  ORM:  score_B   = head(hidden at the last real token of prompt + completion)
  PRM:  score_BxS = head(hidden at the completion token that ends step s)
  reward = sigmoid(score) (probability "correct"), or the raw logit.

A batch is an `RMBatch`: left-padded prompts [B, P] followed by right-padded completions [B, C],
the same layout as `train_step.TrainBatch`, so the GRPO trainer can score the token arrays it
already holds. Losses (all pure, jittable):

  orm_bce:      mean_i  BCE(score_i, y_i)                  y_i in {0, 1} from the verifier
  orm_pairwise: mean_i -log sigmoid(s_chosen - s_rejected) (Bradley-Terry)
  prm_bce:      sum_{i,s} m_is BCE(score_is, y_is) / sum m (mean over existing steps)

Training (`rm_update_step`) mirrors `train_step.update_step`: the per-row weights are fixed by
the whole optimizer batch, so micro-batches (`losses.accumulate_gradients`) give exactly the
full-batch gradient; `make_rm_update_fn` jits it over a Mesh (params by logical axes, rows over
("data", "fsdp"), state donated).

Iterative GRPO (DeepSeekMath Algorithm 1) keeps the RM's training data in a `ReplayBuffer`:
each outer iteration trains on the new policy samples plus a configured fraction replayed from
history (10% in the paper), then adds the new samples to the history.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Optional

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from grpo_jax import losses, models, sharding
from grpo_jax import train_step as ts

KINDS = ("orm", "orm_pairwise", "prm")
RMTrainState = ts.TrainState  # params = {"backbone", "head"}; same optimizer plumbing


# ----------------------------------------------------------------------------- params


def init_head(model_config) -> dict:
  """The scalar head {"w": [E], "b": []}, zero-initialised: every input starts at score 0
  (p = 0.5, BCE = log 2), and the backbone's features are not disturbed at the first step."""
  return {"w": jnp.zeros((model_config.hidden_size,), jnp.float32),
          "b": jnp.zeros((), jnp.float32)}


def init_reward_model(model_config, rng: jax.Array, backbone_params=None) -> dict:
  """Reward-model params {"backbone", "head"}; the backbone is `backbone_params` (e.g. the
  policy's or an SFT checkpoint's params; DeepSeekMath initialises its RM from the SFT model)
  when given, else random. The backbone's unembedding is kept (so a policy checkpoint loads
  unchanged) but unused: it gets zero gradients."""
  backbone = models.init_params(model_config, rng) if backbone_params is None else backbone_params
  return {"backbone": backbone, "head": init_head(model_config)}


def reward_model_logical_axes(model_config) -> dict:
  """Logical axes of the params: the decoder's, and ("embed",) / () for the head."""
  return {"backbone": models.param_logical_axes(model_config),
          "head": {"w": ("embed",), "b": ()}}


# ----------------------------------------------------------------------------- batches


@flax.struct.dataclass
class RMBatch:
  """B examples for the reward model (rows are independent).

  prompt_tokens, prompt_mask:         [B, P] left-padded prompts (mask 1 = real token).
  completion_tokens, completion_mask: [B, C] right-padded completions (mask 1 up to and
                                      including EOS).
  labels:    [B] 0/1 outcome labels (ORM), or [B, S] 0/1 step labels (PRM); None to score only.
  step_end:  [B, S] int32 completion-token index ending each step (PRM), see `step_boundaries`.
  step_mask: [B, S] 1 where the step exists (PRM).
  """
  prompt_tokens: jax.Array
  prompt_mask: jax.Array
  completion_tokens: jax.Array
  completion_mask: jax.Array
  labels: Optional[jax.Array] = None
  step_end: Optional[jax.Array] = None
  step_mask: Optional[jax.Array] = None


@flax.struct.dataclass
class PairBatch:
  """B preference pairs for `orm_pairwise`: row i of `chosen` is preferred to row i of
  `rejected` (labels unused). Both have the same shapes, so micro-batches keep pairs together."""
  chosen: RMBatch
  rejected: RMBatch


# ----------------------------------------------------------------------------- scoring


def _hidden(params, batch, model_config) -> jax.Array:
  """Final-normed hidden states [B, P + C, E] of prompt + completion (positions as the policy's)."""
  tokens = jnp.concatenate([batch.prompt_tokens, batch.completion_tokens], axis=1)
  # As in `train_step.sequence_logprobs`: completion padding is causally after every scored
  # position, so it may be attended as real tokens; positions then continue the prompt's.
  attn = jnp.concatenate([batch.prompt_mask, jnp.ones_like(batch.completion_mask)],
                         axis=1).astype(jnp.int32)
  positions = jnp.maximum(jnp.cumsum(attn, axis=1) - 1, 0)
  hidden_BxTxE, _ = models.forward(params["backbone"], model_config, tokens, positions, attn,
                                   None, return_hidden=True)
  return hidden_BxTxE


def _head(head, hidden_BxNxE) -> jax.Array:
  return jnp.einsum("bne,e->bn", hidden_BxNxE.astype(jnp.float32), head["w"]) + head["b"]


def _gather_scores(params, batch, index_BxN, model_config) -> jax.Array:
  hidden_BxTxE = _hidden(params, batch, model_config)
  hidden_BxNxE = jnp.take_along_axis(hidden_BxTxE, index_BxN[..., None], axis=1)
  return _head(params["head"], hidden_BxNxE)


def orm_scores(params, batch, *, model_config) -> jax.Array:
  """Outcome scores (logits) [B] float32: the head at the last real token of prompt +
  completion (the last prompt token when the completion is empty).

  `batch` is anything with the four token fields (`RMBatch`, `train_step.TrainBatch`).
  """
  P = batch.prompt_tokens.shape[1]
  last_B = P - 1 + jnp.sum(batch.completion_mask, axis=1).astype(jnp.int32)
  return _gather_scores(params, batch, last_B[:, None], model_config)[:, 0]


def prm_step_scores(params, batch, step_end_BxS, step_mask_BxS, *, model_config) -> jax.Array:
  """Process scores (logits) [B, S] float32: the head at completion token step_end[b, s];
  0 where step_mask is 0."""
  P = batch.prompt_tokens.shape[1]
  index_BxS = P + jnp.clip(step_end_BxS.astype(jnp.int32), 0, batch.completion_tokens.shape[1] - 1)
  scores_BxS = _gather_scores(params, batch, index_BxS, model_config)
  return jnp.where(step_mask_BxS > 0, scores_BxS, 0.0)


# ----------------------------------------------------------------------------- losses


def _bce_BxN(logits, labels) -> jax.Array:
  """Binary cross-entropy with logits, elementwise: softplus(z) - y z (stable)."""
  return jax.nn.softplus(logits) - labels.astype(jnp.float32) * logits


def orm_bce(logits_B, labels_B) -> jax.Array:
  """Mean binary cross-entropy of outcome logits [B] against 0/1 labels [B]. Scalar."""
  return jnp.mean(_bce_BxN(logits_B, labels_B))


def orm_pairwise(chosen_B, rejected_B) -> jax.Array:
  """Bradley-Terry loss, mean_i -log sigmoid(chosen_i - rejected_i). Scalar."""
  return jnp.mean(jax.nn.softplus(rejected_B - chosen_B))


def prm_bce(logits_BxS, labels_BxS, mask_BxS) -> jax.Array:
  """Binary cross-entropy averaged over existing steps (mask 1). Scalar; 0 with no steps."""
  m = mask_BxS.astype(jnp.float32)
  return jnp.sum(_bce_BxN(logits_BxS, labels_BxS) * m) / jnp.maximum(jnp.sum(m), 1.0)


def _loss_weights(batch, kind: str) -> jax.Array:
  """Per-row (ORM, [B]) or per-step (PRM, [B, S]) weights of the *whole* optimizer batch, so
  that the loss is a weighted sum and micro-batches add up exactly."""
  if kind == "prm":
    m = batch.step_mask.astype(jnp.float32)
    return m / jnp.maximum(jnp.sum(m), 1.0)
  rows = batch.chosen if kind == "orm_pairwise" else batch
  B = rows.prompt_tokens.shape[0]
  return jnp.full((B,), 1.0 / B, jnp.float32)


def _rm_loss_terms(params, mb: dict, *, model_config, kind: str):
  """(weighted loss sum, metric sums) of one micro-batch; additive over rows."""
  batch, w = mb["batch"], mb["weights"]
  if kind == "orm":
    z, y = orm_scores(params, batch, model_config=model_config), batch.labels
    per, correct = _bce_BxN(z, y), ((z > 0) == (y > 0.5))
  elif kind == "orm_pairwise":
    both = jax.tree.map(lambda a, b: jnp.concatenate([a, b], 0), batch.chosen, batch.rejected)
    z = orm_scores(params, both, model_config=model_config)
    zc, zr = jnp.split(z, 2)
    per, correct = jax.nn.softplus(zr - zc), zc > zr
  else:
    z = prm_step_scores(params, batch, batch.step_end, batch.step_mask, model_config=model_config)
    per, correct = _bce_BxN(z, batch.labels), ((z > 0) == (batch.labels > 0.5))
  loss = jnp.sum(per * w)
  return loss, {"rm_accuracy": jnp.sum(correct.astype(jnp.float32) * w)}


def _check_kind(kind: str, batch) -> None:
  if kind not in KINDS:
    raise ValueError(f"unknown reward-model kind {kind!r}; expected one of {KINDS}")
  if kind == "orm_pairwise":
    if not isinstance(batch, PairBatch):
      raise ValueError("kind 'orm_pairwise' needs a PairBatch(chosen, rejected)")
    return
  if batch.labels is None:
    raise ValueError(f"kind {kind!r} needs batch.labels")
  if kind == "orm" and batch.labels.ndim != 1:
    raise ValueError(f"ORM labels must be [B], got shape {batch.labels.shape}")
  if kind == "prm":
    if batch.step_end is None or batch.step_mask is None:
      raise ValueError("kind 'prm' needs batch.step_end and batch.step_mask")
    if not batch.labels.shape == batch.step_end.shape == batch.step_mask.shape:
      raise ValueError(f"PRM labels {batch.labels.shape}, step_end {batch.step_end.shape} and "
                       f"step_mask {batch.step_mask.shape} must all be [B, S]")


def rm_loss_and_grads(params, batch, *, model_config, kind: str = "orm",
                      num_microbatches: int = 1):
  """(loss, metrics, grads) of the whole batch, accumulated exactly over micro-batches.
  Metrics: loss, rm_accuracy (weighted like the loss), grad_norm."""
  _check_kind(kind, batch)
  terms = functools.partial(_rm_loss_terms, model_config=model_config, kind=kind)
  loss, sums, grads = losses.accumulate_gradients(
      terms, params, {"batch": batch, "weights": _loss_weights(batch, kind)}, num_microbatches)
  metrics = dict(sums, loss=loss, grad_norm=optax.tree.norm(grads))
  return loss, metrics, grads


def rm_update_step(state: RMTrainState, batch, *, model_config, optimizer, kind: str = "orm",
                   num_microbatches: int = 1) -> tuple[RMTrainState, dict]:
  """One optimizer step of the reward model (pure). A non-finite loss or gradient skips the
  update (state unchanged, `skipped` = 1), as in `train_step.update_step`."""
  loss, metrics, grads = rm_loss_and_grads(state.params, batch, model_config=model_config,
                                           kind=kind, num_microbatches=num_microbatches)
  return ts.apply_gradients(state, loss, grads, metrics, optimizer)


# ----------------------------------------------------------------------------- jit over a mesh


def rm_state_shardings(mesh: Mesh, model_config, optimizer, params_shapes,
                       rules=sharding.DEFAULT_RULES) -> RMTrainState:
  """NamedShardings of an RMTrainState from `reward_model_logical_axes` and the rules."""
  param_sh = sharding.tree_shardings(mesh, reward_model_logical_axes(model_config), params_shapes,
                                     rules)
  opt_sh = sharding.optimizer_shardings(mesh, optimizer, params_shapes, param_sh)
  return RMTrainState(params=param_sh, opt_state=opt_sh, step=sharding.replicated(mesh))


def init_sharded_rm_state(mesh: Mesh, model_config, optimizer, rng, *, backbone_params=None,
                          rules=sharding.DEFAULT_RULES):
  """A fresh RMTrainState created in its shards, and its shardings. With `backbone_params`
  (already placed, e.g. the policy's), the backbone is copied from them."""
  init = lambda r, bb: ts.init_train_state(init_reward_model(model_config, r, bb), optimizer)
  params_shapes = jax.eval_shape(lambda r, bb: init_reward_model(model_config, r, bb), rng,
                                 backbone_params)
  state_sh = rm_state_shardings(mesh, model_config, optimizer, params_shapes, rules)
  return jax.jit(init, out_shardings=state_sh)(rng, backbone_params), state_sh


def make_rm_update_fn(mesh: Mesh, state_sh: RMTrainState, *, model_config, optimizer,
                      kind: str = "orm", num_microbatches: int = 1):
  """`rm_update_step` jitted over `mesh`: state in/out with `state_sh`, batch rows over the data
  axes (for a PairBatch, the pairs), metrics replicated, the input state donated."""
  fn = functools.partial(rm_update_step, model_config=model_config, optimizer=optimizer,
                         kind=kind, num_microbatches=num_microbatches)
  return jax.jit(fn, in_shardings=(state_sh, sharding.batch_sharding(mesh)),
                 out_shardings=(state_sh, sharding.replicated(mesh)), donate_argnums=0)


def _microbatched(fn, batch, num_microbatches: int):
  """fn over strided micro-batches of rows with `lax.map`, rows returned in original order."""
  if num_microbatches == 1:
    return fn(batch)
  out_Mxb = jax.lax.map(fn, losses.split_microbatches(batch, num_microbatches))
  return out_Mxb.swapaxes(0, 1).reshape(-1, *out_Mxb.shape[2:])


def rm_rewards(params, batch, *, model_config, kind: str = "orm", transform: str = "sigmoid",
               num_microbatches: int = 1) -> jax.Array:
  """Rewards of a scoring batch: ORM [B] or PRM [B, S] (`batch.step_end` / `step_mask` set),
  as sigmoid(score) in (0, 1) or the raw logit (`transform="logit"`); PRM rewards are 0 where
  there is no step. Micro-batched over rows to bound memory."""
  if transform not in ("sigmoid", "logit"):
    raise ValueError(f"transform must be 'sigmoid' or 'logit', got {transform!r}")
  if kind not in ("orm", "prm"):
    raise ValueError(f"rm_rewards: kind must be 'orm' or 'prm' (a pairwise-trained ORM scores "
                     f"as 'orm'), got {kind!r}")
  post = jax.nn.sigmoid if transform == "sigmoid" else (lambda z: z)

  def one(b):
    if kind == "orm":
      return post(orm_scores(params, b, model_config=model_config))
    z = prm_step_scores(params, b, b.step_end, b.step_mask, model_config=model_config)
    return jnp.where(b.step_mask > 0, post(z), 0.0)
  fields = dict(prompt_tokens=batch.prompt_tokens, prompt_mask=batch.prompt_mask,
                completion_tokens=batch.completion_tokens, completion_mask=batch.completion_mask)
  if kind == "prm":
    fields.update(step_end=batch.step_end, step_mask=batch.step_mask)
  return _microbatched(one, RMBatch(**fields), num_microbatches)


def make_rm_scorer(mesh: Mesh, params_sh, *, model_config, kind: str = "orm",
                   transform: str = "sigmoid", num_microbatches: int = 1):
  """`rm_rewards` jitted over `mesh`: scorer(params, batch) -> [B] (ORM) or [B, S] (PRM),
  rows over the data axes. `batch` is an `RMBatch` (labels ignored; PRM needs step_end and
  step_mask) — build one from a `TrainBatch`'s token arrays with `rm_batch_from(...)`."""
  fn = functools.partial(rm_rewards, model_config=model_config, kind=kind, transform=transform,
                         num_microbatches=num_microbatches)
  return jax.jit(fn, in_shardings=(params_sh, sharding.batch_sharding(mesh)),
                 out_shardings=sharding.batch_sharding(mesh, 1 if kind == "orm" else 2))


def rm_batch_from(batch, step_end=None, step_mask=None) -> RMBatch:
  """An `RMBatch` with the token arrays of `batch` (e.g. a `train_step.TrainBatch`)."""
  return RMBatch(batch.prompt_tokens, batch.prompt_mask, batch.completion_tokens,
                 batch.completion_mask, step_end=step_end, step_mask=step_mask)


# ----------------------------------------------------------------------------- step boundaries


@functools.lru_cache(maxsize=8)
def _delimiter_ids_cached(tokenizer, delimiter: str) -> frozenset:
  ids = {i for i in range(tokenizer.vocab_size) if delimiter in tokenizer.decode([i])}
  if not ids:
    raise ValueError(f"no token of the tokenizer decodes to text containing {delimiter!r}")
  return frozenset(ids)


def delimiter_token_ids(tokenizer, delimiter: str = "\n") -> frozenset:
  """Ids whose decoded piece contains `delimiter` (one pass over the vocabulary, cached per
  tokenizer). Special tokens decode to "" and never match."""
  return _delimiter_ids_cached(tokenizer, delimiter)


def _as_delimiter_ids(tokenizer_or_delimiter_ids, delimiter: str) -> frozenset:
  if hasattr(tokenizer_or_delimiter_ids, "decode"):
    return delimiter_token_ids(tokenizer_or_delimiter_ids, delimiter)
  return frozenset(int(i) for i in tokenizer_or_delimiter_ids)


def step_boundaries(completion_token_ids: Sequence[int], tokenizer_or_delimiter_ids, *,
                    delimiter: str = "\n", max_steps: int | None = None,
                    trailing_ids: Iterable[int] = ()) -> tuple[np.ndarray, np.ndarray]:
  """Step ends of one completion (host side, NumPy): (step_end [S] int32, step_mask [S] int32).

  `completion_token_ids` are the completion's real tokens (no padding; EOS may end them). A step
  ends at every token whose id is a delimiter id (from a tokenizer: every token whose decoded
  piece contains `delimiter`, e.g. "." or "\\n"), and the last step ends at the final token. A
  tail after the last delimiter made only of `trailing_ids` (e.g. EOS) is not a step of its own:
  it extends the previous step to the final token; with a tokenizer, a tail that decodes to
  blank text (EOS, spaces) does the same, matching `split_steps` on the decoded text. With
  `max_steps` = S the output is padded
  (step_end 0, mask 0) or, with more steps, the first S - 1 are kept and the last one runs to the
  final token (so the final answer is always scored). An empty completion has no steps.
  """
  ids = [int(i) for i in completion_token_ids]
  delim = _as_delimiter_ids(tokenizer_or_delimiter_ids, delimiter)
  trailing = {int(i) for i in trailing_ids}
  tok = tokenizer_or_delimiter_ids if hasattr(tokenizer_or_delimiter_ids, "decode") else None

  def blank_tail(tail):  # the text-level rule of `split_steps` when a tokenizer is given
    return (not tok.decode(tail).strip()) if tok is not None else all(i in trailing for i in tail)

  ends = [t for t, i in enumerate(ids) if i in delim]
  if ids:
    last = len(ids) - 1
    if not ends:
      ends = [last]
    elif ends[-1] != last:
      if blank_tail(ids[ends[-1] + 1:]):
        ends[-1] = last
      else:
        ends.append(last)
  if max_steps is None:
    max_steps = len(ends)
  if max_steps < 1 and ends:
    raise ValueError(f"max_steps must be >= 1, got {max_steps}")
  if len(ends) > max_steps:
    ends = ends[:max_steps - 1] + [ends[-1]]
  step_end = np.zeros((max_steps,), np.int32)
  step_mask = np.zeros((max_steps,), np.int32)
  step_end[:len(ends)] = ends
  step_mask[:len(ends)] = 1
  return step_end, step_mask


def batch_step_boundaries(completion_tokens_NxC, completion_mask_NxC, tokenizer_or_delimiter_ids,
                          *, max_steps: int, delimiter: str = "\n",
                          trailing_ids: Iterable[int] = ()) -> tuple[np.ndarray, np.ndarray]:
  """`step_boundaries` of every row of a right-padded batch: ([N, S], [N, S]) int32, the
  step_end / step_mask that `prm_step_scores` and `advantages.process_advantages` take."""
  tokens = np.asarray(completion_tokens_NxC)
  lengths = np.asarray(completion_mask_NxC).sum(1)
  delim = _as_delimiter_ids(tokenizer_or_delimiter_ids, delimiter)
  source = tokenizer_or_delimiter_ids if hasattr(tokenizer_or_delimiter_ids, "decode") else delim
  rows = [step_boundaries(tokens[n, :lengths[n]], source, delimiter=delimiter,
                          max_steps=max_steps,
                          trailing_ids=trailing_ids) for n in range(tokens.shape[0])]
  return (np.stack([r[0] for r in rows]).astype(np.int32),
          np.stack([r[1] for r in rows]).astype(np.int32))


def split_steps(text: str, delimiter: str = ".") -> list[str]:
  """The text-level twin of `step_boundaries`: segments ending at each delimiter, plus a
  non-blank tail (a blank tail joins the last step). Concatenated they give `text` back."""
  parts, start = [], 0
  for m in re.finditer(re.escape(delimiter), text):
    parts.append(text[start:m.end()])
    start = m.end()
  tail = text[start:]
  if parts and not tail.strip():
    parts[-1] += tail
  elif tail:
    parts.append(tail)
  return parts


# ----------------------------------------------------------------------------- arithmetic labels


def eval_int_expr(text: str) -> int | None:
  """Value of an integer expression with + - * (usual precedence, no parentheses, no unary
  minus), or None if `text` is anything else. A tiny parser: never `eval`."""
  toks = re.findall(r"\d+|[+\-*]|\S", text)
  if not toks or len(toks) % 2 == 0:
    return None
  if not all(t.isdigit() for t in toks[0::2]) or not all(t in "+-*" for t in toks[1::2]):
    return None
  total, term, sign = 0, int(toks[0]), 1
  for op, num in zip(toks[1::2], toks[2::2]):
    if op == "*":
      term *= int(num)
    else:
      total, term, sign = total + sign * term, int(num), (1 if op == "+" else -1)
  return total + sign * term


_VERB_PATTERNS = (  # (regex on a question sentence, sign, has "k of n")
    (r"buys (\d+) bags of (\d+)", +1, True),
    (r"sells (\d+) boxes of (\d+)", -1, True),
    (r"finds (\d+) more", +1, False),
    (r"gets (\d+) from a friend", +1, False),
    (r"gives away (\d+)", -1, False),
    (r"loses (\d+)", -1, False),
)


def parse_arithmetic_question(question: str) -> tuple[int, list[int]]:
  """(start amount, signed change of each step) of a `data.arithmetic` question, e.g.
  "Ann has 19 pens. Ann finds 4 more. Ann sells 3 boxes of 3. ..." -> (19, [4, -9, ...])."""
  start = re.search(r"\bhas (\d+) ", question)
  if start is None:
    raise ValueError(f"not an arithmetic-task question (no 'has N'): {question!r}")
  changes = []
  for sentence in question.split(". "):
    for pattern, sign, two in _VERB_PATTERNS:
      m = re.search(pattern, sentence)
      if m:
        changes.append(sign * (int(m.group(1)) * int(m.group(2)) if two else int(m.group(1))))
        break
  return int(start.group(1)), changes


_EQUATION = re.compile(r"^\s*(\d+)\s*([+-])\s*(\d+(?:\s*\*\s*\d+)?)\s*=\s*(\d+)\s*\.?\s*$")
_ANSWER = re.compile(r"^\s*####\s*(-?\d+)\s*$")


def arithmetic_step_labels(completion_text: str, record: Mapping[str, Any], *,
                           cumulative: bool = False) -> list[int]:
  """0/1 labels of the steps of an arithmetic-task completion, one per `split_steps(text, ".")`.

  Equation step s ("a+b=c." / "a-k*n=c.") is correct iff (1) it parses, (2) its arithmetic is
  right (c = a +- operand), (3) it starts from the previous step's *written* result (the start
  amount for s = 0) and (4) its signed operand is the question's s-th change (the verb's sign
  and amount: "loses 3" must be "-3", "buys 2 bags of 3" "+2*3"). The final "#### x" step is
  correct iff x is the true answer (`record["final_answer"]`). Anything else (extra steps,
  unparseable text) is 0. Labels are local: a step is judged given the text before it; with
  `cumulative=True` a step is correct only if it and all earlier steps are (prefix
  correctness, as in Math-Shepherd).
  """
  start, changes = parse_arithmetic_question(record["question"])
  labels, prev = [], start
  for s, step in enumerate(split_steps(completion_text, ".")):
    answer = _ANSWER.match(step)
    if answer:
      labels.append(int(str(int(answer.group(1))) == str(record["final_answer"]).strip()))
      continue
    eq = _EQUATION.match(step)
    if eq is None:
      labels.append(0)
      continue
    a, op, operand, c = int(eq.group(1)), eq.group(2), eval_int_expr(eq.group(3)), int(eq.group(4))
    lhs = eval_int_expr(f"{a}{op}{eq.group(3)}")
    change = operand if op == "+" else -operand
    ok = lhs == c and a == prev and s < len(changes) and change == changes[s]
    labels.append(int(ok))
    prev = c
  if cumulative:
    labels = list(np.cumprod(labels).astype(int)) if labels else []
  return [int(x) for x in labels]


# ----------------------------------------------------------------------------- reward function


def encode_for_rm(tokenizer, prompts: Sequence[str], completions: Sequence[str], *,
                  max_prompt_length: int, max_completion_length: int) -> RMBatch:
  """Host-side NumPy RMBatch: left-padded prompts (bos as `encode_batch` adds it) and
  right-padded completions ending in EOS, truncated to `max_completion_length` (the policy's
  sampler layout)."""
  prompt_ids, prompt_mask = tokenizer.encode_batch(list(prompts), max_length=max_prompt_length)
  C = max_completion_length
  comp = np.full((len(completions), C), tokenizer.pad_id, np.int32)
  cmask = np.zeros((len(completions), C), np.int32)
  for n, text in enumerate(completions):
    ids = (tokenizer.encode(text) + [tokenizer.eos_id])[:C]
    comp[n, :len(ids)] = ids
    cmask[n, :len(ids)] = 1
  return RMBatch(prompt_ids.astype(np.int32), prompt_mask.astype(np.int32), comp, cmask)


def _pad_rows(batch: RMBatch, rows: int) -> RMBatch:
  def pad(x):
    if x is None or x.shape[0] == rows:
      return x
    return np.concatenate([x, np.zeros((rows - x.shape[0], *x.shape[1:]), x.dtype)])
  return jax.tree.map(pad, batch)


def orm_reward_fn(scorer, params, tokenizer, *, prompt_column: str = "prompt",
                  batch_size: int, max_prompt_length: int, max_completion_length: int,
                  ) -> Callable[..., list[float]]:
  """A rule-style reward function `fn(completions, **columns) -> list[float]` from an ORM.

  `scorer` is `make_rm_scorer(..., kind="orm")` (or any jitted `(params, RMBatch) -> [B]`);
  `columns[prompt_column]` holds each completion's prompt text (as the policy saw it). Text is
  re-encoded and scored in fixed-size batches of `batch_size` rows (the last one zero-padded),
  so the scorer compiles once. Rebuild the fn when the RM params change (cheap: no recompile).

  Preferred in the trainer: call `scorer(params, rm_batch_from(train_batch))` on the token
  arrays the sampler produced, which avoids the decode -> re-encode round trip and any
  tokenisation mismatch; this adapter is for mixing with rule rewards through `rewards.score`.
  """
  def fn(completions: Sequence[str], **columns) -> list[float]:
    if prompt_column not in columns:
      raise ValueError(f"orm_reward_fn needs the prompt text in column {prompt_column!r}; "
                       f"got columns {sorted(columns)}")
    prompts = columns[prompt_column]
    out = []
    for lo in range(0, len(completions), batch_size):
      batch = encode_for_rm(tokenizer, prompts[lo:lo + batch_size],
                            completions[lo:lo + batch_size], max_prompt_length=max_prompt_length,
                            max_completion_length=max_completion_length)
      n = batch.prompt_tokens.shape[0]
      out.extend(np.asarray(scorer(params, _pad_rows(batch, batch_size)))[:n].tolist())
    return [float(x) for x in out]
  return fn


# ----------------------------------------------------------------------------- replay buffer


def _num_rows(examples: Mapping[str, np.ndarray]) -> int:
  sizes = {k: np.shape(v)[0] for k, v in examples.items()}
  if len(set(sizes.values())) > 1:
    raise ValueError(f"replay examples: columns have different numbers of rows: {sizes}")
  return next(iter(sizes.values()), 0)


def num_replayed(num_new: int, replay_fraction: float) -> int:
  """Rows to replay so that they are `replay_fraction` of the mixed set: round(f / (1 - f) * n)."""
  if not 0.0 <= replay_fraction < 1.0:
    raise ValueError(f"replay_fraction must be in [0, 1), got {replay_fraction}")
  return int(round(replay_fraction / (1.0 - replay_fraction) * num_new))


@dataclasses.dataclass
class ReplayBuffer:
  """The reward model's historical training data (DeepSeekMath Algorithm 1), as plain NumPy
  columns with a leading row axis, e.g. the `RMBatch` fields or pair fields.

  Per outer iteration: `train = buf.mix(new, replay_fraction, rng)` (new rows + rows replayed
  from history only), train the RM on `train`, then `buf.add(new)`.
  `state_dict()` / `from_state_dict()` round-trip exactly (checkpointing).
  """
  columns: dict = dataclasses.field(default_factory=dict)

  def __len__(self) -> int:
    return _num_rows(self.columns)

  def add(self, examples: Mapping[str, np.ndarray]) -> None:
    """Append rows; every call must give the same columns with the same trailing shapes."""
    examples = {k: np.asarray(v) for k, v in examples.items()}
    _num_rows(examples)
    if not self.columns:
      self.columns = {k: v.copy() for k, v in examples.items()}
      return
    if set(examples) != set(self.columns):
      raise ValueError(f"replay add: columns {sorted(examples)} != buffer {sorted(self.columns)}")
    for k, v in examples.items():
      if v.shape[1:] != self.columns[k].shape[1:]:
        raise ValueError(f"replay add: column {k!r} rows have shape {v.shape[1:]}, the buffer's "
                         f"{self.columns[k].shape[1:]}")
    self.columns = {k: np.concatenate([self.columns[k], examples[k].astype(self.columns[k].dtype)])
                    for k in self.columns}

  def mix(self, new_examples: Mapping[str, np.ndarray], replay_fraction: float,
          rng: np.random.Generator | int) -> tuple[dict, np.ndarray]:
    """(training set, source [N]): the new rows plus `num_replayed(len(new), replay_fraction)`
    rows drawn from history without replacement (all of history if it is smaller), shuffled.
    source[i] = -1 for a new row, else the history row replayed. Deterministic given the rng
    (seed or Generator); the buffer is not modified."""
    rng = np.random.default_rng(rng)
    new = {k: np.asarray(v) for k, v in new_examples.items()}
    n_new = _num_rows(new)
    n_rep = min(num_replayed(n_new, replay_fraction), len(self))
    picked = np.sort(rng.choice(len(self), size=n_rep, replace=False)) if n_rep else \
        np.zeros((0,), np.int64)
    if n_rep and set(new) != set(self.columns):
      raise ValueError(f"replay mix: columns {sorted(new)} != buffer {sorted(self.columns)}")
    source = np.concatenate([np.full((n_new,), -1, np.int64), picked])
    order = rng.permutation(len(source))
    mixed = {k: np.concatenate([new[k], self.columns[k][picked]] if n_rep else [new[k]])[order]
             for k in new}
    return mixed, source[order]

  def state_dict(self) -> dict:
    return {"columns": {k: v.copy() for k, v in self.columns.items()}}

  @classmethod
  def from_state_dict(cls, state: Mapping[str, Any]) -> "ReplayBuffer":
    return cls({k: np.array(v) for k, v in state["columns"].items()})
