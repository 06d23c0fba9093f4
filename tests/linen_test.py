"""Tests for `attnjax.linen` against `flax.linen.MultiHeadDotProductAttention` and closed forms.

Shapes: inputs `[..., T, D]` (keys/values `[..., S, Dkv]`), projected heads `[..., L, N, H]`,
masks and attention weights `[..., N, T, S]`; True in a mask means attend. Test data comes
from NumPy (eager `jax.random` compiles once per shape) and modules run under `jax.jit`.
"""

import functools

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attnjax
from attnjax import linen

F32_TOL = dict(rtol=2e-5, atol=2e-5)
BF16_TOL = dict(rtol=2e-2, atol=2e-2)


def normal(seed, shape, scale=1.0):
  return (scale * np.random.default_rng(seed).standard_normal(shape)).astype(np.float32)


def random_variables(module, *inputs, seed=0, **kwargs):
  """Random variables (non-zero biases included) of the shapes `module.init` gives."""
  shapes = jax.eval_shape(functools.partial(module.init, **kwargs), jax.random.key(0), *inputs)
  leaves, tree = jax.tree.flatten(shapes)
  return tree.unflatten([normal(seed + i, a.shape, 0.4).astype(a.dtype)
                         for i, a in enumerate(leaves)])


def projections(params, x_q, x_kv):
  """Queries and keys `[..., L, N, H]` projected by hand."""
  q = np.einsum("...td,dnh->...tnh", x_q, params["query"]["kernel"]) + params["query"]["bias"]
  k = np.einsum("...sd,dnh->...snh", x_kv, params["key"]["kernel"]) + params["key"]["bias"]
  return q, k


# name: (batch shape, T, S, Dkv, mask kind, module options); Dkv None means self-attention.
FLAX_CASES = {
    "self": ((2,), 5, 5, None, None, {}),
    "self_causal_no_batch": ((), 5, 5, None, "causal", {}),
    "self_mask_no_bias_out_features": ((2,), 5, 5, None, "random", dict(use_bias=False,
                                                                        out_features=6)),
    "cross_mask_two_batch_dims": ((3, 2), 5, 7, 6, "random", {}),
    "cross_head_dim": ((2,), 5, 7, 6, None, dict(head_dim=3)),
}
FLAX_INIT = ("self", "cross_head_dim")


@pytest.mark.parametrize("name", FLAX_CASES.keys())
def test_matches_flax_module_with_params_ported_both_ways(name):
  batch, T, S, Dkv, mask_kind, options = FLAX_CASES[name]
  D, N = 8, 2
  flax_options = dict(options)
  if "head_dim" in options:
    flax_options["qkv_features"] = N * flax_options.pop("head_dim")
  ours = linen.MultiHeadAttention(num_heads=N, **options)
  theirs = nn.MultiHeadDotProductAttention(num_heads=N, **flax_options)
  x_q = normal(0, batch + (T, D))
  x_kv = None if Dkv is None else normal(1, batch + (S, Dkv))
  mask = None
  if mask_kind == "random":
    mask = np.random.default_rng(2).random(batch + (N, T, S)) < 0.6
    mask[..., 0] = True
  elif mask_kind == "causal":
    mask = np.asarray(attnjax.causal_mask(T))

  @jax.jit
  def run(variables):
    return [(theirs.apply(v, x_q, x_kv, mask=mask), ours.apply(v, x_q, x_kv, mask=mask))
            for v in variables]

  variables = [random_variables(ours, x_q, x_kv)]
  if name in FLAX_INIT:
    # The same names, shapes and, from the same rng, the same initial values.
    rng = jax.random.key(3, impl="rbg")  # Faster to compile than the default threefry.
    our_init = jax.jit(ours.init)(rng, x_q, x_kv)
    flax_init = jax.jit(theirs.init)(rng, x_q, x_kv)
    jax.tree.map(np.testing.assert_array_equal, our_init, flax_init)
    variables.append(flax_init)
  else:
    assert jax.tree.map(np.shape, variables[0]) == jax.tree.map(
        np.shape, jax.eval_shape(theirs.init, jax.random.key(3), x_q, x_kv))
  results = run(variables)
  for expected, out in results:
    assert out.shape == batch + (T, options.get("out_features", D))
    np.testing.assert_allclose(out, expected, **F32_TOL)
  if name == "self":  # Eagerly too.
    np.testing.assert_allclose(ours.apply(variables[0], x_q), results[0][0], **F32_TOL)


