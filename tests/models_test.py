"""Tests of attnjax.toy.models: causality, padding invariance, sown weights, variants."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax.toy import models, tasks

V = 12


def _config(**overrides):
  base = dict(vocab_size=V, num_layers=2, d_model=32, num_heads=4, mlp_dim=64)
  return models.TransformerConfig(**{**base, **overrides})


def _tokens(seed, shape):
  return jax.random.randint(jax.random.key(seed), shape, tasks.NUM_RESERVED, V)


def test_layer_norm_matches_flax():
  x = jax.random.normal(jax.random.key(0), (3, 5, 16)) * 3.0 + 1.0
  ours = models.LayerNorm()
  params = ours.init(jax.random.key(1), x)
  params = jax.tree.map(lambda p: p + jax.random.normal(jax.random.key(2), p.shape), params)
  want = nn.LayerNorm(epsilon=1e-6).apply(params, x)
  np.testing.assert_allclose(ours.apply(params, x), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("position, norm, short_conv", [
    ("sinusoidal", "pre", None), ("rotary", "post", None), ("none", "pre", None),
    ("rotary", "pre", 3)])
def test_decoder_only_is_causal(position, norm, short_conv):
  model = models.DecoderOnly(_config(position=position, norm=norm, num_kv_heads=2,
                                     short_conv=short_conv))
  tokens = _tokens(0, (2, 9))
  params = jax.jit(model.init)(jax.random.key(1), tokens)["params"]
  apply = jax.jit(model.apply)
  logits = apply({"params": params}, tokens)
  changed = tokens.at[:, 5:].set(tasks.NUM_RESERVED)
  logits_changed = apply({"params": params}, changed)
  np.testing.assert_allclose(logits[:, :5], logits_changed[:, :5], rtol=1e-5, atol=1e-5)
  assert np.abs(logits[:, 5:] - logits_changed[:, 5:]).max() > 1e-3


def test_encoder_decoder_ignores_padding_and_is_causal_in_the_decoder():
  model = models.EncoderDecoder(_config(tie_embeddings=False))
  inputs = _tokens(0, (2, 7)).at[:, 5:].set(tasks.PAD)
  decoder_inputs = _tokens(1, (2, 6))
  params = jax.jit(model.init)(jax.random.key(2), inputs, decoder_inputs)["params"]
  apply = jax.jit(model.apply)
  logits = apply({"params": params}, inputs, decoder_inputs)
  # Different padding length, same tokens: same logits.
  shorter = apply({"params": params}, inputs[:, :5], decoder_inputs)
  np.testing.assert_allclose(logits, shorter, rtol=1e-5, atol=1e-5)
  # Later decoder tokens do not change earlier logits.
  changed = apply({"params": params}, inputs, decoder_inputs.at[:, 3:].set(5))
  np.testing.assert_allclose(logits[:, :3], changed[:, :3], rtol=1e-5, atol=1e-5)


def test_encoder_without_positions_is_permutation_equivariant():
  model = models.EncoderDecoder(_config(position="none", num_layers=1))
  inputs = _tokens(0, (1, 6))
  decoder_inputs = _tokens(1, (1, 3))
  params = jax.jit(model.init)(jax.random.key(2), inputs, decoder_inputs)["params"]
  perm = jnp.array([3, 0, 5, 1, 4, 2])
  encode = jax.jit(lambda x: model.apply({"params": params}, x, method="encode"))
  encoded, encoded_perm = encode(inputs), encode(inputs[:, perm])
  np.testing.assert_allclose(encoded[:, perm], encoded_perm, rtol=1e-5, atol=1e-5)


def test_sown_weights_are_distributions_that_respect_the_masks():
  model = models.EncoderDecoder(_config(num_layers=1))
  inputs = _tokens(0, (2, 6)).at[1, 4:].set(tasks.PAD)
  decoder_inputs = _tokens(1, (2, 5))
  params = jax.jit(model.init)(jax.random.key(2), inputs, decoder_inputs)["params"]
  _, variables = jax.jit(lambda p: model.apply(
      {"params": p}, inputs, decoder_inputs, sow_weights=True, mutable=["intermediates"]))(params)
  sown = variables["intermediates"]
  assert set(sown) == {"encoder", "decoder"}
  for layer in ("layer_0",):
    enc = sown["encoder"][layer]["self_attention"]["attention_weights"][0]
    dec = sown["decoder"][layer]["self_attention"]["attention_weights"][0]
    cross = sown["decoder"][layer]["cross_attention"]["attention_weights"][0]
    assert enc.shape == (2, 4, 6, 6) and dec.shape == (2, 4, 5, 5)
    assert cross.shape == (2, 4, 5, 6)
    for w in (enc, dec, cross):
      np.testing.assert_allclose(w.sum(-1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(np.triu(dec, k=1), 0.0)
    np.testing.assert_array_equal(cross[1, :, :, 4:], 0.0)
    np.testing.assert_array_equal(enc[1, :, :, 4:], 0.0)


def test_tied_embeddings_share_the_table():
  tokens = _tokens(0, (1, 4))
  tied = jax.eval_shape(models.DecoderOnly(_config()).init, jax.random.key(0), tokens)
  untied = jax.eval_shape(models.DecoderOnly(_config(tie_embeddings=False)).init,
                          jax.random.key(0), tokens)
  tied, untied = tied["params"], untied["params"]
  assert "logits_dense" not in tied and untied["logits_dense"]["kernel"].shape == (32, V)


def test_dropout_is_active_only_when_not_deterministic():
  model = models.DecoderOnly(_config(dropout_rate=0.3, attention_dropout_rate=0.3))
  tokens = _tokens(0, (2, 6))
  params = jax.jit(model.init)(jax.random.key(1), tokens)["params"]
  apply = jax.jit(model.apply, static_argnames="deterministic")
  a = apply({"params": params}, tokens)
  b = apply({"params": params}, tokens, deterministic=False, rngs={"dropout": jax.random.key(3)})
  c = apply({"params": params}, tokens, deterministic=False, rngs={"dropout": jax.random.key(3)})
  np.testing.assert_array_equal(b, c)
  assert np.abs(a - b).max() > 1e-3


@pytest.mark.parametrize("jit", [False, True])
def test_short_conv_adds_weighted_predecessors_to_the_embeddings(jit):
  k, d = 3, 8
  embed = models.Embed(_config(d_model=d, position="none", short_conv=k))
  tokens = _tokens(0, (2, 6))
  params = embed.init(jax.random.key(1), tokens, deterministic=True)["params"]
  apply = functools.partial(embed.apply, {"params": params}, deterministic=True)
  got = np.asarray((jax.jit(apply) if jit else apply)(tokens))
  table = np.asarray(params["embedding"]["embedding"]) * np.sqrt(d)
  w = np.asarray(params["short_conv"])
  assert w.shape == (k - 1, d)
  want = np.zeros((2, 6, d), np.float32)
  for b in range(2):
    for t in range(6):
      want[b, t] = table[tokens[b, t]]
      for j in range(1, k):
        if t - j >= 0:
          want[b, t] += w[j - 1] * table[tokens[b, t - j]]
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_invalid_configs_are_rejected():
  with pytest.raises(ValueError, match="norm"):
    _config(norm="sandwich")
  with pytest.raises(ValueError, match="position"):
    _config(position="alibi")
  for bad in (3, 0):
    with pytest.raises(ValueError, match=f"num_kv_heads must be None or .*, got {bad}"):
      _config(num_kv_heads=bad)
  with pytest.raises(ValueError, match="short_conv"):
    _config(short_conv=1)
  with pytest.raises(ValueError, match="arch"):
    models.make_model("encoder_only", _config())
