"""Tests of attnjax.toy.evaluation: length buckets and the length curve."""

import jax.numpy as jnp
import numpy as np
import pytest

from attnjax.toy import decoding, evaluation, tasks, train
from configs import copy


def test_buckets_name_fractional_multipliers_and_keep_integer_names():
  task = tasks.Task("copy", num_symbols=8, min_length=1, max_length=16)
  got = [(name, t.min_length, t.max_length) for name, t in evaluation.buckets(task, (1.5, 2, 4))]
  assert got == [("train", 1, 16), ("1.5x", 24, 24), ("2x", 32, 32), ("4x", 64, 64)]


def test_curve_lengths_and_groups():
  assert evaluation.curve_lengths(4, 2) == [1, 2, 3, 4, 5, 6, 7, 8]
  assert evaluation.curve_lengths(4, 3, step=5) == [1, 5, 10]
  assert evaluation.curve_groups([1, 2, 3, 4, 5, 8, 9, 16, 17], 8) == [
      (1, 2, 3, 4, 5, 8), (9, 16), (17,)]


@pytest.mark.parametrize("arch", ["encoder_decoder", "decoder_only"])
def test_length_curve_reports_each_length_of_its_own_sequences(monkeypatch, arch):
  """With a decoder that is right exactly on inputs of even length, the curve is 1 at even
  lengths and 0 at odd ones: each length's sequences have that length and are scored
  together, whatever the padding of their group."""

  def oracle_on_even_lengths(model, params, batch, *, target_len, **kwargs):
    n_B1 = (batch["inputs"] != tasks.PAD).sum(axis=1, keepdims=True)
    return jnp.where(n_B1 % 2 == 0, batch["targets"][:, :target_len], tasks.EOS + 1)

  monkeypatch.setattr(decoding, "greedy_decode", oracle_on_even_lengths)
  config = copy.get_config("smoke")
  with config.unlocked():
    config.model.arch = arch
    config.task.max_length = 4
    config.eval.curve_max_multiplier = 3
    config.eval.curve_sequences = 3
  exp = train.Experiment(config)
  curve = evaluation.length_curve(exp, exp.init_state().params)
  assert curve["lengths"] == list(range(1, 13))
  np.testing.assert_array_equal(curve["exact_match"], [float(n % 2 == 0) for n in range(1, 13)])
  assert curve["sequences_per_length"] == 3


def test_symbol_hits_count_target_symbols_but_not_eos_or_padding():
  E, P = tasks.EOS, tasks.PAD
  s = tasks.NUM_RESERVED  # The first symbol.
  targets = jnp.array([[s, s + 1, E, P], [s + 2, E, P, P], [s, s, s, E]])
  predictions = jnp.array([[s, s + 2, s, s], [s + 2, s, P, P], [s, s, s, E]])
  task = tasks.Task("copy", 10, 1, 4)
  hits, symbols = evaluation.symbol_hits(predictions, targets, task)
  np.testing.assert_array_equal(hits, [1, 1, 3])  # A missed EOS costs no symbol.
  np.testing.assert_array_equal(symbols, [2, 1, 3])
