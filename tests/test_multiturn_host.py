"""The host side of multi-turn rollouts (grpo_jax/multiturn.py `rollout`): truncation of resumed
rows, environments without stop strings, observations cut to their token limit, and what
reward functions and evaluation read of an episode.

The policy here is a bigram model (its layers write nothing, so the next token depends on the
current one only): greedy decoding writes a chosen text, which makes each case deterministic.
"""

import functools
import types

import jax
import numpy as np
import pytest
from jax.sharding import Mesh

from grpo_jax import (evaluation, experiment, models, multiturn, python_tool, reward_table,
                      rollout, samplers, tasks, turn_programs)
from grpo_jax import rewards as rewards_lib
from grpo_jax.multiturn import EnvStep
from grpo_jax.sampling import SamplingSettings
from grpo_jax.tokenizer import Tokenizer

EOS = 2


class Chars(Tokenizer):
  """One id per character (ids 3..), pad 0, bos 1, eos 2; "." and "`" for the Python tool's
  observations."""
  chars = "ab<>\n 1234.`"

  def encode(self, text):
    return [3 + self.chars.index(c) for c in text]

  def decode(self, ids):
    return "".join(self.chars[i - 3] for i in ids if 3 <= i < 3 + len(self.chars))

  bos_id = property(lambda self: 1)
  eos_id = property(lambda self: EOS)
  pad_id = property(lambda self: 0)
  vocab_size = property(lambda self: 3 + len(self.chars))


def bigram_model(tok, follows: dict):
  """Greedy decoding of these params writes `follows[c]` after the character c (an int: that
  id, e.g. EOS); any other character is followed by pad (never an EOS)."""
  V = tok.vocab_size
  config = models.get_config("tiny_llama").replace(
      vocab_size=V, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2,
      num_kv_heads=1, head_dim=16, max_position_embeddings=512, tie_embeddings=False)
  params = models.init_params(config, jax.random.key(0))
  params["layers_0"]["attn"]["o"] = np.zeros_like(params["layers_0"]["attn"]["o"])
  params["layers_0"]["mlp"]["down"] = np.zeros_like(params["layers_0"]["mlp"]["down"])
  params["embedding"] = np.eye(V, 32, dtype=np.float32)
  head = np.zeros((32, V), np.float32)
  for c, nxt in follows.items():
    head[tok.encode(c)[0], nxt if isinstance(nxt, int) else tok.encode(nxt)[0]] = 1.0
  params["lm_head"] = head
  return config, params


class Echo:
  """Answers every call with `observation`; `calls` counts them."""

  def __init__(self, observation="<1>\n", stop_strings=("ab",), done=False):
    self.observation, self.stop_strings, self.done, self.calls = observation, stop_strings, done, 0

  def reset(self, record):
    return ()

  def step(self, state, text):
    self.calls += 1
    return state, EnvStep(self.observation, done=self.done, info={"status": "ok"})


def episodes(env, follows, *, C=12, stop_seqs=None, max_obs=8, max_turns=3, prompt="12"):
  tok = Chars()
  config, params = bigram_model(tok, follows)
  settings = turn_programs.TurnSettings(
      sampling=SamplingSettings(num_samples=2, max_new_tokens=C, temperature=0.0,
                                eos_ids=(EOS,), pad_id=0),
      stop_seqs=(multiturn.stop_sequences(tok, env.stop_strings) if stop_seqs is None
                 else stop_seqs),
      max_turns=max_turns, slots=4 * C, max_observation_tokens=max_obs)
  programs = turn_programs.make_programs(config, settings)
  ids, mask = tok.encode_batch([prompt], max_length=6)
  ep = multiturn.rollout(programs, params, ids, mask, jax.random.key(0), env,
                         [{"q": prompt, "final_answer": "1"}], tok)
  return tok, programs, params, ep


# "12" -> the policy writes "ab", then "<>" until its budget; after "\n" it writes EOS.
LOOP = {"2": "a", "a": "b", "b": "<", "<": ">", ">": "<", "\n": EOS}


def test_a_resumed_row_that_ends_with_eos_is_not_truncated():
  """The device's stop table misses "ab" ("44" instead), so the first turn runs to the budget;
  the host's text check finds "ab", retracts the rest and resumes the row, which then ends with
  an EOS: not truncated, and its length excludes the EOS."""
  tok, _, _, ep = episodes(Echo(), LOOP, stop_seqs=(tuple(Chars().encode("44")),))
  assert [t.text for t in ep.turns[0]] == ["ab", ""]
  assert ep.turns[0][0].observation == "<1>\n"
  assert tok.decode(ep.tokens_BxC[0][ep.policy_mask_BxC[0] > 0].tolist()) == "ab"
  assert ep.tokens_BxC[0, 6] == EOS
  assert not ep.truncated_B.any()
  np.testing.assert_array_equal(samplers.completion_lengths(ep.policy_mask_BxC, ep.truncated_B),
                                [2, 2])
  # over-long filtering keeps the row's loss
  batch = rollout._batch(np.zeros((2, 1)), np.zeros((2, 1)), ep.tokens_BxC, ep.policy_mask_BxC,
                         ep.truncated_B, np.zeros(2), True)
  assert batch.completion_mask.sum() == 2 * 3