def test_custom_initialisers_see_flattened_kernels_as_flax():
  def kernel_init(rng, shape, dtype):
    del rng
    assert len(shape) == 2, shape  # DenseGeneral's flattened (fan_in, fan_out).
    return (jnp.arange(shape[0] * shape[1], dtype=dtype).reshape(shape) % 5 - 2) / shape[0]

  def bias_init(rng, shape, dtype):
    del rng
    assert len(shape) == 1, shape  # DenseGeneral's flattened (fan_out,).
    return jnp.linspace(-1, 1, shape[0], dtype=dtype)

  x_q, x_kv = normal(0, (2, 3, 8)), normal(1, (2, 5, 6))
  options = dict(num_heads=2, kernel_init=kernel_init, bias_init=bias_init)
  ours = jax.jit(linen.MultiHeadAttention(**options).init)(jax.random.key(0), x_q, x_kv)
  theirs = jax.jit(nn.MultiHeadDotProductAttention(**options).init)(jax.random.key(0), x_q,
                                                                     x_kv)
  jax.tree.map(np.testing.assert_array_equal, ours, theirs)
  kernel = ours["params"]["out"]["kernel"]
  np.testing.assert_array_equal(kernel, kernel_init(None, (8, 8), jnp.float32).reshape(2, 4, 8))


FLAX_TOL = dict(rtol=1e-6, atol=1e-6)


def sharpened_attention(query, key, value, mask=None, precision=None):
  """A Flax-style `attention_fn`: Flax's attention at twice the logit scale."""
  return nn.dot_product_attention(2.0 * query, key, value, mask=mask, precision=precision)


# name: (module options, the widths of inputs_k and inputs_v (None: not passed), call options).
# The same options go to Flax's module (with broadcast_dropout=False, so that its dropout mask
# is drawn as attnjax's).
FLAX_OPTION_CASES = {
    "normalize_qk": (dict(normalize_qk=True), (None, None), {}),
    "normalize_qk_cross": (dict(normalize_qk=True, use_bias=False), (6, None), {}),
    "inputs_k_and_inputs_v": ({}, (6, 3), {}),
    "precision": (dict(precision=jax.lax.Precision.HIGHEST), (6, 3), {}),
    "attention_fn": (dict(attention_fn=sharpened_attention), (6, None), {}),
    "dropout_rng": (dict(dropout_rate=0.5), (6, 3), dict(deterministic=False)),
}


@pytest.mark.parametrize("name", FLAX_OPTION_CASES.keys())
def test_flax_options_match_flax_module(name):
  options, (Dk, Dv), call_options = FLAX_OPTION_CASES[name]
  N, T, S = 2, 5, 7
  x_q = normal(0, (2, T, 8))
  inputs = [x_q] + [normal(i, (2, S, d)) for i, d in ((1, Dk), (2, Dv)) if d is not None]
  mask = np.random.default_rng(3).random((2, N, T, S if Dk else T)) < 0.6
  mask[..., 0] = True  # No empty rows: flax would average them, attnjax gives zeros.
  ours = linen.MultiHeadAttention(num_heads=N, **options)
  theirs = nn.MultiHeadDotProductAttention(num_heads=N, broadcast_dropout=False, **options)
  variables = random_variables(theirs, *inputs, deterministic=True)
  assert jax.tree.map(np.shape, variables) == jax.tree.map(
      np.shape, jax.eval_shape(functools.partial(ours.init, deterministic=True),
                               jax.random.key(0), *inputs))
  if options.get("normalize_qk"):
    assert variables["params"]["query_ln"]["scale"].shape == (4,)
  call_options = dict(call_options, mask=mask)
  if "dropout_rate" in options:
    call_options["dropout_rng"] = jax.random.key(4, impl="rbg")  # rbg compiles fast.

  @jax.jit
  def run(variables):
    return (theirs.apply(variables, *inputs, **call_options),
            ours.apply(variables, *inputs, **call_options))

  expected, out = run(variables)
  np.testing.assert_allclose(out, expected, **FLAX_TOL)
  if name == "dropout_rng":  # Dropout did act, and the rng passed wins over the rngs.
    deterministic = jax.jit(functools.partial(ours.apply, mask=mask, deterministic=True))(
        variables, *inputs)
    assert not np.allclose(out, deterministic, atol=1e-3)
    with_rngs = ours.apply(variables, *inputs, **call_options,
                           rngs={"dropout": jax.random.key(5, impl="rbg")})
    np.testing.assert_allclose(with_rngs, out, **FLAX_TOL)
  if name == "precision":  # Every einsum (projections, logits, weights times values).
    jaxpr = str(jax.make_jaxpr(ours.apply)(variables, *inputs, mask=mask))
    assert jaxpr.count("dot_general") == 6
    assert jaxpr.count("precision=(Precision.HIGHEST, Precision.HIGHEST)") == 6


