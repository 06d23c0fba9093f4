"""Tests of attnjax.toy.models: causality, padding invariance, sown weights, variants."""

import functools
import math

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
    _config(position="xpos")
  for bad in (3, 0):
    with pytest.raises(ValueError, match=f"num_kv_heads must be None or .*, got {bad}"):
      _config(num_kv_heads=bad)
  with pytest.raises(ValueError, match="short_conv"):
    _config(short_conv=1)
  with pytest.raises(ValueError, match="arch"):
    models.make_model("encoder_only", _config())


def _naive_first_layer_weights(params, tokens, bias_fn, positions=None):
  """Attention weights [B, N, T, T] of a pre-LN decoder's first layer, in NumPy, with the
  position bias ``bias_fn(i, j, h)`` added to the logits."""
  p = jax.tree.map(np.asarray, params)
  emb = p["embed"]["embedding"]["embedding"]
  D = emb.shape[1]
  x = emb[np.asarray(tokens)] * np.sqrt(D)
  if "position_embedding" in p["embed"]:
    x = x + p["embed"]["position_embedding"][np.asarray(positions)]
  layer = p["decoder"]["layer_0"]
  norm = layer["self_attention_norm"]
  h = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-6)
  h = h * norm["scale"] + norm["bias"]
  att = layer["self_attention"]
  q = np.einsum("btd,dnh->btnh", h, att["query"]["kernel"]) + att["query"]["bias"]
  k = np.einsum("btd,dnh->btnh", h, att["key"]["kernel"]) + att["key"]["bias"]
  B, T, N, H = q.shape
  logits = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(H)
  for i in range(T):
    for j in range(T):
      for n in range(N):
        logits[:, n, i, j] += bias_fn(i, j, n) if j <= i else -np.inf
  w = np.exp(logits - logits.max(-1, keepdims=True))
  return w / w.sum(-1, keepdims=True)


def _t5_bucket(i, j):
  """T5's causal bucket (Raffel et al. 2020; Mesh TensorFlow), 32 buckets, distance 128."""
  n = max(i - j, 0)
  if n < 16:
    return n
  return min(31, 16 + int(math.log(n / 16) / math.log(128 / 16) * 16))


def _sown_first_layer(model, params, tokens, **kwargs):
  _, sown = model.apply({"params": params}, tokens, sow_weights=True,
                        mutable=["intermediates"], **kwargs)
  return np.asarray(sown["intermediates"]["decoder"]["layer_0"]["self_attention"]
                    ["attention_weights"][0])


@pytest.mark.parametrize("position", ["alibi", "t5", "fire", "hard_alibi"])
def test_position_biases_match_their_papers_formulas(position):
  windows = (1, 3, None, 6)
  model = models.DecoderOnly(_config(num_layers=1, position=position,
                                     hard_alibi_windows=windows if position == "hard_alibi"
                                     else None))
  tokens = _tokens(0, (2, 40))
  params = jax.jit(model.init)(jax.random.key(1), tokens)["params"]
  layer = params["decoder"]["layer_0"]
  if position == "t5":
    layer["t5_relative_bias"] = jax.random.normal(jax.random.key(2), (32, 4))
  if position == "fire":  # c = 0.5 and L = 8: the threshold binds for the first 8 queries.
    layer["fire_c"] = jnp.float32(0.5)
    layer["fire_threshold_multiplier"] = jnp.float32(8 / 512)
  p = jax.tree.map(np.asarray, layer)

  def fire(i, j, n):  # Li et al. 2024, eq. for FIRE with psi(x) = log(c x + 1)
    psi = lambda x: math.log(abs(0.5 * x) + 1)  # noqa: E731
    x = psi(i - j) / (psi(max(8.0, i)) + 1e-6)
    hidden = np.maximum(x * p["fire_kernel_in"][0] + p["fire_bias_in"], 0)
    return hidden @ p["fire_kernel_out"][:, n] + p["fire_bias_out"][n]

  bias_fn = {
      "alibi": lambda i, j, n: -(2.0 ** (-8 * (n + 1) / 4)) * (i - j),  # Press et al. 2022
      "t5": lambda i, j, n: p["t5_relative_bias"][_t5_bucket(i, j), n],
      "fire": fire,
      # Jelassi et al. 2024: head n sees only its last windows[n] keys.
      "hard_alibi": lambda i, j, n: 0.0 if windows[n] is None or i - j < windows[n]
      else -np.inf,
  }[position]
  want = _naive_first_layer_weights(params, tokens, bias_fn)
  got = _sown_first_layer(model, params, tokens)
  np.testing.assert_allclose(got, want, rtol=2e-4, atol=1e-6)


def _t5_two_sided_bucket(i, j):
  """T5's bidirectional bucket (Mesh TensorFlow): 16 per direction, exact below 8."""
  n = i - j
  bucket, n = (16 if n < 0 else 0), abs(n)
  if n < 8:
    return bucket + n
  return bucket + min(15, 8 + int(math.log(n / 8) / math.log(128 / 8) * 8))