def test_a_row_that_runs_to_its_budget_is_truncated():
  _, _, _, ep = episodes(Echo(), {"2": "<", "<": ">", ">": "<"})  # no stop, no EOS
  assert ep.truncated_B.all() and len(ep.turns[0]) == 1
  assert ep.policy_mask_BxC.sum(1).tolist() == [12, 12]


def test_an_env_done_after_a_cut_turn_is_not_truncated():
  """The device ran to its budget, the host cut the turn at "ab" and the environment ended the
  episode: the retracted tokens did not make it truncated."""
  _, _, _, ep = episodes(Echo(done=True), LOOP, stop_seqs=(tuple(Chars().encode("44")),))
  assert len(ep.turns[0]) == 1 and ep.turns[0][0].observation == "<1>\n"
  assert not ep.truncated_B.any()


def test_an_environment_without_stop_strings_is_single_turn():
  env = Echo(stop_strings=())
  tok, _, _, ep = episodes(env, {"2": "a", "a": "b", "b": "1", "1": EOS})
  assert env.calls == 0
  assert [[t.text for t in row] for row in ep.turns] == [["ab1"], ["ab1"]]
  assert ep.policy_mask_BxC.sum(1).tolist() == [4, 4]  # "ab1" and the EOS
  assert ep.env_mask_BxC.sum() == 0 and not ep.truncated_B.any()
  assert ep.texts == ep.policy_texts == ("ab1", "ab1")


@pytest.mark.parametrize("stop_strings, message", [
    ("ab", "Echo.stop_strings = 'ab'"), (("ab", ""), "Echo.stop_strings"),
    ((b"ab",), "Echo.stop_strings")])
def test_bad_stop_strings_name_the_environment_and_the_field(stop_strings, message):
  with pytest.raises(ValueError, match=message):
    multiturn.check_environment(Echo(stop_strings=stop_strings))


def test_an_environment_without_step_is_named():
  with pytest.raises(ValueError, match="environment MyEnv has no 'step'"):
    multiturn.check_environment(types.SimpleNamespace(stop_strings=(), reset=None), name="MyEnv")


class LongOutput(python_tool.PythonTool):
  """The Python tool's format, without running code: every call prints 30 digits."""

  def step(self, state, text):
    return state, EnvStep(self.observation("123" * 10), info={"status": "ok"})


def test_a_long_observation_keeps_the_template_whole():
  env = LongOutput(stop_strings=("ab",))
  limit = 12
  tok, _, _, ep = episodes(env, LOOP, C=40, max_obs=limit)
  obs = ep.turns[0][0].observation
  assert obs.startswith("\n") and obs.endswith("\n```\n"), repr(obs)
  assert obs == "\n12 ...\n```\n" and len(tok.encode(obs)) <= limit
  assert tok.decode(ep.tokens_BxC[0][ep.env_mask_BxC[0] > 0].tolist()) == obs
  # the cut keeps as much output as fits, whatever the limit
  full = env.observation("123" * 10)
  for n in range(11, 20):
    ids = multiturn._observation_ids(tok, full, n, env.observation_template)
    text = tok.decode(ids)
    assert len(ids) <= n and text.startswith("\n") and text.endswith(" ...\n```\n")
    assert len(ids) >= n - 1  # one more digit would not fit
  assert multiturn._observation_ids(tok, full, 64, env.observation_template) == tok.encode(full)
  # too small for the template, or not written with it: the observation's first tokens
  assert multiturn._observation_ids(tok, full, 5, env.observation_template) == tok.encode(full)[:5]
  assert multiturn._observation_ids(tok, "1234" * 5, 5, env.observation_template) == tok.encode(
      "12341")