def test_inputs_kv_is_inputs_k_and_inputs_v():
  x_q, x_kv = normal(0, (2, 5, 8)), normal(1, (2, 7, 6))
  module = linen.MultiHeadAttention(num_heads=2)
  variables = random_variables(module, x_q, x_kv)
  run = jax.jit(lambda v: (module.apply(v, x_q, inputs_kv=x_kv), module.apply(v, x_q, x_kv),
                           module.apply(v, x_q, x_kv, x_kv)))
  by_kv, by_k, by_k_and_v = run(variables)
  np.testing.assert_array_equal(by_kv, by_k)
  np.testing.assert_array_equal(by_kv, by_k_and_v)
  with pytest.raises(ValueError, match="inputs_kv or inputs_k and inputs_v, not both"):
    module.apply(variables, x_q, x_kv, inputs_kv=x_kv)


def test_output_initialisers_are_flaxs():
  x_q, x_kv = normal(0, (2, 3, 8)), normal(1, (2, 5, 6))
  options = dict(num_heads=2, out_kernel_init=nn.initializers.normal(3.0),
                 out_bias_init=nn.initializers.uniform(2.0))
  rng = jax.random.key(0, impl="rbg")
  ours = jax.jit(linen.MultiHeadAttention(**options).init)(rng, x_q, x_kv)["params"]
  theirs = jax.jit(nn.MultiHeadDotProductAttention(**options).init)(rng, x_q, x_kv)["params"]
  jax.tree.map(np.testing.assert_array_equal, ours, theirs)
  default = jax.jit(linen.MultiHeadAttention(num_heads=2).init)(rng, x_q, x_kv)["params"]
  assert np.std(ours["out"]["kernel"]) > 5 * np.std(default["out"]["kernel"])
  assert np.all(ours["out"]["bias"] != 0) and not np.any(ours["query"]["bias"])
  np.testing.assert_array_equal(ours["query"]["kernel"], default["query"]["kernel"])


def test_sown_weights_are_the_attention_weights_of_the_projections():
  N, T, S = 2, 5, 7
  x_q, x_kv = normal(0, (2, T, 8)), normal(1, (2, S, 6))
  mask = np.random.default_rng(2).random((2, 1, T, S)) < 0.7
  mask[..., 0] = True  # No empty rows: flax would average them, attnjax gives zeros.
  ours = linen.MultiHeadAttention(num_heads=N)
  theirs = nn.MultiHeadDotProductAttention(num_heads=N)
  variables = random_variables(ours, x_q, x_kv)

  @jax.jit
  def run(variables):
    sown = ours.apply(variables, x_q, x_kv, mask=mask, sow_weights=True,
                      mutable=["intermediates"])
    not_sown = ours.apply(variables, x_q, x_kv, mask=mask, mutable=["intermediates"])
    flax_sown = theirs.apply(variables, x_q, x_kv, mask=mask, sow_weights=True,
                             mutable=["intermediates"])
    return sown, not_sown, flax_sown

  (out, state), (plain_out, plain_state), (_, flax_state) = run(variables)
  (weights,) = state["intermediates"]["attention_weights"]
  assert weights.shape == (2, N, T, S)
  q, k = projections(variables["params"], x_q, x_kv)
  np.testing.assert_allclose(weights, jax.jit(attnjax.attention_weights)(q, k, mask=mask),
                             **F32_TOL)
  # Flax sows its weights under the same name.
  np.testing.assert_allclose(weights, flax_state["intermediates"]["attention_weights"][0],
                             **F32_TOL)
  np.testing.assert_allclose(out, plain_out, **F32_TOL)
  assert "intermediates" not in plain_state


