"""Tests of attnjax.toy.tasks: each generator against a NumPy statement of its format."""

import jax
import numpy as np
import pytest

from attnjax.toy import tasks
from attnjax.toy.tasks import BOS, EOS, NUM_RESERVED, PAD, SEP

B = 64


def _sample(task, seed=0, jit=True):
  fn = jax.jit(task.sample, static_argnums=1) if jit else task.sample
  out = fn(jax.random.key(seed), B)
  return {k: np.asarray(v) for k, v in out.items()}


def _unpad(row):
  return [int(t) for t in row if t != PAD]


def _expected_target(task, x):
  if task.name == "copy":
    return list(x)
  if task.name == "reverse":
    return list(reversed(x))
  if task.name == "duplicate":
    return list(x) + list(x)
  raise AssertionError(task.name)


@pytest.mark.parametrize("name", ["copy", "reverse", "duplicate"])
@pytest.mark.parametrize("jit", [True, False])
def test_sequence_tasks_match_numpy_statement(name, jit):
  task = tasks.Task(name, num_symbols=7, min_length=2, max_length=9)
  batch = _sample(task, jit=jit)
  assert batch["inputs"].shape == (B, task.input_len)
  assert batch["targets"].shape == (B, task.target_len)
  lengths = set()
  for inputs, targets in zip(batch["inputs"], batch["targets"], strict=True):
    x = _unpad(inputs)
    lengths.add(len(x))
    assert 2 <= len(x) <= 9
    assert list(inputs[:len(x)]) == x  # right-padded
    assert all(NUM_RESERVED <= t < NUM_RESERVED + 7 for t in x)
    assert _unpad(targets) == _expected_target(task, x) + [EOS]
    assert list(targets[:len(x) + 1 if name != "duplicate" else 2 * len(x) + 1]) == \
        _unpad(targets)
  assert len(lengths) > 3  # one batch mixes lengths


def test_associative_recall_answers_are_the_queried_values():
  task = tasks.Task("associative_recall", num_symbols=32, min_length=2, max_length=8,
                    num_queries=3)
  batch = _sample(task)
  assert batch["inputs"].shape == (B, 2 * 8 + 3)
  assert batch["targets"].shape == (B, 3 + 1)
  for inputs, targets in zip(batch["inputs"], batch["targets"], strict=True):
    x = _unpad(inputs)
    num_queries = len(_unpad(targets)) - 1
    num_pairs = (len(x) - num_queries) // 2
    assert 2 <= num_pairs <= 8 and num_queries == min(num_pairs, 3)
    keys, values = x[0:2 * num_pairs:2], x[1:2 * num_pairs:2]
    assert len(set(keys)) == num_pairs  # distinct keys
    assert all(NUM_RESERVED <= k < NUM_RESERVED + 16 for k in keys)
    assert all(NUM_RESERVED + 16 <= v < NUM_RESERVED + 32 for v in values)
    queries = x[2 * num_pairs:]
    assert len(set(queries)) == num_queries and set(queries) <= set(keys)
    table = dict(zip(keys, values, strict=True))
    assert _unpad(targets) == [table[q] for q in queries] + [EOS]


def test_annotated_copy_matches_the_annotated_transformer_data():
  task = tasks.Task("annotated_copy", num_symbols=10, min_length=10, max_length=10)
  assert task.vocab_size == 11
  batch = _sample(task)
  assert batch["inputs"].shape == (B, 10) and batch["targets"].shape == (B, 9)
  assert (batch["inputs"][:, 0] == BOS).all()
  assert ((batch["inputs"] >= 1) & (batch["inputs"] <= 10)).all()
  np.testing.assert_array_equal(batch["targets"], batch["inputs"][:, 1:])
  example = tasks.encoder_decoder_example(batch)
  np.testing.assert_array_equal(example["decoder_inputs"], batch["inputs"][:, :-1])


def test_same_key_same_batch_other_key_other_batch():
  task = tasks.Task("copy", num_symbols=10, min_length=1, max_length=16)
  a, b, c = _sample(task, 0), _sample(task, 0), _sample(task, 1)
  np.testing.assert_array_equal(a["inputs"], b["inputs"])
  assert (a["inputs"] != c["inputs"]).any()


def test_encoder_decoder_example_shifts_targets_right():
  task = tasks.Task("reverse", num_symbols=5, min_length=1, max_length=6)
  batch = _sample(task)
  example = jax.device_get(jax.jit(tasks.encoder_decoder_example)(batch))
  targets = batch["targets"]
  np.testing.assert_array_equal(example["decoder_inputs"][:, 0], BOS)
  np.testing.assert_array_equal(example["decoder_inputs"][:, 1:], targets[:, :-1])
  np.testing.assert_array_equal(example["weights"], targets != PAD)


@pytest.mark.parametrize("name", ["copy", "duplicate", "associative_recall"])
def test_decoder_only_example_is_bos_input_sep_target(name):
  task = tasks.Task(name, num_symbols=16, min_length=1, max_length=5, num_queries=2)
  batch = _sample(task)
  example = jax.device_get(jax.jit(tasks.decoder_only_example)(batch))
  L = task.input_len + task.target_len + 1
  assert example["decoder_inputs"].shape == (B, L)
  for i in range(B):
    x, y = _unpad(batch["inputs"][i]), _unpad(batch["targets"][i])
    seq = [BOS] + x + [SEP] + y
    full = seq + [PAD] * (L + 1 - len(seq))
    np.testing.assert_array_equal(example["decoder_inputs"][i], full[:-1])
    np.testing.assert_array_equal(example["labels"][i], full[1:])
    # The loss covers exactly the target tokens (EOS included).
    assert list(example["labels"][i][example["weights"][i] > 0]) == y
    assert example["prompt_lengths"][i] == len(x) + 2