def _parts(tok, programs, env, reward_fns, names):
  """What `rollout._score` and `evaluation._decode_batches` read: the data side with one
  training / eval record, the multi-turn sampler on one device, the rollout settings."""
  ids, mask = tok.encode_batch(["12"], max_length=6)
  record = {"q": "12", "question": "12", "final_answer": "1"}
  prompts = tasks.Prompts(ids, mask, 0)
  data = experiment.Data(
      task=tasks.Task(train=[record], sft=[], eval=[record], prompt=lambda rec: rec["q"]),
      tokenizer=tok, train_prompts=prompts, eval_prompts=prompts, teacher=None,
      rewards=reward_table.Rewards(tuple(reward_fns), tuple(names), (1.0,) * len(names)),
      eos_ids=(EOS,), env=env)
  mesh = Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1, 1), ("data", "fsdp", "tensor"))
  sampler = samplers.MultiTurn(programs, mesh, 2, env, tok, max_workers=2)
  r = types.SimpleNamespace(num_samples=2, reward_timeout_s=0.0, reward_errors="raise")
  return data, sampler, r


def _draw_and_score(data, sampler, r, params):
  records = data.task.train
  drawn = sampler(params, data.train_prompts.ids_NxL, data.train_prompts.mask_NxL,
                  jax.random.key(0), records)
  return drawn, rollout._score(data, r, records, None, None, drawn, None)  # pylint: disable=protected-access


def test_rewards_read_the_policy_text_and_the_episode_separately():
  """The tool prints the answer ("<1>"), the policy never writes it: the exact-answer reward and
  the verifier (lenient: last number) read the policy's text and give 0; a reward that names
  `episodes` reads the whole episode; the over-long penalty reads the length the budget counts
  (policy and tool tokens), the one at which the episode is truncated."""
  C = 12
  tok, programs, params, _ = episodes(Echo(), LOOP, C=C)
  seen = {}

  def spy(completions, completion_length, episodes, **unused):
    seen.update(completions=completions, completion_length=completion_length,
                episodes=episodes)
    return [0.0] * len(completions)

  # the built-in "overlong" reward: L_max = max_completion_length, the budget is one more
  overlong = functools.partial(rewards_lib.overlong_penalty_reward, max_length=C - 1,
                               cache_length=4)
  parts = _parts(tok, programs, Echo(), [rewards_lib.exact_answer_reward, spy, overlong],
                 ["exact_answer", "spy", "overlong"])
  _, scored = _draw_and_score(*parts, params)
  assert seen["completions"] == ["ab", "ab"]
  assert [e["text"] for e in seen["episodes"]] == ["ab<1>\n", "ab<1>\n"]
  assert seen["completion_length"] == [2, 2]
  assert [e["length"] for e in seen["episodes"]] == [6, 6]
  assert scored.scores_KxN[0].tolist() == [0.0, 0.0]  # the tool's "1" is not the answer
  assert scored.verified_N.tolist() == [0.0, 0.0]
  assert scored.scores_KxN[2].tolist() == [0.0, 0.0]  # 6 tokens: far from the budget
  # "ab", the tool's "<1>\n", then "<>" to the budget: truncated at 12 tokens, 8 of them the
  # policy's; the over-long penalty is the full one, as for any completion cut at the budget
  tok, programs, params, _ = episodes(Echo(), LOOP | {"\n": "<"}, C=C)
  drawn, scored = _draw_and_score(*_parts(tok, programs, Echo(), [overlong], ["overlong"]),
                                   params)
  assert drawn.truncated_B.all() and drawn.lengths_B.tolist() == [8, 8]
  assert scored.scores_KxN[0].tolist() == [-1.0, -1.0]
  # evaluation reads the policy's text too
  tok, programs, params, _ = episodes(Echo(), LOOP, C=C)
  data, sampler, _ = _parts(tok, programs, Echo(), [], [])
  shown = []
  texts = evaluation._decode_batches(data, sampler, params, 1, 1, jax.random.key(0),  # pylint: disable=protected-access
                                     whole_texts=shown)
  assert texts == ["ab", "ab"] and shown == ["ab<1>\n", "ab<1>\n"]
  assert not evaluation._correct(texts, ["1", "1"], strict=False).any()


def test_single_turn_rewards_see_no_episodes():
  """Without tools the columns are what they were: no `episodes`, and the over-long penalty
  reads `completion_length`."""
  ids = np.array([[5, 6, EOS, 0], [5, 6, 7, 8]])
  mask = np.array([[1, 1, 1, 0], [1, 1, 1, 1]])
  lengths = samplers.completion_lengths(mask, np.array([False, True]))
  columns = reward_table.reward_columns([{"final_answer": "3"}], ["p"], ids, mask, lengths, 2)
  assert "episodes" not in columns and columns["completion_length"] == [2, 4]
  penalty = rewards_lib.overlong_penalty_reward(["", ""], max_length=3, cache_length=1,
                                                **columns)
  assert penalty.tolist() == [0.0, -1.0]