def test_dropout():
  x = normal(0, (2, 5, 8))
  ours = linen.MultiHeadAttention(num_heads=2, dropout_rate=0.5)
  variables = random_variables(ours, x, deterministic=True)
  with pytest.raises(ValueError, match="deterministic"):
    ours.apply(variables, x)
  with pytest.raises(flax.errors.InvalidRngError, match="dropout"):
    ours.apply(variables, x, deterministic=False)

  def dropped(key):
    return ours.apply(variables, x, deterministic=False, rngs={"dropout": key})

  @jax.jit
  def run(keys):
    return (linen.MultiHeadAttention(num_heads=2).apply(variables, x),
            ours.apply(variables, x, deterministic=True),
            ours.clone(deterministic=True).apply(variables, x),
            jax.vmap(dropped)(keys), dropped(keys[0]))

  keys = jax.random.split(jax.random.key(1, impl="rbg"), 2000)  # rbg compiles fast.
  reference, deterministic, deterministic_attribute, outs, first = run(keys)
  np.testing.assert_allclose(deterministic, reference, **F32_TOL)
  np.testing.assert_allclose(deterministic_attribute, reference, **F32_TOL)
  assert not np.allclose(outs[0], reference, atol=1e-3)
  assert not np.allclose(outs[0], outs[1], atol=1e-3)
  np.testing.assert_allclose(outs[0], first, **F32_TOL)  # The same rng, the same dropout.
  # Kept weights are rescaled by 1 / (1 - rate) and the output projection is affine, so the
  # mean over dropout masks is the output without dropout, within 5 standard errors.
  standard_error = outs.std(0) / np.sqrt(len(keys))
  assert np.all(np.abs(outs.mean(0) - reference) < 5 * standard_error)


@pytest.mark.parametrize("rate", [-0.1, 1.0])
def test_dropout_rate_outside_zero_one_is_refused(rate):
  module = linen.MultiHeadAttention(num_heads=2, dropout_rate=rate)
  with pytest.raises(ValueError, match="dropout_rate must be in"):
    module.init(jax.random.key(0), jnp.ones((3, 8)), deterministic=True)


def decode_steps(module, variables, x, chunks):
  """Applies a `decode=True` module chunk by chunk, returning the outputs and the cache."""
  step = jax.jit(lambda v, x: module.apply(v, x, mutable=["cache"]))
  outs, start = [], 0
  for size in chunks:
    out, mutated = step(variables, x[..., start:start + size, :])
    variables = {**variables, **mutated}
    outs.append(out)
    start += size
  return np.concatenate(outs, axis=-2), variables["cache"]


def test_decode_in_chunks_equals_full_causal_attention():
  options, chunks = dict(num_kv_heads=1, rotary=True), [2, 3, 1]
  x = normal(0, (2, sum(chunks), 8))
  module = linen.MultiHeadAttention(num_heads=2, decode=True, **options)
  variables = random_variables(module, x)
  variables["cache"] = jax.tree.map(np.zeros_like, variables["cache"])
  out, cache = decode_steps(module, variables, x, chunks)
  full = jax.jit(functools.partial(linen.MultiHeadAttention(num_heads=2, **options).apply,
                                   is_causal=True))
  np.testing.assert_allclose(out, full(variables, x), **F32_TOL)
  assert cache["cache_index"] == x.shape[-2]
  assert cache["cached_key"].shape == (2, 6, 1, 4)


