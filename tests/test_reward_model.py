"""Reward models: losses against NumPy, scoring positions, step boundaries (`rewards.steps`) on
hand examples and against the arithmetic step labels, ORM/PRM training on toy tasks, exact
micro-batching, 2x2x2 mesh == 1 device, the jitted scorer and reward-function adapter, and the
replay buffer (`rewards.replay`). The arithmetic step verifier is tested in test_data.py.

Toy tasks (tiny_qwen2 trained from scratch, seed 0, a few seconds on CPU): the label is whether a
marker token occurs in the completion (ORM), or in the step so far or any earlier step (PRM,
prefix-correctness labels). Held-out accuracy must reach 0.8 (ORM, chance 0.5) and beat the
majority-class rate by 0.1 (PRM); a head that does not train stays at 0.5 / the majority rate.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from grpo_jax import models, sharding
from grpo_jax import train_step as ts
from grpo_jax.data import arithmetic
from grpo_jax.rewards import replay
from grpo_jax.rewards import reward_model as rm
from grpo_jax.rewards import steps
from grpo_jax.tokenizer_training import train_sentencepiece

MODEL = models.get_config("tiny_qwen2")
orm_scores = jax.jit(functools.partial(rm.orm_scores, model_config=MODEL))
prm_step_scores = jax.jit(functools.partial(rm.prm_step_scores, model_config=MODEL))
EOS, MARK, DELIM = 3, 7, 9
TP, TC, S = 4, 12, 4  # prompt, completion lengths; max steps


def assert_tree_close(a, b, **tol):
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path),
                               **tol)


# ----------------------------------------------------------------------------- toy data


def _prompts(rng, n):
  tokens = rng.integers(10, 40, (n, TP)).astype(np.int32)
  lengths = rng.integers(1, TP + 1, n)
  mask = (np.arange(TP)[None] >= TP - lengths[:, None]).astype(np.int32)
  return tokens * mask, mask


def orm_toy(n, seed) -> rm.RMBatch:
  """Label 1 iff MARK occurs in the completion (random tokens, ragged lengths, then EOS)."""
  rng = np.random.default_rng(seed)
  prompt, pmask = _prompts(rng, n)
  comp = np.zeros((n, TC), np.int32)
  cmask = np.zeros((n, TC), np.int32)
  labels = rng.integers(0, 2, n).astype(np.float32)
  for i in range(n):
    length = rng.integers(3, TC)
    row = rng.integers(10, 40, length)
    if labels[i]:
      row[rng.integers(0, length)] = MARK
    comp[i, :length + 1] = [*row, EOS]
    cmask[i, :length + 1] = 1
  return rm.RMBatch(prompt, pmask, comp, cmask, labels=labels)


def prm_toy(n, seed) -> rm.RMBatch:
  """2..4 steps of 2..3 tokens + DELIM each; step s is correct iff no MARK in steps <= s."""
  rng = np.random.default_rng(seed)
  prompt, pmask = _prompts(rng, n)
  comp = np.zeros((n, TC + 4), np.int32)
  cmask = np.zeros_like(comp)
  labels = np.zeros((n, S), np.float32)
  ends, masks = [], []
  for i in range(n):
    row, ok = [], 1
    for s in range(rng.integers(2, S + 1)):
      step = list(rng.integers(10, 40, rng.integers(2, 4)))
      if rng.random() < 0.2:
        step[rng.integers(0, len(step))] = MARK
        ok = 0
      row += step + [DELIM]
      labels[i, s] = ok
    comp[i, :len(row)] = row
    cmask[i, :len(row)] = 1
    e, m = steps.step_boundaries(row, {DELIM}, max_steps=S)
    ends.append(e)
    masks.append(m)
  return rm.RMBatch(prompt, pmask, comp, cmask, labels=labels, step_end=np.stack(ends),
                    step_mask=np.stack(masks))


def pair_toy(n, seed) -> rm.PairBatch:
  """n pairs: a completion with MARK is preferred to one without."""
  batch = orm_toy(4 * n, seed)
  take = lambda idx: jax.tree.map(lambda x: x[idx], batch)
  pos, neg = np.flatnonzero(batch.labels == 1)[:n], np.flatnonzero(batch.labels == 0)[:n]
  assert len(pos) == len(neg) == n
  return rm.PairBatch(take(pos), take(neg))


def _train(kind, train, steps, batch_size=32, lr=3e-3):
  optimizer = ts.make_optimizer(ts.OptimConfig(learning_rate=lr, max_grad_norm=1.0))
  state = ts.init_train_state(rm.init_reward_model(MODEL, jax.random.key(0)), optimizer)
  step = jax.jit(lambda s, b: rm.rm_update_step(s, b, model_config=MODEL, optimizer=optimizer,
                                                kind=kind))
  rng = np.random.default_rng(0)
  n = jax.tree.leaves(train)[0].shape[0]
  history = []
  for _ in range(steps):
    idx = rng.choice(n, batch_size, replace=False)
    state, metrics = step(state, jax.tree.map(lambda x: x[idx], train))
    history.append(float(metrics["loss"]))
  assert step._cache_size() == 1
  return state, np.asarray(history)


# ----------------------------------------------------------------------------- losses


def _np_log_sigmoid(x):
  return -np.logaddexp(0.0, -x)


def test_losses_match_numpy():
  rng = np.random.default_rng(0)
  z, y = rng.normal(0, 3, 16), rng.integers(0, 2, 16)
  want_bce = -np.mean(y * _np_log_sigmoid(z) + (1 - y) * _np_log_sigmoid(-z))
  np.testing.assert_allclose(rm.orm_bce(jnp.asarray(z, jnp.float32), y), want_bce, rtol=1e-5)
  zc, zr = rng.normal(0, 3, 16), rng.normal(0, 3, 16)
  np.testing.assert_allclose(rm.orm_pairwise(jnp.asarray(zc, jnp.float32), zr),
                             -np.mean(_np_log_sigmoid(zc - zr)), rtol=1e-5)
  z2, y2, m2 = rng.normal(0, 3, (4, 5)), rng.integers(0, 2, (4, 5)), rng.integers(0, 2, (4, 5))
  per = -(y2 * _np_log_sigmoid(z2) + (1 - y2) * _np_log_sigmoid(-z2))
  np.testing.assert_allclose(rm.prm_bce(jnp.asarray(z2, jnp.float32), y2, m2),
                             np.sum(per * m2) / m2.sum(), rtol=1e-5)
  # A fresh (zero) head scores 0 everywhere: BCE = log 2, pairwise = log 2.
  params = rm.init_reward_model(MODEL, jax.random.key(0))
  loss_fn = jax.jit(functools.partial(rm.rm_loss_and_grads, model_config=MODEL))
  _, metrics, _ = loss_fn(params, orm_toy(8, 1))
  np.testing.assert_allclose(metrics["loss"], np.log(2.0), rtol=1e-6)


def test_scores_read_the_right_positions():
  params = rm.init_reward_model(MODEL, jax.random.key(0))
  params["head"] = {"w": jax.random.normal(jax.random.key(1), (MODEL.hidden_size,)),
                    "b": jnp.float32(0.3)}
  batch = prm_toy(4, 2)
  tokens = np.concatenate([batch.prompt_tokens, batch.completion_tokens], 1)
  attn = np.concatenate([batch.prompt_mask, np.ones_like(batch.completion_mask)], 1)
  hidden, _ = models.forward(params["backbone"], MODEL, tokens,
                             np.maximum(np.cumsum(attn, 1) - 1, 0), attn, return_hidden=True)
  head = lambda h: h @ params["head"]["w"] + params["head"]["b"]
  last = TP - 1 + batch.completion_mask.sum(1)
  orm = orm_scores(params, batch)
  np.testing.assert_allclose(orm, head(hidden[np.arange(4), last]), atol=1e-5)
  prm = prm_step_scores(params, batch, batch.step_end, batch.step_mask)
  want = head(hidden[np.arange(4)[:, None], TP + batch.step_end]) * batch.step_mask
  np.testing.assert_allclose(prm, want, atol=1e-5)
  # Tokens after the last real one do not change the outcome score.
  noisy = batch.replace(completion_tokens=np.where(batch.completion_mask > 0,
                                                   batch.completion_tokens, 55))
  np.testing.assert_allclose(orm_scores(params, noisy), orm, atol=1e-5)


# ----------------------------------------------------------------------------- steps


def test_step_boundaries_hand_examples():
  d = {DELIM}
  ends = lambda ids, **kw: steps.step_boundaries(ids, d, **kw)
  np.testing.assert_array_equal(ends([5, 9, 6, 7, 9, 8])[0], [1, 4, 5])  # tail is a step
  np.testing.assert_array_equal(ends([5, 9, 6, 9])[0], [1, 3])  # ends on a delimiter
  np.testing.assert_array_equal(ends([5, 9, 6, 9, EOS], trailing_ids=[EOS])[0], [1, 4])
  np.testing.assert_array_equal(ends([5, 6])[0], [1])  # no delimiter: one step
  e, m = ends([5, 9, 6], max_steps=4)
  np.testing.assert_array_equal(e, [1, 2, 0, 0])
  np.testing.assert_array_equal(m, [1, 1, 0, 0])
  e, m = ends([9, 9, 9, 9, 5], max_steps=3)  # too many: the last step runs to the end
  np.testing.assert_array_equal(e, [0, 1, 4])
  np.testing.assert_array_equal(m, [1, 1, 1])
  e, m = ends([], max_steps=2)
  np.testing.assert_array_equal(m, [0, 0])
  e, m = steps.batch_step_boundaries(np.array([[5, 9, 6, 0], [9, 9, 0, 0]]),
                                     np.array([[1, 1, 1, 0], [1, 1, 0, 0]]), d, max_steps=3)
  np.testing.assert_array_equal(e, [[1, 2, 0], [0, 1, 0]])
  np.testing.assert_array_equal(m, [[1, 1, 0], [1, 1, 0]])
  assert steps.split_steps("1+2=3. 3-1=2. #### 2") == ["1+2=3.", " 3-1=2.", " #### 2"]
  assert steps.split_steps("a.\nb. ") == ["a.", "\nb. "]


def test_step_boundaries_with_a_tokenizer_match_the_text_steps():
  records = arithmetic.generate(200, 0, flaw_p=0.5)
  tok = train_sentencepiece([r["question"] + " " + r["answer"] for r in records], vocab_size=120)
  assert steps.delimiter_token_ids(tok, ".")
  for r in records[:20]:
    ids = tok.encode(r["answer"]) + [tok.eos_id]  # the EOS tail joins the "#### x" step
    e, m = steps.step_boundaries(ids, tok, delimiter=".")
    texts = steps.split_steps(r["answer"], ".")
    assert int(m.sum()) == len(texts) == len(arithmetic.step_labels(r["answer"], r))
    assert e[-1] == len(ids) - 1
    pieces = [tok.decode(ids[a + 1:b + 1]) for a, b in zip([-1, *e[:-1]], e)]
    assert [p.strip() for p in pieces] == [s.strip() for s in texts]
    # The flawed teacher's solutions are exactly the ones with a wrong step.
    assert all(arithmetic.step_labels(r["answer"], r)) == r["teacher_correct"]


# ----------------------------------------------------------------------------- training


def test_orm_trains_on_a_toy_task():
  state, loss = _train("orm", orm_toy(512, 0), steps=80)
  assert loss[-20:].mean() < 0.6 * loss[:5].mean(), loss
  test = orm_toy(256, 1)
  z = orm_scores(state.params, test)
  acc = float(np.mean((np.asarray(z) > 0) == (test.labels > 0.5)))
  assert acc >= 0.8, acc


def test_pairwise_orm_trains_on_a_toy_task():
  state, loss = _train("orm_pairwise", pair_toy(256, 0), steps=60, batch_size=16)
  assert loss[-20:].mean() < 0.6 * loss[:5].mean(), loss
  test = pair_toy(128, 1)
  zc = orm_scores(state.params, test.chosen)
  zr = orm_scores(state.params, test.rejected)
  assert float(np.mean(np.asarray(zc) > np.asarray(zr))) >= 0.8


def test_prm_trains_on_toy_step_labels():
  state, loss = _train("prm", prm_toy(512, 0), steps=80)
  assert loss[-20:].mean() < 0.7 * loss[:5].mean(), loss
  test = prm_toy(256, 1)
  z = prm_step_scores(state.params, test, test.step_end, test.step_mask)
  m = test.step_mask.astype(bool)
  acc = float(np.mean((np.asarray(z)[m] > 0) == (test.labels[m] > 0.5)))
  majority = max(test.labels[m].mean(), 1 - test.labels[m].mean())
  assert acc >= majority + 0.1, (acc, majority)


# ----------------------------------------------------------------------------- exactness, meshes

OPTIM = ts.OptimConfig(learning_rate=1e-3, eps=1e-3, max_grad_norm=1.0, weight_decay=0.01)
BATCHES = {"orm": lambda: orm_toy(8, 3), "orm_pairwise": lambda: pair_toy(8, 3),
           "prm": lambda: prm_toy(8, 3)}


def _one_step(kind, num_microbatches, mesh=None):
  optimizer = ts.make_optimizer(OPTIM)
  params = rm.init_reward_model(MODEL, jax.random.key(0))
  params["head"]["w"] = 0.1 * jax.random.normal(jax.random.key(1), (MODEL.hidden_size,))
  state = ts.init_train_state(params, optimizer)
  batch = BATCHES[kind]()
  if mesh is None:
    fn = jax.jit(lambda s, b: rm.rm_update_step(s, b, model_config=MODEL, optimizer=optimizer,
                                                kind=kind, num_microbatches=num_microbatches))
  else:
    state_sh = rm.rm_state_shardings(mesh, MODEL, optimizer, jax.eval_shape(lambda: params))
    state, batch = jax.device_put(state, state_sh), sharding.shard_batch(batch, mesh)
    fn = rm.make_rm_update_fn(mesh, state_sh, model_config=MODEL, optimizer=optimizer, kind=kind,
                              num_microbatches=num_microbatches)
  new, metrics = fn(state, batch)
  return jax.device_get((new.params, metrics))


@pytest.fixture(scope="module")
def one_device_steps():
  return {kind: _one_step(kind, 1) for kind in rm.KINDS}


@pytest.mark.parametrize("kind", rm.KINDS)
def test_rm_update_microbatch_invariance(kind, one_device_steps):
  params1, metrics1 = one_device_steps[kind]
  params2, metrics2 = _one_step(kind, 2)
  assert metrics1["loss"] > 0 and metrics1["grad_norm"] > 0
  for k in ("loss", "rm_accuracy", "grad_norm"):
    np.testing.assert_allclose(metrics2[k], metrics1[k], rtol=2e-5, atol=1e-6, err_msg=k)
  assert_tree_close(params2, params1, rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind", ["orm", "prm"])
def test_rm_update_on_a_2x2x2_mesh_matches_one_device(kind, one_device_steps):
  mesh = sharding.make_mesh(2, 2, 2)
  params_mesh, metrics_mesh = _one_step(kind, 2, mesh)
  params1, metrics1 = one_device_steps[kind]
  for k in ("loss", "rm_accuracy", "grad_norm"):
    np.testing.assert_allclose(metrics_mesh[k], metrics1[k], rtol=2e-5, atol=1e-6, err_msg=k)
  assert_tree_close(params_mesh, params1, rtol=0, atol=1e-5)


def test_init_sharded_rm_state_from_policy_params():
  mesh = sharding.make_mesh(2, 2, 2)
  optimizer = ts.make_optimizer(OPTIM)
  policy, _ = ts.init_sharded_state(mesh, MODEL, optimizer, jax.random.key(3))
  state, state_sh = rm.init_sharded_rm_state(mesh, MODEL, optimizer, jax.random.key(0),
                                             backbone_params=policy.params)
  assert_tree_close(state.params["backbone"], policy.params, rtol=0, atol=0)
  assert state.params["head"]["w"].sharding.spec == jax.sharding.PartitionSpec("fsdp")
  assert state_sh.params["head"]["b"].spec == jax.sharding.PartitionSpec()


# ----------------------------------------------------------------------------- scoring


def test_scorer_and_reward_fn():
  records = arithmetic.generate(64, 0, flaw_p=0.5)
  tok = train_sentencepiece([r["question"] + " " + r["answer"] for r in records], vocab_size=120)
  config = models.get_config("tiny_qwen2", vocab_size=tok.vocab_size)
  mesh = sharding.make_mesh(2, 2, 2)
  params = rm.init_reward_model(config, jax.random.key(0))
  params["head"]["w"] = jax.random.normal(jax.random.key(1), (config.hidden_size,))
  params_sh = sharding.tree_shardings(mesh, rm.reward_model_logical_axes(config),
                                      jax.eval_shape(lambda: params))
  params = jax.device_put(params, params_sh)
  scorer = rm.make_rm_scorer(mesh, params_sh, model_config=config, num_microbatches=2)
  fn = rm.orm_reward_fn(scorer, params, tok, batch_size=8, max_prompt_length=48,
                        max_completion_length=32)
  prompts = [r["question"] for r in records[:11]]
  answers = [r["answer"] for r in records[:11]]
  got = fn(answers, prompt=prompts)
  got_small = fn(answers[:3], prompt=prompts[:3])
  assert scorer._cache_size() == 1  # fixed-size padded batches: one compile
  direct = rm.encode_for_rm(tok, prompts, answers, max_prompt_length=48, max_completion_length=32)
  want = jax.nn.sigmoid(jax.jit(functools.partial(rm.orm_scores, model_config=config))(
      jax.device_get(params), direct))
  np.testing.assert_allclose(got, want, atol=1e-5)
  np.testing.assert_allclose(got_small, want[:3], atol=1e-5)
  assert len(set(np.round(got, 6))) > 1
  with pytest.raises(ValueError, match="prompt"):
    fn(answers, final_answer=["1"] * 11)
  # The PRM scorer on the same arrays: rewards only where a step exists, in (0, 1).
  e, m = steps.batch_step_boundaries(direct.completion_tokens, direct.completion_mask, tok,
                                     delimiter=".", max_steps=5)
  prm_scorer = rm.make_rm_scorer(mesh, params_sh, model_config=config, kind="prm")
  rows = slice(0, 8)
  step_r = np.asarray(prm_scorer(params, jax.tree.map(lambda x: x[rows],
                                                      direct.replace(step_end=e, step_mask=m))))
  assert np.all(step_r[m[rows] == 0] == 0) and np.all((step_r[m[rows] == 1] > 0))


# ----------------------------------------------------------------------------- replay buffer


def _examples(n, start):
  ids = np.arange(start, start + n, dtype=np.int32)
  return {"tokens": ids[:, None] * np.ones((1, 3), np.int32),
          "labels": (np.arange(start, start + n) % 2).astype(np.float32)}


@pytest.mark.parametrize("fraction", [0.1, 0.25])
def test_replay_buffer_mixes_the_configured_fraction_from_history(fraction):
  buf = replay.ReplayBuffer()
  buf.add(_examples(100, 0))
  new = _examples(90, 1000)  # ids >= 1000 are new, < 100 history
  mixed, source = buf.mix(new, fraction, rng=7)
  from_history = mixed["tokens"][:, 0] < 1000
  assert from_history.sum() == replay.num_replayed(90, fraction) == (source >= 0).sum()
  np.testing.assert_allclose(from_history.mean(), fraction, atol=0.006)
  assert sorted(mixed["tokens"][~from_history, 0]) == list(range(1000, 1090))  # all new, once
  assert len(set(mixed["tokens"][from_history, 0])) == from_history.sum()  # no duplicates
  np.testing.assert_array_equal(mixed["tokens"][from_history, 0], source[source >= 0])
  np.testing.assert_array_equal(mixed["labels"], mixed["tokens"][:, 0] % 2)  # rows stay whole
  assert len(buf) == 100  # mix does not add
  again, _ = buf.mix(new, fraction, rng=7)
  other, _ = buf.mix(new, fraction, rng=8)
  np.testing.assert_array_equal(again["tokens"], mixed["tokens"])
  assert not np.array_equal(other["tokens"], mixed["tokens"])
  # The first iteration has no history: only new rows.
  first, src = replay.ReplayBuffer().mix(new, fraction, rng=0)
  assert len(src) == 90 and np.all(src == -1)


def test_replay_buffer_state_round_trip():
  buf = replay.ReplayBuffer()
  buf.add(_examples(5, 0))
  buf.add(_examples(4, 50))
  state = buf.state_dict()
  back = replay.ReplayBuffer.from_state_dict(jax.tree.map(np.array, state))
  assert back.columns.keys() == buf.columns.keys()
  for k in buf.columns:
    np.testing.assert_array_equal(back.columns[k], buf.columns[k])
    assert back.columns[k].dtype == buf.columns[k].dtype
  new = _examples(9, 1000)
  np.testing.assert_array_equal(back.mix(new, 0.3, 3)[0]["tokens"],
                                buf.mix(new, 0.3, 3)[0]["tokens"])
  with pytest.raises(ValueError, match="shape"):
    buf.add({"tokens": np.zeros((2, 4), np.int32), "labels": np.zeros(2, np.float32)})
  with pytest.raises(ValueError, match="replay_fraction"):
    buf.mix(new, 1.0, 0)


def test_rm_agreement_and_hacking_figures_against_numpy():
  """The learned RM's figures on a rollout: an ORM per sample against the exact answer, a PRM
  per existing step against the step verifier (off-mask steps not counted)."""
  from grpo_jax import rollout  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(0)
  P, G, S = 2, 4, 3
  orm_p = rng.uniform(size=(P, G)).astype(np.float32)
  verified = (rng.uniform(size=P * G) < 0.5).astype(np.float32)
  step_mask = np.array([[1, 1, 0]] * 4 + [[1, 1, 1]] * 4, np.int32)
  labels = (rng.uniform(size=(P * G, S)) < 0.5).astype(np.float32) * step_mask
  prm_p = rng.uniform(size=(P * G, S)).astype(np.float32) * step_mask
  prm_p[0, 2] = 0.9  # off the mask: must not count
  roll = rollout.Rollout(
      prompt_ids_NxL=np.zeros((P * G, 2), np.int32), prompt_mask_NxL=np.ones((P * G, 2)),
      tokens_NxC=np.zeros((P * G, 4), np.int32), mask_NxC=np.ones((P * G, 4), np.int32),
      truncated_N=np.zeros(P * G, bool), scores_KxPxG=np.stack([verified.reshape(P, G), orm_p]),
      reward_PxG=orm_p, verified_N=verified, texts=("",) * (P * G), records=({},) * P,
      steps=None, figures={})
  figures_of = rollout._figures  # pylint: disable=protected-access
  figures = figures_of(roll, ("exact_answer", "reward_model"), None)
  says, right = orm_p.reshape(-1) >= 0.5, verified > 0
  assert figures["rm_agreement"] == pytest.approx(np.mean(says == right))
  assert figures["reward_hacking"] == pytest.approx(np.mean(says & ~right))
  step_rewards = rollout.StepRewards(np.zeros((P * G, S), np.int32), step_mask, prm_p, labels)
  figures = figures_of(roll, ("exact_answer",), step_rewards, learned_steps=True)
  on = step_mask > 0
  says, right = prm_p[on] >= 0.5, labels[on] > 0
  assert figures["rm_agreement"] == pytest.approx(np.mean(says == right))
  assert figures["reward_hacking"] == pytest.approx(np.mean(says & ~right))
  assert figures["step_reward"] == pytest.approx(prm_p[on].mean())
  assert "rm_agreement" not in figures_of(roll, ("exact_answer",), step_rewards)
