"""Tests of attnjax.toy.decoding: cached greedy decoding against full recomputation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax.toy import decoding, models, tasks


def _recompute_decode(model, params, batch, target_len, position_ids=None):
  """Greedy decoding that reruns the uncached model on the whole prefix at every step.

  The prefix sits in a fixed-size buffer padded on the right; the model is causal, so the
  logits at the prefix's last position do not see the padding.
  """
  position_ids = position_ids or {}
  if isinstance(model, models.EncoderDecoder):
    forward = jax.jit(lambda dec: model.apply(
        {"params": params}, batch["inputs"], dec,
        **models.position_kwargs(model, position_ids)))
    dec = np.zeros((batch["inputs"].shape[0], target_len), np.int32)
    dec[:, 0] = tasks.BOS
    out = np.zeros_like(dec)
    for t in range(target_len):
      out[:, t] = np.argmax(forward(jnp.asarray(dec))[:, t], axis=-1)
      if t + 1 < target_len:
        dec[:, t + 1] = out[:, t]
    return out
  example = jax.device_get(tasks.decoder_only_example(batch))
  prompt = example["prompt_lengths"]
  L = example["decoder_inputs"].shape[1] + 1
  seq = np.where(np.arange(L) < prompt[:, None],
                 np.pad(example["decoder_inputs"], ((0, 0), (0, 1))), tasks.PAD)
  kwargs = {}
  if "positions" in position_ids:  # The last slot's id is never read by a prediction.
    kwargs["positions"] = jnp.pad(position_ids["positions"], ((0, 0), (0, 1)), mode="edge")
  forward = jax.jit(lambda seq: model.apply({"params": params}, seq, **kwargs))
  rows = np.arange(seq.shape[0])
  for t in range(target_len):
    last = prompt - 1 + t
    seq[rows, last + 1] = np.argmax(np.asarray(forward(jnp.asarray(seq)))[rows, last], -1)
  return seq[rows[:, None], prompt[:, None] + np.arange(target_len)]


def _model_and_batch(arch, position, name="copy", num_kv_heads=None, norm="pre",
                     short_conv=None, position_ids="sequential"):
  task = tasks.Task(name, num_symbols=16, min_length=2, max_length=6, num_queries=2)
  batch = task.sample(jax.random.key(0), 4)
  cfg = models.TransformerConfig(vocab_size=task.vocab_size, num_layers=2, d_model=32,
                                 num_heads=4, num_kv_heads=num_kv_heads, mlp_dim=64,
                                 position=position, norm=norm, short_conv=short_conv,
                                 max_position=40, hard_alibi_windows=(1, 3, None, 2)
                                 if position in ("hard_alibi", "t5") else None)
  model = models.make_model(arch, cfg)
  fmt = (tasks.encoder_decoder_example if arch == "encoder_decoder"
         else tasks.decoder_only_example)
  ids = tasks.position_ids(fmt(batch), task, kind=position_ids, max_position=40,
                           key=jax.random.key(2))
  params = models.init_params(model, jax.random.key(1), {**fmt(batch), **ids})
  # Sharpen the random model so that argmax ties do not hide a wrong cache.
  params = jax.tree.map(lambda p: p * 2.0, params)
  if position == "t5":  # Zeros at init: give the table something to say.
    params = jax.tree_util.tree_map_with_path(
        lambda path, p: jax.random.normal(jax.random.key(3), p.shape)
        if "t5_relative_bias" in jax.tree_util.keystr(path) else p, params)
  if position == "fire":  # A short threshold and a large output layer: distances matter.
    params = jax.tree_util.tree_map_with_path(
        lambda path, p: p * (0.02 if "threshold" in jax.tree_util.keystr(path) else 30.0)
        if "fire_kernel_out" in jax.tree_util.keystr(path)
        or "fire_threshold" in jax.tree_util.keystr(path) else p, params)
  return task, model, params, batch, ids


@pytest.mark.parametrize("arch, position, short_conv, position_ids", [
    ("encoder_decoder", "sinusoidal", None, "sequential"),
    ("encoder_decoder", "rotary", None, "sequential"),
    ("decoder_only", "sinusoidal", None, "sequential"),
    ("decoder_only", "rotary", None, "sequential"),
    ("decoder_only", "none", None, "sequential"),
    ("encoder_decoder", "rotary", 3, "sequential"),
    ("decoder_only", "sinusoidal", 3, "sequential"),
    *[("decoder_only", position, None, "sequential")
      for position in ("learned", "alibi", "hard_alibi", "t5", "fire", "nope")],
    ("encoder_decoder", "hard_alibi", None, "sequential"),
    ("encoder_decoder", "t5", None, "sequential"),
    ("decoder_only", "learned", None, "randomized"),
    ("encoder_decoder", "rotary", None, "randomized"),
    ("decoder_only", "rotary", None, "coupled"),
    # Relative schemes read the given ids (the decoder keeps the cached tokens' ids).
    *[("decoder_only", position, None, ids) for position in ("alibi", "hard_alibi", "t5", "fire")
      for ids in ("randomized", "coupled")],
    ("encoder_decoder", "t5", None, "randomized"),
    ("encoder_decoder", "hard_alibi", None, "randomized")])
def test_cached_decoding_matches_recomputation(arch, position, short_conv, position_ids):
  task, model, params, batch, ids = _model_and_batch(
      arch, position, num_kv_heads=2, short_conv=short_conv, position_ids=position_ids)
  got = decoding.greedy_decode(model, params, batch, target_len=task.target_len,
                               stop_at_eos=False, position_ids=ids)
  want = _recompute_decode(model, params, batch, task.target_len, ids)
  np.testing.assert_array_equal(np.asarray(got), want)
  if position_ids != "sequential":  # The ids matter: other ids, other outputs.
    other = decoding.greedy_decode(model, params, batch, target_len=task.target_len,
                                   stop_at_eos=False)
    assert np.any(np.asarray(other) != want)


@pytest.mark.parametrize("short_conv", [None, 3])
def test_decoder_only_prefill_matches_token_by_token(short_conv):
  task, model, params, batch, _ = _model_and_batch("decoder_only", "rotary",
                                                   name="associative_recall", norm="post",
                                                   short_conv=short_conv)
  one_by_one = decoding.greedy_decode(model, params, batch, target_len=task.target_len,
                                      stop_at_eos=False)
  prefilled = decoding.greedy_decode(model, params, batch, target_len=task.target_len,
                                     stop_at_eos=False, prefill=task.min_input_len + 1)
  np.testing.assert_array_equal(np.asarray(prefilled), np.asarray(one_by_one))


@pytest.mark.parametrize("arch", ["encoder_decoder", "decoder_only"])
def test_decoding_stops_once_every_sequence_has_ended(arch):
  task = tasks.Task("copy", num_symbols=8, min_length=1, max_length=5)
  batch = task.sample(jax.random.key(0), 3)
  cfg = models.TransformerConfig(vocab_size=task.vocab_size, num_layers=1, d_model=16,
                                 num_heads=2, mlp_dim=32, tie_embeddings=False)
  model = models.make_model(arch, cfg)
  fmt = (tasks.encoder_decoder_example if arch == "encoder_decoder"
         else tasks.decoder_only_example)
  params = models.init_params(model, jax.random.key(1), fmt(batch))
  # An output bias that makes EOS the argmax everywhere: every sequence ends at once.
  params["logits_dense"]["bias"] = params["logits_dense"]["bias"].at[tasks.EOS].add(1e3)
  stopped = np.asarray(decoding.greedy_decode(model, params, batch, target_len=6))
  full = np.asarray(decoding.greedy_decode(model, params, batch, target_len=6,
                                           stop_at_eos=False))
  np.testing.assert_array_equal(stopped[:, 0], tasks.EOS)
  # Decoding stopped right after the last sequence to start generating ended (decoder-only
  # sequences with shorter prompts start, and end, earlier).
  last = np.argmax((np.asarray(batch["inputs"]) != tasks.PAD).sum(1))
  np.testing.assert_array_equal(stopped[last, 1:], tasks.PAD)
  assert set(stopped.ravel()) <= {tasks.EOS, tasks.PAD}
  np.testing.assert_array_equal(full, tasks.EOS)