def test_decode_under_x64_equals_full_causal_attention():
  x = normal(0, (2, 4, 8))
  module = linen.MultiHeadAttention(num_heads=2, decode=True, rotary=True)
  variables = random_variables(module, x)
  variables["cache"] = jax.tree.map(np.zeros_like, variables["cache"])
  with jax.enable_x64(True):
    out, cache = decode_steps(module, variables, x, [1, 2, 1])
    full = linen.MultiHeadAttention(num_heads=2, rotary=True).apply(variables, x, is_causal=True)
  np.testing.assert_allclose(out, full, **F32_TOL)
  assert cache["cache_index"] == x.shape[-2]


def test_decode_matches_flax_decode_and_its_cache():
  x = normal(0, (2, 5, 8))
  ours = linen.MultiHeadAttention(num_heads=2, decode=True)
  theirs = nn.MultiHeadDotProductAttention(num_heads=2, decode=True)
  variables = jax.jit(ours.init)(jax.random.key(0, impl="rbg"), x)
  jax.tree.map(np.testing.assert_array_equal, variables["cache"],
               jax.tree.map(np.zeros_like, jax.eval_shape(theirs.init, jax.random.key(0), x)
                            ["cache"]))
  variables["params"] = random_variables(ours, x)["params"]
  expected, flax_cache = decode_steps(theirs, variables, x, [1] * 5)
  out, cache = decode_steps(ours, variables, x, [1] * 5)
  np.testing.assert_allclose(out, expected, **F32_TOL)
  full = jax.jit(functools.partial(ours.clone(decode=False).apply, is_causal=True))
  np.testing.assert_allclose(out, full({"params": variables["params"]}, x), **F32_TOL)
  jax.tree.map(functools.partial(np.testing.assert_allclose, **F32_TOL), cache, flax_cache)


def test_decode_errors():
  x = jnp.ones((2, 4, 8))
  module = linen.MultiHeadAttention(num_heads=2, decode=True)
  variables = random_variables(module, x)
  with pytest.raises(ValueError, match="do not fit a cache"):
    module.apply(variables, jnp.ones((3, 1, 8)), mutable=["cache"])
  with pytest.raises(ValueError, match="self-attention"):
    module.apply(variables, x[:, :1], jnp.ones((2, 3, 8)), mutable=["cache"])


def test_bfloat16_computation_is_close_to_float32():
  x_q, x_kv = normal(0, (2, 5, 8)), normal(1, (2, 7, 6))
  module = linen.MultiHeadAttention(num_heads=2, rotary=True)
  variables = random_variables(module, x_q, x_kv)
  run = jax.jit(lambda v: (module.apply(v, x_q, x_kv),
                           module.clone(dtype=jnp.bfloat16).apply(v, x_q, x_kv)))
  expected, out = run(variables)
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(out.astype(np.float32), expected, **BF16_TOL)


def test_param_dtype_is_honoured():
  x = normal(0, (2, 5, 8))
  module = linen.MultiHeadAttention(num_heads=2, param_dtype=jnp.bfloat16)
  variables = random_variables(module, x)
  assert {a.dtype for a in jax.tree.leaves(variables)} == {jnp.dtype(jnp.bfloat16)}
  as_f32 = jax.tree.map(lambda a: a.astype(np.float32), variables)
  run = jax.jit(lambda v, v32: (module.apply(v, x),
                                linen.MultiHeadAttention(num_heads=2).apply(v32, x)))
  out, expected = run(variables, as_f32)
  # Float32 inputs promote the computation to float32: the same as float32 parameters that
  # hold the bfloat16 values.
  assert out.dtype == jnp.float32
  np.testing.assert_allclose(out, expected, **F32_TOL)


def test_head_dim_default_needs_divisible_width():
  x = jnp.ones((4, 8))
  with pytest.raises(ValueError, match="multiple of num_heads=3"):
    jax.eval_shape(linen.MultiHeadAttention(num_heads=3).init, jax.random.key(0), x)
  variables = jax.eval_shape(linen.MultiHeadAttention(num_heads=3, head_dim=5).init,
                             jax.random.key(0), x)
  assert variables["params"]["query"]["kernel"].shape == (8, 3, 5)