def test_invalid_tasks_are_rejected():
  with pytest.raises(ValueError, match="task name"):
    tasks.Task("sort", 10, 1, 4)
  with pytest.raises(ValueError, match="min_length"):
    tasks.Task("copy", 10, 5, 4)
  with pytest.raises(ValueError, match="distinct keys"):
    tasks.Task("associative_recall", 10, 1, 8)


def test_token_names():
  task = tasks.Task("copy", 10, 1, 4)
  assert tasks.token_names(task, [BOS, NUM_RESERVED, SEP, NUM_RESERVED + 9, EOS, PAD]) == [
      "<s>", "0", "|", "9", "</s>", "_"]


def test_registry_holds_every_task_and_sources_state_the_rearrangement():
  assert set(tasks.TASKS) == set(tasks.TASK_REGISTRY)
  # source(j, n): the input index of target symbol j (and -1 / n around the input).
  want = {"copy": lambda j, n: j, "reverse": lambda j, n: n - 1 - j,
          "duplicate": lambda j, n: j % n if 0 <= j < 2 * n else (-1 if j < 0 else n)}
  for name, statement in want.items():
    source = tasks.TASK_REGISTRY[name].source
    for n in (1, 4, 7):
      m = tasks.Task(name, 7, 1, 9).target_len_of(np.array(n))
      for j in range(-1, int(m) + 1):
        assert int(source(np.array(j), np.array(n))) == statement(j, n), (name, n, j)
  assert tasks.TASK_REGISTRY["associative_recall"].source is None
  assert not tasks.TASK_REGISTRY["annotated_copy"].has_eos


def test_sample_at_given_lengths():
  task = tasks.Task("duplicate", num_symbols=7, min_length=1, max_length=6)
  lengths = np.array([1, 6, 3, 3])
  batch = jax.jit(lambda k, n: task.sample(k, 4, lengths=n))(jax.random.key(0), lengths)
  for inputs, targets, n in zip(np.asarray(batch["inputs"]), np.asarray(batch["targets"]),
                                lengths, strict=True):
    x = _unpad(inputs)
    assert len(x) == n
    assert _unpad(targets) == x + x + [EOS]
  with pytest.raises(ValueError, match=r"lengths must have shape \[batch_size\] = \(4,\)"):
    task.sample(jax.random.key(0), 4, lengths=np.array([1, 2]))


@pytest.mark.parametrize("name", ["copy", "reverse", "duplicate"])
def test_coupled_positions_give_each_output_its_input_tokens_id(name):
  task = tasks.Task(name, num_symbols=7, min_length=1, max_length=6)
  batch = task.sample(jax.random.key(0), 16)
  for fmt in (tasks.decoder_only_example, tasks.encoder_decoder_example):
    example = fmt(batch)
    ids = jax.device_get(tasks.position_ids(example, task, kind="coupled", max_position=30,
                                            key=jax.random.key(1)))
    starts = set()
    for b in range(16):
      x = _unpad(np.asarray(batch["inputs"][b]))
      y = _unpad(np.asarray(batch["targets"][b]))[:-1]  # without EOS
      n = len(x)
      if fmt is tasks.decoder_only_example:  # BOS x SEP y
        pos = ids["positions"][b]
        tokens = np.asarray(example["decoder_inputs"][b])
        start = pos[0]
        x_pos, y_pos, y_tok = pos[1:n + 1], pos[n + 2:n + 2 + len(y)], tokens[n + 2:]
      else:  # encoder x; decoder BOS y
        start = ids["input_positions"][b, 0] - 1
        x_pos, y_pos = ids["input_positions"][b, :n], ids["decoder_positions"][b, 1:len(y) + 1]
        y_tok = np.asarray(example["decoder_inputs"][b, 1:])
      starts.add(int(start))
      np.testing.assert_array_equal(x_pos, start + 1 + np.arange(n))
      for j, p in enumerate(y_pos):  # the output token has the id of an input copy of it
        assert y_tok[j] == x[p - start - 1]
      assert 0 <= start and start + n + 1 < 30
    assert len(starts) > 3  # random start offsets


def test_position_ids_randomized_and_errors():
  task = tasks.Task("copy", num_symbols=7, min_length=1, max_length=6)
  example = tasks.decoder_only_example(task.sample(jax.random.key(0), 8))
  assert tasks.position_ids(example, task, kind="sequential") == {}
  ids = np.asarray(tasks.position_ids(example, task, kind="randomized", max_position=50,
                                      key=jax.random.key(1))["positions"])
  real = np.asarray(example["prompt_lengths"]) * 2 - 1  # BOS x SEP y EOS: 2n + 3 tokens
  for row, n in zip(ids, real, strict=True):
    assert np.all(np.diff(row[:n]) > 0) and row.max() < 50
  with pytest.raises(ValueError, match="do not fit below max_position=10"):
    tasks.position_ids(example, task, kind="randomized", max_position=10, key=jax.random.key(1))
  with pytest.raises(ValueError, match="need max_position and key"):
    tasks.position_ids(example, task, kind="coupled")
  with pytest.raises(ValueError, match="kind must be one of"):
    tasks.position_ids(example, task, kind="shuffled", max_position=50, key=jax.random.key(1))
  recall = tasks.Task("associative_recall", num_symbols=16, min_length=1, max_length=4)
  with pytest.raises(ValueError, match="'associative_recall' has none"):
    tasks.position_ids(tasks.decoder_only_example(recall.sample(jax.random.key(0), 2)),
                       recall, kind="coupled", max_position=50, key=jax.random.key(1))