@pytest.mark.parametrize("position", ["alibi", "t5", "fire", "hard_alibi", "t5_windowed"])
def test_position_biases_read_given_ids_in_their_two_sided_form(position):
  # Ids that do not increase along the sequence (as coupled ids): each scheme takes the
  # distance between ids, both ways (Ruoss et al. 2023; Cho et al. 2024).
  windows = (1, 3, None, 6)
  windowed = position in ("hard_alibi", "t5_windowed")
  position = position.removesuffix("_windowed")
  model = models.DecoderOnly(_config(num_layers=1, position=position,
                                     hard_alibi_windows=windows if windowed else None))
  tokens = _tokens(0, (2, 12))
  ids = np.array([[5, 6, 7, 8, 9, 4, 5, 6, 7, 8, 9, 10],
                  [30, 31, 32, 33, 29, 33, 32, 31, 30, 29, 28, 40]], np.int32)
  params = jax.jit(model.init)(jax.random.key(1), tokens, positions=ids)["params"]
  layer = params["decoder"]["layer_0"]
  if position == "t5":
    layer["t5_relative_bias"] = jax.random.normal(jax.random.key(2), (32, 4))
  if position == "fire":
    layer["fire_c"] = jnp.float32(0.5)
    layer["fire_threshold_multiplier"] = jnp.float32(8 / 512)
  p = jax.tree.map(np.asarray, layer)

  def fire(i, j, n):
    psi = lambda x: math.log(abs(0.5 * x) + 1)  # noqa: E731
    x = psi(i - j) / (psi(max(8.0, i)) + 1e-6)
    hidden = np.maximum(x * p["fire_kernel_in"][0] + p["fire_bias_in"], 0)
    return hidden @ p["fire_kernel_out"][:, n] + p["fire_bias_out"][n]

  bias_fn = {
      "alibi": lambda i, j, n: -(2.0 ** (-8 * (n + 1) / 4)) * abs(i - j),
      "t5": lambda i, j, n: p["t5_relative_bias"][_t5_two_sided_bucket(i, j), n],
      "fire": fire,
      "hard_alibi": lambda i, j, n: 0.0 if windows[n] is None or abs(i - j) < windows[n]
      else -np.inf,
  }[position]
  if windowed and position != "hard_alibi":  # The bias inside two-sided windows.
    bias_fn = lambda i, j, n, inner=bias_fn: (  # noqa: E731
        inner(i, j, n) if windows[n] is None or abs(i - j) < windows[n] else -np.inf)
  got = _sown_first_layer(model, params, tokens, positions=jnp.asarray(ids))
  for b in range(2):
    want = _naive_first_layer_weights(
        params, tokens[b:b + 1], lambda i, j, n, b=b: bias_fn(ids[b, i], ids[b, j], n))
    np.testing.assert_allclose(got[b:b + 1], want, rtol=2e-4, atol=1e-6)


def test_learned_positions_and_given_position_ids():
  model = models.DecoderOnly(_config(num_layers=1, position="learned", max_position=30))
  tokens = _tokens(0, (2, 7))
  positions = jnp.array([[0, 3, 4, 9, 10, 20, 29], [1, 2, 3, 4, 5, 6, 7]])
  params = jax.jit(model.init)(jax.random.key(1), tokens, positions=positions)["params"]
  want = _naive_first_layer_weights(params, tokens, lambda i, j, n: 0.0, positions)
  got = _sown_first_layer(model, params, tokens, positions=positions)
  np.testing.assert_allclose(got, want, rtol=2e-4, atol=1e-6)


def test_rotary_with_given_ids_depends_only_on_their_differences():
  model = models.DecoderOnly(_config(position="rotary"))
  tokens = _tokens(0, (2, 6))
  params = jax.jit(model.init)(jax.random.key(1), tokens)["params"]
  apply = jax.jit(lambda pos: model.apply({"params": params}, tokens, positions=pos))
  ids = jnp.array([[0, 2, 3, 7, 8, 12], [1, 5, 6, 9, 11, 14]])
  np.testing.assert_allclose(apply(ids), apply(ids + 17), rtol=1e-4, atol=1e-4)
  assert np.abs(apply(ids) - apply(jnp.broadcast_to(jnp.arange(6), (2, 6)))).max() > 1e-3


def test_position_scheme_errors():
  with pytest.raises(ValueError, match="position='learned' needs max_position >= 1"):
    _config(position="learned")
  with pytest.raises(ValueError, match="hard_alibi_windows: one window >= 1 or None per head"):
    _config(position="hard_alibi", hard_alibi_windows=(1, 2))
  with pytest.raises(ValueError, match=r"hard_alibi_windows apply to positions \('alibi'"):
    _config(position="rotary", hard_alibi_windows=(1, 2, None, 3))
  with pytest.raises(ValueError, match="position='nope' needs arch='decoder_only'"):
    models.make_model("encoder_decoder", _config(position="nope"))
  for bad in (8, 16.0, True):
    with pytest.raises(ValueError, match=f"t5_max_distance must be an int above the 8 exact "
                       f"buckets.*got {bad!r}"):
      _config(position="t5", t5_max_distance=bad)
  assert set(models.POSITION_SCHEMES) == set(models.POSITIONS)