def sinusoids(positions, dim, max_timescale, layout):
  """Closed-form encodings ``[..., L, dim]``, one frequency (column pair) at a time."""
  positions = np.asarray(positions, np.float64)
  pe = np.zeros(positions.shape + (dim,))
  for i in range(dim // 2):
    if layout == "interleaved":  # The paper's PE(p, 2i) = sin(p / 10000^(2i/d)), cos.
      columns, angle = (2 * i, 2 * i + 1), positions / max_timescale ** (2 * i / dim)
    else:  # [sin | cos], timescales geometric from 1 to max_timescale.
      columns, angle = (i, i + dim // 2), positions / max_timescale ** (i / (dim // 2 - 1))
    pe[..., columns[0]], pe[..., columns[1]] = np.sin(angle), np.cos(angle)
  return pe


@pytest.mark.parametrize("layout", ["interleaved", "concat"])
def test_sinusoidal_embedding_adds_the_closed_form(layout):
  x = normal(0, (2, 6, 8))
  module = linen.SinusoidalPositionEmbedding(max_timescale=100.0, layout=layout)
  assert module.init(jax.random.key(0), x) == {}
  np.testing.assert_allclose(module.apply({}, x), x + sinusoids(np.arange(6), 8, 100.0, layout),
                             **F32_TOL)
  positions = np.array([[3, 4, 5, 6, 7, 8], [0, 0, 1, 2, 10, 11]])
  np.testing.assert_allclose(jax.jit(module.apply)({}, x, positions),
                             x + sinusoids(positions, 8, 100.0, layout), **F32_TOL)


@pytest.mark.parametrize("layout", ["half", "interleaved"])
def test_rotary_embedding_is_apply_rotary(layout):
  x = normal(0, (2, 6, 3, 4))
  module = linen.RotaryPositionEmbedding(max_timescale=50.0, layout=layout)
  rotate = jax.jit(functools.partial(attnjax.apply_rotary, max_timescale=50.0, layout=layout))
  np.testing.assert_allclose(module.apply({}, x), rotate(x, np.arange(6)), **F32_TOL)
  positions = np.array([[5, 6, 7, 8, 9, 10], [2, 4, 6, 8, 10, 12]])
  out = jax.jit(module.apply)({}, x, positions)
  np.testing.assert_allclose(out, rotate(x, positions), **F32_TOL)
  assert not np.allclose(out, rotate(x, np.arange(6)), atol=1e-3)


def test_sinks_score_mod_and_process_heads_are_the_pure_functions():
  from attnjax import positional, score_mods
  x = np.random.default_rng(0).normal(size=(2, 6, 8)).astype(np.float32)
  alibi = score_mods.ALiBi(score_mods.alibi_slopes(2))
  module = linen.MultiHeadAttention(num_heads=2, sinks=True, score_mod=alibi,
                                    process_heads=positional.rotary_heads(50.0))
  params = module.init(jax.random.key(0), x)["params"]
  assert params["sinks"].shape == (2,) and not np.any(params["sinks"])
  params = jax.tree.map(lambda a: a + 0.3, params)  # non-zero sinks
  pure = functools.partial(attnjax.multi_head_attention, params, x, is_causal=True,
                           process_heads=positional.rotary_heads(50.0))
  got = jax.jit(lambda p: module.apply({"params": p}, x, is_causal=True))(params)
  np.testing.assert_allclose(got, pure(score_mod=alibi), rtol=2e-5, atol=2e-5)
  # A score_mod at call time replaces the module's (here one with learnable slopes).
  slopes = jnp.array([0.5, 0.25])
  got = module.apply({"params": params}, x, is_causal=True,
                     score_mod=score_mods.ALiBi(slopes))
  np.testing.assert_allclose(got, pure(score_mod=score_mods.ALiBi(slopes)), rtol=2e-5,
                             atol=2e-5)
  grads = jax.grad(lambda p: jnp.sum(module.apply({"params": p}, x) ** 2))(params)
  assert np.all(np.asarray(grads["sinks"]) != 0)
