"""Tests for `attnjax.nnx` against the Linen modules, Flax's NNX attention and closed forms.

Shapes: inputs `[..., T, D]` (keys/values `[..., S, Dkv]`), projected heads `[..., L, N, H]`,
masks and attention weights `[..., N, T, S]`; True in a mask means attend. Test data comes
from NumPy (eager `jax.random` compiles once per shape) and modules run under `nnx.jit`.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import attnjax
from attnjax import linen
from attnjax import nnx as attn_nnx

F32_TOL = dict(rtol=2e-5, atol=2e-5)


def normal(seed, shape, scale=1.0):
  return (scale * np.random.default_rng(seed).standard_normal(shape)).astype(np.float32)


def random_module(make, seed=10):
  """`make()` with random parameters; only its shapes are initialised (eager init is slow)."""
  module = nnx.eval_shape(make)
  return module, randomize(module, seed)


def randomize(module, seed=10):
  """Sets every parameter of `module` to random values (non-zero biases included)."""
  params = nnx.to_pure_dict(nnx.state(module, nnx.Param))
  leaves, tree = jax.tree.flatten(params)
  new = tree.unflatten([normal(seed + i, a.shape, 0.4) for i, a in enumerate(leaves)])
  nnx.update(module, new)
  return new


def visible_first_key(mask):
  """`mask` with no empty rows (flax's attention averages those, attnjax gives zeros)."""
  return mask | (np.arange(mask.shape[-1]) == 0)


# name: (batch shape, T, S, Dkv, num_kv_heads, mask kind, extra module options).
CASES = {
    "self": ((2,), 5, 5, None, None, None, {}),
    "self_causal_no_batch": ((), 5, 5, None, None, "causal", {}),
    "cross_mask_two_batch_dims": ((3, 2), 5, 7, 6, None, "random", {}),
    "gqa_self_mask": ((2,), 5, 5, None, 2, "random", {}),
    "mqa_cross_no_bias": ((2,), 5, 7, 6, 1, None, dict(use_bias=False)),
    "rotary_causal_gqa": ((2,), 5, 5, None, 2, "causal", dict(rotary=True)),
    "rotary_cross_head_dim": ((2,), 5, 7, 6, None, "random", dict(rotary=True, head_dim=6,
                                                                   out_features=6)),
}


@pytest.mark.parametrize("name", CASES.keys())
def test_same_params_and_outputs_as_linen_and_flax(name):
  batch, T, S, Dkv, K, mask_kind, options = CASES[name]
  D, N = 8, 4
  x_q = normal(0, batch + (T, D))
  x_kv = normal(1, batch + (S, Dkv)) if Dkv else None
  mask = visible_first_key(normal(2, batch + (N, T, S)) > 0) if mask_kind == "random" else None
  is_causal = mask_kind == "causal"
  def make():
    return attn_nnx.MultiHeadAttention(D, N, num_kv_heads=K, kv_features=Dkv, **options,
                                       rngs=nnx.Rngs(0))

  # Only one case initialises for real (slow): the others take the shapes.
  ours = make() if name == "self" else nnx.eval_shape(make)
  ours_linen = linen.MultiHeadAttention(N, num_kv_heads=K, **options)
  linen_shapes = jax.eval_shape(ours_linen.init, jax.random.key(0), x_q, x_kv)["params"]
  nnx_params = nnx.to_pure_dict(nnx.state(ours, nnx.Param))
  assert jax.tree.map(np.shape, nnx_params) == jax.tree.map(np.shape, linen_shapes)
  theirs = None
  if "rotary" not in options and "head_dim" not in options:  # Flax's module has neither.
    theirs = nnx.eval_shape(lambda: nnx.MultiHeadAttention(
        N, D, num_kv_heads=K, in_kv_features=Dkv, decode=False, keep_rngs=False,
        use_bias=options.get("use_bias", True), rngs=nnx.Rngs(1)))

  @nnx.jit
  def run(module, flax_module, linen_params):
    kwargs = dict(mask=mask, is_causal=is_causal)
    return (module(x_q, x_kv, **kwargs),
            ours_linen.apply({"params": linen_params}, x_q, x_kv, **kwargs),
            None if flax_module is None else flax_module(x_q, x_kv, **kwargs))

  # NNX's own initial parameters into Linen, then random Linen-tree parameters into NNX.
  ports = ("nnx_to_linen", "linen_to_nnx") if name == "self" else ("linen_to_nnx",)
  for port in ports:
    params = ours.params_dict() if port == "nnx_to_linen" else randomize(ours)
    if theirs is not None:
      nnx.update(theirs, nnx.state(ours, nnx.Param))
    out, expected, flax_out = run(ours, theirs, params)
    assert out.shape == batch + (T, options.get("out_features", D))
    np.testing.assert_allclose(out, expected, **F32_TOL)
    if theirs is not None:
      np.testing.assert_allclose(out, flax_out, **F32_TOL)
  jax.tree.map(np.testing.assert_array_equal, ours.params_dict(),
               nnx.to_pure_dict(nnx.state(ours, nnx.Param)))
  if name == "self":  # Eagerly too.
    np.testing.assert_allclose(ours(x_q), out, **F32_TOL)


FLAX_TOL = dict(rtol=1e-6, atol=1e-6)


def sharpened_attention(query, key, value, mask=None, precision=None, **unused):
  """An `attention_fn` for Flax's NNX module (which passes it every option): Flax's attention
  at twice the logit scale."""
  del unused
  return nn.dot_product_attention(2.0 * query, key, value, mask=mask, precision=precision)


# name: (module options for both, cross-attention inputs: None, "k" or "k_and_v").
FLAX_OPTION_CASES = {
    "normalize_qk": (dict(normalize_qk=True), None),
    "normalize_qk_gqa_cross": (dict(normalize_qk=True, num_kv_heads=2), "k"),
    "inputs_k_and_inputs_v": ({}, "k_and_v"),
    "precision": (dict(precision=jax.lax.Precision.HIGHEST), "k_and_v"),
    "attention_fn": (dict(attention_fn=sharpened_attention), "k"),
    "dropout_keep_rngs_false": (dict(dropout_rate=0.5, keep_rngs=False), "k_and_v"),
}


DROPOUT_KEY = jax.random.key(4, impl="rbg")  # rbg compiles faster than threefry.


@pytest.mark.parametrize("name", FLAX_OPTION_CASES.keys())
def test_flax_options_match_flax_module(name):
  options, cross = FLAX_OPTION_CASES[name]
  D, Dkv, N, T, S = 8, 6, 4, 5, 7
  x_q = normal(0, (2, T, D))
  inputs = [x_q]
  if cross:
    inputs += [normal(1, (2, S, Dkv))] + ([normal(2, (2, S, Dkv))] if cross == "k_and_v" else [])
  mask = visible_first_key(normal(3, (2, N, T, S if cross else T)) > 0)
  kv_features = Dkv if cross else None
  ours, _ = random_module(lambda: attn_nnx.MultiHeadAttention(
      D, N, kv_features=kv_features, **options, rngs=nnx.Rngs(0)))
  theirs = nnx.eval_shape(lambda: nnx.MultiHeadAttention(
      N, D, in_kv_features=kv_features, decode=False, broadcast_dropout=False, **options,
      rngs=nnx.Rngs(1)))
  assert jax.tree.map(np.shape, nnx.to_pure_dict(nnx.state(ours, nnx.Param))) == jax.tree.map(
      np.shape, nnx.to_pure_dict(nnx.state(theirs, nnx.Param)))
  nnx.update(theirs, nnx.state(ours, nnx.Param))
  dropout = "dropout_rate" in options

  @nnx.jit
  def run(ours, theirs):
    # A fresh stream of the same seed for each module: the same dropout key.
    kwargs = dict(mask=mask, deterministic=False) if dropout else dict(mask=mask)
    rngs = (lambda: dict(rngs=nnx.Rngs(dropout=DROPOUT_KEY))) if dropout else dict
    return theirs(*inputs, **kwargs, **rngs()), ours(*inputs, **kwargs, **rngs())

  expected, out = run(ours, theirs)
  np.testing.assert_allclose(out, expected, **FLAX_TOL)
  if dropout:
    stream = nnx.Rngs(dropout=DROPOUT_KEY)["dropout"]  # A stream alone does too.
    np.testing.assert_allclose(ours(*inputs, mask=mask, deterministic=False, rngs=stream), out,
                               **FLAX_TOL)
    assert not np.allclose(ours(*inputs, mask=mask, deterministic=True), out, atol=1e-3)
    with pytest.raises(ValueError, match="keep_rngs=False"):
      ours(*inputs, mask=mask, deterministic=False)
  if name == "precision":  # Every einsum (projections, logits, weights times values).
    jaxpr = str(jax.make_jaxpr(lambda *x: ours(*x, mask=mask))(*inputs))
    assert jaxpr.count("dot_general") == 6
    assert jaxpr.count("precision=(Precision.HIGHEST, Precision.HIGHEST)") == 6


def test_initial_parameters_are_flaxs_with_qk_norm_and_output_initialisers():
  options = dict(normalize_qk=True, out_kernel_init=nnx.initializers.normal(3.0),
                 out_bias_init=nnx.initializers.uniform(2.0))
  ours = attn_nnx.MultiHeadAttention(8, 2, kv_features=6, **options, rngs=nnx.Rngs(0))
  theirs = nnx.MultiHeadAttention(2, 8, in_kv_features=6, decode=False, **options,
                                  rngs=nnx.Rngs(0))
  params = nnx.to_pure_dict(nnx.state(ours, nnx.Param))
  jax.tree.map(np.testing.assert_array_equal, params,
               nnx.to_pure_dict(nnx.state(theirs, nnx.Param)))
  assert np.std(params["out"]["kernel"]) > 1.0 and np.all(params["out"]["bias"] != 0)
  np.testing.assert_array_equal(params["query_ln"]["scale"], np.ones(4))
  jax.tree.map(np.testing.assert_array_equal, ours.params_dict(), params)


def test_sow_weights_records_an_intermediate():
  N, T, S = 2, 5, 7
  x_q, x_kv = normal(0, (2, T, 8)), normal(1, (2, S, 6))
  mask = visible_first_key(normal(2, (2, 1, T, S)) > -0.5)
  module, p = random_module(
      lambda: attn_nnx.MultiHeadAttention(8, N, kv_features=6, rngs=nnx.Rngs(0)))

  @nnx.jit
  def run(module):
    sown, sown_state = nnx.capture(module, nnx.Intermediate)(x_q, x_kv, mask=mask,
                                                             sow_weights=True)
    plain, plain_state = nnx.capture(module, nnx.Intermediate)(x_q, x_kv, mask=mask)
    return sown, sown_state, plain, plain_state

  out, state, plain, plain_state = run(module)
  (weights,) = nnx.to_pure_dict(state)["attention_weights"]
  assert weights.shape == (2, N, T, S)
  q = np.einsum("btd,dnh->btnh", x_q, p["query"]["kernel"]) + p["query"]["bias"]
  k = np.einsum("bsd,dnh->bsnh", x_kv, p["key"]["kernel"]) + p["key"]["bias"]
  np.testing.assert_allclose(weights, jax.jit(attnjax.attention_weights)(q, k, mask=mask),
                             **F32_TOL)
  np.testing.assert_allclose(out, plain, **F32_TOL)
  assert "attention_weights" not in plain_state
  assert not nnx.to_pure_dict(nnx.state(module, nnx.Intermediate))  # Nothing left behind.


def test_dropout_train_and_eval():
  x = normal(0, (2, 5, 8))
  # The rbg generator compiles much faster than the default threefry.
  keys = jax.random.split(jax.random.key(0, impl="rbg"), 3)
  module = attn_nnx.MultiHeadAttention(8, 2, dropout_rate=0.5,
                                       rngs=nnx.Rngs(params=keys[0], dropout=keys[1]))
  params = randomize(module)
  with pytest.raises(ValueError, match="deterministic"):
    module(x)
  call = nnx.jit(lambda m, **kw: m(x, **kw), static_argnames="deterministic")
  # A call-time stream decides the dropout mask: the pure function with the same key.
  reference, expected = jax.jit(lambda params, key: (
      attnjax.multi_head_attention(params, x),
      attnjax.multi_head_attention(params, x, dropout_rate=0.5, dropout_rng=key)))(
          params, nnx.Rngs(dropout=keys[2])["dropout"]())
  module.eval()
  np.testing.assert_allclose(call(module), reference, **F32_TOL)
  module.train()
  first, second = call(module), call(module)  # The module's dropout stream advances.
  assert not np.allclose(first, reference, atol=1e-3)
  assert not np.allclose(first, second, atol=1e-3)
  np.testing.assert_allclose(call(module, deterministic=True), reference, **F32_TOL)
  given = call(module, rngs=nnx.Rngs(dropout=keys[2]))
  np.testing.assert_allclose(given, expected, **F32_TOL)
  assert not np.allclose(given, first, atol=1e-3)


def test_decode_in_chunks_equals_full_causal_attention():
  options, chunks = dict(num_kv_heads=1, rotary=True), [2, 3, 1]
  x = normal(0, (2, sum(chunks), 8))
  module, params = random_module(
      lambda: attn_nnx.MultiHeadAttention(8, 2, decode=True, **options, rngs=nnx.Rngs(0)))
  with pytest.raises(ValueError, match="init_cache"):
    module(x[:, :1])
  module.init_cache(x.shape)
  step = nnx.jit(lambda m, x: m(x))
  outs, start = [], 0
  for size in chunks:
    outs.append(step(module, x[:, start:start + size]))
    start += size
  assert module.cache_index[...] == x.shape[1]
  assert module.cached_key[...].shape == (2, 6, 1, 4)
  full = jax.jit(functools.partial(attnjax.multi_head_attention, is_causal=True, rotary=True))
  np.testing.assert_allclose(np.concatenate(outs, axis=1), full(params, x), **F32_TOL)


def test_decode_under_x64_equals_full_causal_attention():
  x = normal(0, (2, 4, 8))
  module, params = random_module(
      lambda: attn_nnx.MultiHeadAttention(8, 2, decode=True, rngs=nnx.Rngs(0)))
  module.init_cache(x.shape)
  with jax.enable_x64(True):
    step = nnx.jit(lambda m, x: m(x))
    outs = [step(module, x[:, start:stop]) for start, stop in ((0, 1), (1, 3), (3, 4))]
    full = attnjax.multi_head_attention(params, x, is_causal=True)
  np.testing.assert_allclose(np.concatenate(outs, axis=1), full, **F32_TOL)
  assert module.cache_index[...] == x.shape[1]


def test_decode_in_bfloat16_keeps_a_bfloat16_cache():
  x = normal(0, (2, 3, 8))
  module = attn_nnx.MultiHeadAttention(8, 2, dtype=jnp.bfloat16, decode=True, rngs=nnx.Rngs(0))
  module.init_cache(x.shape)
  step = nnx.jit(lambda m, x: m(x))
  outs = [step(module, x[:, i:i + 1]) for i in range(3)]
  assert module.cached_key[...].dtype == jnp.bfloat16 and outs[-1].dtype == jnp.bfloat16
  full = attnjax.multi_head_attention(module.params_dict(), x, is_causal=True)
  np.testing.assert_allclose(np.concatenate(outs, axis=1).astype(np.float32), full, atol=3e-2)


def test_decode_matches_flax_nnx_decode():
  x = normal(0, (2, 4, 8))
  ours, params = random_module(lambda: attn_nnx.MultiHeadAttention(8, 2, decode=True,
                                                                   rngs=nnx.Rngs(0)))
  theirs = nnx.eval_shape(lambda: nnx.MultiHeadAttention(2, 8, decode=True, keep_rngs=False,
                                                         rngs=nnx.Rngs(1)))
  nnx.update(theirs, nnx.state(ours, nnx.Param))
  ours.init_cache(x.shape)
  theirs.init_cache(x.shape)
  step = nnx.jit(lambda m, x: m(x))
  outs = []
  for i in range(x.shape[1]):
    outs.append(step(ours, x[:, i:i + 1]))
    np.testing.assert_allclose(outs[-1], step(theirs, x[:, i:i + 1]), **F32_TOL)
  full = jax.jit(functools.partial(attnjax.multi_head_attention, is_causal=True))(params, x)
  np.testing.assert_allclose(np.concatenate(outs, axis=1), full, **F32_TOL)
  for name in ("cached_key", "cached_value", "cache_index"):
    np.testing.assert_allclose(getattr(ours, name)[...], getattr(theirs, name)[...], **F32_TOL)


def test_head_dim_default_needs_divisible_width():
  with pytest.raises(ValueError, match="multiple of num_heads=3"):
    attn_nnx.MultiHeadAttention(8, 3, rngs=nnx.Rngs(0))
  module = nnx.eval_shape(lambda: attn_nnx.MultiHeadAttention(8, 3, head_dim=5,
                                                              rngs=nnx.Rngs(0)))
  assert module.query.kernel.shape == (8, 3, 5)


def test_bad_head_counts_and_dropout_rates_are_refused_at_construction():
  with pytest.raises(ValueError, match="num_heads=4 and num_kv_heads=3"):
    attn_nnx.MultiHeadAttention(8, 4, num_kv_heads=3, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="dropout_rate must be in"):
    attn_nnx.MultiHeadAttention(8, 4, dropout_rate=-0.1, rngs=nnx.Rngs(0))


def sinusoids(positions, layout, dim=8, max_timescale=100.0):
  """Closed form as the real and imaginary parts of ``exp(i p w)`` per frequency w."""
  i = np.arange(dim // 2)
  if layout == "interleaved":  # w_i = 1 / max_timescale^(2i/d), columns (sin, cos) pairs.
    waves = np.exp(1j * np.asarray(positions)[..., None] * max_timescale ** (-2 * i / dim))
    return np.stack([waves.imag, waves.real], axis=-1).reshape(waves.shape[:-1] + (dim,))
  # [sin | cos] with w_i = max_timescale^(-i / (d/2 - 1)).
  waves = np.exp(1j * np.asarray(positions)[..., None] * max_timescale ** (-i / (dim // 2 - 1)))
  return np.concatenate([waves.imag, waves.real], axis=-1)


@pytest.mark.parametrize("layout", ["interleaved", "concat"])
def test_sinusoidal_embedding_adds_the_closed_form(layout):
  x = normal(0, (2, 6, 8))
  positions = np.array([[3, 4, 5, 6, 7, 8], [0, 0, 1, 2, 10, 11]])
  module = attn_nnx.SinusoidalPositionEmbedding(max_timescale=100.0, layout=layout)
  out = nnx.jit(lambda m, x, p: m(x, p))(module, x, positions)
  np.testing.assert_allclose(out, x + sinusoids(positions, layout), **F32_TOL)
  np.testing.assert_allclose(module(x), x + sinusoids(np.arange(6), layout), **F32_TOL)


@pytest.mark.parametrize("layout", ["half", "interleaved"])
def test_rotary_embedding_is_apply_rotary(layout):
  x = normal(0, (2, 6, 3, 4))
  positions = np.array([[5, 6, 7, 8, 9, 10], [2, 4, 6, 8, 10, 12]])
  module = attn_nnx.RotaryPositionEmbedding(max_timescale=50.0, layout=layout)
  rotate = jax.jit(functools.partial(attnjax.apply_rotary, max_timescale=50.0, layout=layout))
  out = nnx.jit(lambda m, x, p: m(x, p))(module, x, positions)
  np.testing.assert_allclose(out, rotate(x, positions), **F32_TOL)
  assert not np.allclose(out, rotate(x, np.arange(6)), atol=1e-3)
  np.testing.assert_allclose(module(x), rotate(x, np.arange(6)), **F32_TOL)


def test_sinks_score_mod_and_process_heads_match_linen():
  from attnjax import masks, positional, score_mods
  x = np.random.default_rng(0).normal(size=(2, 6, 8)).astype(np.float32)
  alibi = score_mods.ALiBi(score_mods.alibi_slopes(2))
  options = dict(sinks=True, score_mod=alibi, process_heads=positional.rotary_heads(50.0))
  module = attn_nnx.MultiHeadAttention(8, 2, rngs=nnx.Rngs(0), **options)
  assert module.sinks[...].shape == (2,)
  module.sinks[...] = jnp.array([0.5, -1.0])
  linen_module = linen.MultiHeadAttention(num_heads=2, **options)
  params = module.params_dict()
  mask = masks.Chunked(4) & masks.Causal()
  got = nnx.jit(lambda m: m(x, mask=mask))(module)
  want = linen_module.apply({"params": params}, x, mask=mask)
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
  grads = nnx.grad(lambda m: jnp.sum(m(x) ** 2))(module)
  assert np.all(np.asarray(grads.sinks[...]) != 0)
