"""Multi-turn rollouts (grpo_jax/multiturn.py): exact log-probs across turns, stop strings of
several tokens, observation tokens outside the loss, budgets."""

import jax
import numpy as np
import pytest

from grpo_jax import models, multiturn, train_step, turn_programs
from grpo_jax.multiturn import EnvStep
from grpo_jax.sampling import SamplingSettings
from grpo_jax.tokenizer import Tokenizer

CHARS = "ab<>\n 1234"  # a small vocabulary: a random policy writes "ab" often


class CharTokenizer(Tokenizer):
  """One id per character (ids 3..), pad 0, bos 1, eos 2: every tokenization is the obvious one."""

  def encode(self, text):
    return [3 + CHARS.index(c) for c in text]

  def decode(self, ids):
    return "".join(CHARS[i - 3] for i in ids if 3 <= i < 3 + len(CHARS))

  bos_id = property(lambda self: 1)
  eos_id = property(lambda self: 2)
  pad_id = property(lambda self: 0)
  vocab_size = property(lambda self: 3 + len(CHARS))


class CountingEnv:
  """The observation of turn t is "<t>\\n"; done after `done_after` calls (None: never)."""
  stop_strings = ("ab",)

  def __init__(self, done_after=None):
    self.done_after = done_after

  def reset(self, record):
    return {"calls": 0, "q": record["q"]}

  def step(self, state, text):
    assert text.endswith("ab") and text.count("ab") == 1, text
    calls = state["calls"] + 1
    done = self.done_after is not None and calls >= self.done_after
    return {**state, "calls": calls}, EnvStep(f"<{calls}>\n", done=done, reward=1.0,
                                             info={"status": "ok"})


def tiny_model(vocab, scan_layers=False):
  config = models.get_config("tiny_llama").replace(
      vocab_size=vocab, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2,
      num_kv_heads=1, head_dim=16, max_position_embeddings=512)
  params = models.init_params(config, jax.random.key(3))
  return config.replace(scan_layers=scan_layers), models.to_layout(params, scan_layers)


def run(env, *, C=40, S=128, max_turns=4, seed=0, P=2, G=6, temperature=1.0, eos=(),
        scan_layers=False):
  tok = CharTokenizer()
  config, params = tiny_model(tok.vocab_size, scan_layers)
  settings = turn_programs.TurnSettings(
      sampling=SamplingSettings(num_samples=G, max_new_tokens=C, temperature=temperature,
                                eos_ids=eos, pad_id=0),
      stop_seqs=multiturn.stop_sequences(tok, env.stop_strings), max_turns=max_turns, slots=S,
      max_observation_tokens=8)
  programs = turn_programs.make_programs(config, settings)
  prompts = ["12", "2<<1"]
  ids, mask = tok.encode_batch(prompts[:P], max_length=6)
  ep = multiturn.rollout(programs, params, ids, mask, jax.random.key(seed), env,
                         [{"q": p} for p in prompts[:P]], tok, max_workers=3)
  return tok, config, params, ids, mask, ep


@pytest.mark.parametrize("seed", [0, 1])
def test_logprobs_exact_and_observations_outside_the_loss(seed):
  tok, config, params, ids, mask, ep = run(CountingEnv(), seed=seed)
  B, C = ep.tokens_BxC.shape
  G = B // ids.shape[0]
  assert (ep.policy_mask_BxC & ep.env_mask_BxC).sum() == 0
  calls = [sum(t.observation is not None for t in row) for row in ep.turns]
  assert max(calls) >= 1, "the random policy never wrote the stop string: test is vacuous"
  for b in range(B):
    # the sequence is the turns' texts and observations, in order, with the env's tokens masked
    expect = "".join(t.text + (t.observation or "") for t in ep.turns[b])
    n = int((ep.policy_mask_BxC[b] | ep.env_mask_BxC[b]).sum())
    assert tok.decode(ep.tokens_BxC[b, :n].tolist()) == expect
    env_text = tok.decode(ep.tokens_BxC[b][ep.env_mask_BxC[b] > 0].tolist())
    assert env_text == "".join(t.observation or "" for t in ep.turns[b])
    for t in ep.turns[b][:-1]:  # every turn but the last ends at the first stop string
      assert t.text.endswith("ab") and t.text.count("ab") == 1
    assert n <= C
  assert ep.env_reward_B.tolist() == [float(c) for c in calls]
  # Teacher forcing the compacted episodes gives the sampler's log-probs on policy tokens.
  batch = train_step.TrainBatch(
      prompt_tokens=np.repeat(ids, G, 0), prompt_mask=np.repeat(mask, G, 0),
      completion_tokens=ep.tokens_BxC, completion_mask=ep.policy_mask_BxC,
      advantages=np.zeros(B, np.float32))
  lp = np.asarray(train_step.sequence_logprobs(params, batch, model_config=config))
  m = ep.policy_mask_BxC > 0
  np.testing.assert_allclose(ep.logprobs_BxC[m], lp[m], atol=2e-5, rtol=1e-5)
  assert ep.figures["episode/env_token_fraction"] > 0
  assert ep.figures["episode/tool_calls"] == pytest.approx(np.mean(calls))


def test_scanned_layers_give_the_unrolled_episodes():
  """The stacked cache written at the turns' holes and observation blocks: the same episodes."""
  want, got = (run(CountingEnv(), seed=0, scan_layers=s)[-1] for s in (False, True))
  np.testing.assert_array_equal(got.tokens_BxC, want.tokens_BxC)
  np.testing.assert_array_equal(got.policy_mask_BxC, want.policy_mask_BxC)
  np.testing.assert_array_equal(got.env_mask_BxC, want.env_mask_BxC)
  m = want.policy_mask_BxC > 0
  np.testing.assert_allclose(got.logprobs_BxC[m], want.logprobs_BxC[m], atol=1e-6, rtol=0)


def test_env_done_and_turn_limit():
  _, _, _, _, _, ep = run(CountingEnv(done_after=1), seed=0)
  for row in ep.turns:  # a call ends the episode: nothing after the first observation
    if row[0].observation is not None:
      assert len(row) == 1
  _, _, _, _, _, ep = run(CountingEnv(), seed=0, max_turns=2)
  assert max(len(row) for row in ep.turns) <= 2
  for b, row in enumerate(ep.turns):
    assert sum(t.observation is not None for t in row) <= 1
    if len(row) == 2 and row[1].text.endswith("ab"):  # the call the limit did not run
      assert ep.truncated_B[b]


def test_budget_eos_and_greedy_determinism():
  _, _, _, _, _, ep = run(CountingEnv(), C=12, S=40, temperature=0.0, eos=(2, 5))
  n = (ep.policy_mask_BxC | ep.env_mask_BxC).sum(1)
  assert n.max() <= 12
  _, _, _, _, _, again = run(CountingEnv(), C=12, S=40, temperature=0.0, eos=(2, 5))
  np.testing.assert_array_equal(ep.tokens_BxC, again.tokens_BxC)


def test_stop_cut_finds_a_stop_split_over_tokens():
  tok = CharTokenizer()
  ids = tok.encode("4a1ab22ab")
  assert multiturn._stop_cut(tok, ids, ("ab",)) == 5
  assert multiturn._stop_cut(tok, ids, ("zz",)) is None
  assert multiturn.stop_sequences(tok, ("ab",)) == (tuple(tok.encode("ab")),)
