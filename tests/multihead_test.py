"""Tests for `attnjax.multihead` against Flax's attention with ported weights and NumPy.

Shapes: inputs `[..., T, D]` (keys/values `[..., S, Dkv]`), projected heads `[..., L, N, H]`,
masks and weights `[..., N, T, S]`, cache `[..., M, K, H]`; True in a mask means attend.
Test data comes from NumPy: eager `jax.random` calls compile once per shape, which is slow.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import attnjax

F32_TOL = dict(rtol=2e-5, atol=2e-5)


def normal(seed, shape, scale=1.0, dtype=np.float32):
  return (scale * np.random.default_rng(seed).standard_normal(shape)).astype(dtype)


def random_params(seed, in_features, num_heads, head_dim, dtype=np.float32, **options):
  """Random parameters (non-zero biases) in the tree of `init_multi_head_attention`."""
  shapes = jax.eval_shape(functools.partial(
      attnjax.init_multi_head_attention, in_features=in_features, num_heads=num_heads,
      head_dim=head_dim, **options), jax.random.key(0))
  leaves, tree = jax.tree.flatten(shapes)
  return tree.unflatten([normal(seed + i, a.shape, 0.4, dtype) for i, a in enumerate(leaves)])


def random_mask(seed, shape):
  """A random bool mask where every query row sees at least its first key."""
  mask = np.random.default_rng(seed).random(shape) < 0.6
  mask[..., 0] = True
  return mask


def flax_attention(num_heads, head_dim, out_features, use_bias=True):
  """Flax's module with the shapes of `init_multi_head_attention(..., num_heads, head_dim)`."""
  return nn.MultiHeadDotProductAttention(
      num_heads=num_heads, qkv_features=num_heads * head_dim, out_features=out_features,
      use_bias=use_bias)


def numpy_attention(params, inputs_q, inputs_kv, mask=None):
  """Grouped-query attention in float64 NumPy: each kv head repeated over its query heads."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  x_q, x_kv = np.asarray(inputs_q, np.float64), np.asarray(inputs_kv, np.float64)
  q = np.einsum("...td,dnh->...tnh", x_q, p["query"]["kernel"]) + p["query"]["bias"]
  k = np.einsum("...sd,dkh->...skh", x_kv, p["key"]["kernel"]) + p["key"]["bias"]
  v = np.einsum("...sd,dkh->...skh", x_kv, p["value"]["kernel"]) + p["value"]["bias"]
  groups = q.shape[-2] // k.shape[-2]
  k, v = np.repeat(k, groups, axis=-2), np.repeat(v, groups, axis=-2)
  logits = np.einsum("...tnh,...snh->...nts", q, k) / np.sqrt(q.shape[-1])
  if mask is not None:
    logits = np.where(mask, logits, -np.inf)
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  heads = np.einsum("...nts,...snh->...tnh", weights, v)
  return np.einsum("...tnh,nhd->...td", heads, p["out"]["kernel"]) + p["out"]["bias"]


# name: (batch shape, T, S, D, Dkv, mask kind, use_bias); Dkv None means self-attention.
FLAX_CASES = {
    "self": ((2,), 5, 5, 8, None, None, True),
    "self_causal_no_batch": ((), 5, 5, 8, None, "causal", True),
    "self_mask_two_batch_dims": ((2, 3), 5, 5, 8, None, "random", True),
    "self_mask_no_bias": ((2,), 5, 5, 8, None, "random", False),
    "cross": ((2,), 5, 7, 8, 6, None, True),
    "cross_mask_no_batch_no_bias": ((), 5, 7, 8, 6, "random", False),
    "cross_two_batch_dims": ((3, 2), 5, 7, 8, 6, None, True),
}
FLAX_INIT = ("self_causal_no_batch", "self_mask_no_bias", "cross")


@pytest.mark.parametrize("name", FLAX_CASES.keys())
def test_matches_flax_with_params_ported_both_ways(name):
  batch, T, S, D, Dkv, mask_kind, use_bias = FLAX_CASES[name]
  N, H = 2, 4
  x_q = normal(0, batch + (T, D))
  x_kv = None if Dkv is None else normal(1, batch + (S, Dkv))
  flax_mask, mask, is_causal = None, None, False
  if mask_kind == "causal":
    flax_mask = nn.make_causal_mask(jnp.ones(batch + (T,)), dtype=jnp.bool_)
    is_causal = True
  elif mask_kind == "random":
    flax_mask = mask = random_mask(2, batch + (N, T, S))
  module = flax_attention(N, H, D, use_bias)
  ours = functools.partial(attnjax.multi_head_attention, inputs_q=x_q, inputs_kv=x_kv,
                           mask=mask, is_causal=is_causal, num_heads=N, num_kv_heads=N)

  @jax.jit
  def run(rng, our_params):
    # Initialising with flax is slow to compile: only some cases start from its params.
    all_params = [our_params]
    if name in FLAX_INIT:
      all_params.append(module.init(rng, x_q, x_kv)["params"])
    return [(module.apply({"params": p}, x_q, x_kv, mask=flax_mask), ours(params=p))
            for p in all_params]

  our_params = random_params(4, D, N, H, kv_features=Dkv, use_bias=use_bias)
  results = run(jax.random.key(3, impl="rbg"), our_params)  # rbg compiles fast.
  for expected, out in results:
    assert out.shape == batch + (T, D)
    np.testing.assert_allclose(out, expected, **F32_TOL)
  if name == "self":  # Eagerly too.
    np.testing.assert_allclose(ours(params=our_params), results[0][0], **F32_TOL)


@pytest.mark.parametrize("use_bias", [True, False])
@pytest.mark.parametrize("Dkv,Dout", [(None, None), (6, None), (6, 10)])
def test_parameter_tree_is_flaxs(use_bias, Dkv, Dout):
  D, N, H = 8, 2, 3
  x_q = jnp.ones((1, 4, D))
  x_kv = None if Dkv is None else jnp.ones((1, 5, Dkv))
  module = flax_attention(N, H, Dout, use_bias)
  expected = jax.eval_shape(module.init, jax.random.key(0), x_q, x_kv)["params"]
  params = jax.eval_shape(functools.partial(
      attnjax.init_multi_head_attention, in_features=D, num_heads=N, head_dim=H,
      kv_features=Dkv, out_features=Dout, use_bias=use_bias), jax.random.key(0))
  assert jax.tree.structure(params) == jax.tree.structure(expected)
  assert jax.tree.map(lambda a: (a.shape, a.dtype), params) == jax.tree.map(
      lambda a: (a.shape, a.dtype), expected)


@pytest.mark.parametrize("flax_options", [{}, dict(normalize_qk=True)])
def test_init_flattens_kernels_like_flax(flax_options):
  """With initialisers that ignore the rng, the values are flax's DenseGeneral values."""

  def kernel_init(rng, shape, dtype, offset=3):
    del rng  # The value depends on the (flattened) shape only.
    assert len(shape) == 2, shape
    return (jnp.arange(np.prod(shape), dtype=dtype).reshape(shape) % 7 - offset) / shape[0]

  def bias_init(rng, shape, dtype, end=1.0):
    del rng
    assert len(shape) == 1, shape
    return jnp.linspace(-1, end, shape[0], dtype=dtype)

  options = dict(kernel_init=kernel_init, bias_init=bias_init,
                 out_kernel_init=functools.partial(kernel_init, offset=1),
                 out_bias_init=functools.partial(bias_init, end=3.0))
  D, Dkv, N, H = 6, 5, 2, 3
  module = nn.MultiHeadDotProductAttention(num_heads=N, qkv_features=N * H, out_features=4,
                                           **options, **flax_options)
  x_q, x_kv = jnp.ones((2, D)), jnp.ones((3, Dkv))
  expected = jax.jit(module.init)(jax.random.key(0), x_q, x_kv)["params"]
  params = jax.jit(functools.partial(
      attnjax.init_multi_head_attention, in_features=D, num_heads=N, head_dim=H,
      kv_features=Dkv, out_features=4, **options, **flax_options))(jax.random.key(1))
  jax.tree.map(np.testing.assert_array_equal, params, expected)
  assert params["out"]["bias"][-1] == 3.0 and params["query"]["bias"][-1, -1] == 1.0


FLAX_TOL = dict(rtol=1e-6, atol=1e-6)


def sharpened_attention(query, key, value, mask=None, precision=None):
  """A Flax-style `attention_fn`: Flax's attention at twice the logit scale."""
  return nn.dot_product_attention(2.0 * query, key, value, mask=mask, precision=precision)


# name: (options of both, widths of inputs_k and inputs_v, None if not passed).
FLAX_OPTION_CASES = {
    "normalize_qk_self": (dict(normalize_qk=True), (None, None)),
    "normalize_qk_k_and_v": (dict(normalize_qk=True), (6, 3)),
    "inputs_k_and_inputs_v": ({}, (6, 3)),
    "precision": (dict(precision=jax.lax.Precision.HIGHEST), (6, None)),
    "attention_fn": (dict(attention_fn=sharpened_attention), (6, None)),
}


@pytest.mark.parametrize("name", FLAX_OPTION_CASES.keys())
def test_flax_options_match_flax(name):
  options, (Dk, Dv) = FLAX_OPTION_CASES[name]
  D, N, H, T, S = 8, 2, 4, 5, 7
  inputs = [normal(0, (2, T, D))] + [normal(i, (2, S, d)) for i, d in ((1, Dk), (2, Dv)) if d]
  mask = random_mask(3, (2, N, T, S if Dk else T))
  module = nn.MultiHeadDotProductAttention(num_heads=N, qkv_features=N * H, **options)
  shapes = jax.eval_shape(module.init, jax.random.key(0), *inputs)["params"]
  ours = attnjax.init_multi_head_attention(
      jax.random.key(0), D, N, H, kv_features=Dk, v_features=Dv,
      normalize_qk=options.get("normalize_qk", False))
  assert jax.tree.map(np.shape, ours) == jax.tree.map(np.shape, shapes)
  leaves, tree = jax.tree.flatten(shapes)
  params = tree.unflatten([normal(10 + i, a.shape, 0.5) for i, a in enumerate(leaves)])
  our_options = {k: v for k, v in options.items() if k != "normalize_qk"}  # Read from params.

  @jax.jit
  def run(params):
    return (module.apply({"params": params}, *inputs, mask=mask),
            attnjax.multi_head_attention(params, *inputs, mask=mask, **our_options))

  expected, out = run(params)
  np.testing.assert_allclose(out, expected, **FLAX_TOL)


def test_qk_normalisation_is_a_layer_norm_of_each_head():
  D, N, H = 8, 2, 4
  params = random_params(0, D, N, H, normalize_qk=True)
  params["query_ln"]["scale"] = normal(1, (H,))
  params["key_ln"]["scale"] = normal(2, (H,))
  x = normal(3, (2, 5, D))
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)

  def layer_norm(y, scale):
    centred = y - y.mean(-1, keepdims=True)
    return centred / np.sqrt((centred**2).mean(-1, keepdims=True) + 1e-6) * scale

  # Normalising the projections by hand and dropping the LayerNorm from the params.
  q = np.einsum("...td,dnh->...tnh", x, p["query"]["kernel"]) + p["query"]["bias"]
  k = np.einsum("...td,dnh->...tnh", x, p["key"]["kernel"]) + p["key"]["bias"]
  q, k = layer_norm(q, p["query_ln"]["scale"]), layer_norm(k, p["key_ln"]["scale"])
  logits = np.einsum("...tnh,...snh->...nts", q, k) / np.sqrt(H)
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  v = np.einsum("...td,dnh->...tnh", x, p["value"]["kernel"]) + p["value"]["bias"]
  heads = np.einsum("...nts,...snh->...tnh", weights, v)
  expected = np.einsum("...tnh,nhd->...td", heads, p["out"]["kernel"]) + p["out"]["bias"]
  np.testing.assert_allclose(jax.jit(attnjax.multi_head_attention)(params, x), expected,
                             **F32_TOL)
  del params["key_ln"]
  with pytest.raises(ValueError, match="both .*query_ln.*key_ln"):
    attnjax.multi_head_attention(params, x)


ATTENTION_OPTIONS = {"bias", "mask", "is_causal", "local_window_size", "q_segment_ids",
                     "kv_segment_ids", "logits_soft_cap", "dropout_rate", "dropout_rng",
                     "return_weights", "implementation", "precision", "score_mod", "sinks"}


def test_attention_fn_gets_the_documented_arguments():
  params = random_params(0, 8, 4, 2, num_kv_heads=2, kv_features=6)
  x_q, x_kv = normal(1, (2, 5, 8)), normal(2, (2, 7, 6))
  calls = []

  def recording(query, key, value, **options):
    calls.append((query.shape, key.shape, value.shape, options))
    return attnjax.dot_product_attention(query, key, value, **options)

  mask = random_mask(3, (2, 1, 5, 7))
  options = dict(mask=mask, local_window_size=(2, 1), precision="highest")
  out = attnjax.multi_head_attention(params, x_q, x_kv, attention_fn=recording, **options)
  np.testing.assert_allclose(out, attnjax.multi_head_attention(params, x_q, x_kv, **options),
                             **F32_TOL)
  (q_shape, k_shape, v_shape, got), = calls
  assert (q_shape, k_shape, v_shape) == ((2, 5, 4, 2), (2, 7, 2, 2), (2, 7, 2, 2))
  assert set(got) == ATTENTION_OPTIONS
  assert got["mask"] is mask and got["local_window_size"] == (2, 1)
  assert got["precision"] == "highest" and got["is_causal"] is False

  # Decoding: the cache's keys and values, its causal visibility folded into the mask.
  params = random_params(0, 8, 4, 2, num_kv_heads=2)
  cache = attnjax.init_kv_cache((2,), 6, 2, 2)
  attnjax.multi_head_attention(params, x_q[:, :2], cache=cache, attention_fn=recording,
                               return_weights=True)
  _, k_shape, _, got = calls[-1]
  assert k_shape == (2, 6, 2, 2) and got["is_causal"] is False and got["return_weights"]
  np.testing.assert_array_equal(got["mask"], np.tri(2, 6, dtype=bool))


def test_attention_fn_gets_only_the_options_it_names_and_must_take_those_in_use():
  params = random_params(0, 8, 2, 4)
  x = normal(1, (2, 5, 8))
  mask = random_mask(2, (2, 2, 5, 5))
  received = []

  def flax_style(query, key, value, mask=None, dropout_rng=None, dropout_rate=0.0):
    received.append((mask, dropout_rng, dropout_rate))
    return nn.dot_product_attention(query, key, value, mask=mask)

  out = attnjax.multi_head_attention(params, x, mask=mask, attention_fn=flax_style)
  assert received == [(mask, None, 0.0)]
  np.testing.assert_allclose(out, attnjax.multi_head_attention(params, x, mask=mask),
                             **F32_TOL)
  for option, shown in ((dict(is_causal=True), "is_causal, which is True"),
                        (dict(bias=np.zeros((5, 5), np.float32)),
                         r"bias, which is an array of shape \(5, 5\)"),
                        (dict(return_weights=True), "return_weights")):
    with pytest.raises(TypeError, match=f"'flax_style' does not take {shown}"):
      attnjax.multi_head_attention(params, x, attention_fn=flax_style, **option)


def test_input_argument_errors():
  params = random_params(0, 8, 2, 4)
  x, y = jnp.ones((2, 5, 8)), jnp.ones((2, 3, 8))
  with pytest.raises(ValueError, match="inputs_kv or inputs_k and inputs_v, not both"):
    attnjax.multi_head_attention(params, x, y, inputs_kv=y)
  with pytest.raises(ValueError, match="inputs_v needs inputs_k"):
    attnjax.multi_head_attention(params, x, inputs_v=y)
  with pytest.raises(ValueError, match=r"same batch dims and length.*\(2, 3, 8\) and \(2, 4, 8\)"):
    attnjax.multi_head_attention(params, x, y, jnp.ones((2, 4, 8)))
  with pytest.raises(ValueError, match="self-attention"):
    attnjax.multi_head_attention(params, x, inputs_kv=x, cache=attnjax.init_kv_cache((2,), 6, 2, 4))


@pytest.mark.parametrize("num_kv_heads", [2, 1])
@pytest.mark.parametrize("cross", [False, True])
def test_grouped_query_attention_matches_numpy(num_kv_heads, cross):
  batch, T, D, N, H = (2,), 5, 8, 4, 2
  S, Dkv = (7, 6) if cross else (T, D)
  params = random_params(0, D, N, H, num_kv_heads=num_kv_heads, kv_features=Dkv)
  x_q = normal(1, batch + (T, D))
  x_kv = normal(2, batch + (S, Dkv)) if cross else x_q
  mask = random_mask(3, batch + (1, T, S))
  arrays = dict(params=params, inputs_q=x_q, inputs_kv=x_kv if cross else None, mask=mask)
  fn = functools.partial(attnjax.multi_head_attention, num_kv_heads=num_kv_heads)
  out = jax.jit(fn)(**arrays)
  np.testing.assert_allclose(out, numpy_attention(params, x_q, x_kv, mask), **F32_TOL)
  if not cross:
    causal = jax.jit(functools.partial(fn, is_causal=True))(params, x_q)
    np.testing.assert_allclose(
        causal, numpy_attention(params, x_q, x_q, np.tri(T, dtype=bool)), **F32_TOL)


def test_head_count_checks_and_bad_widths_raise():
  params = random_params(0, 8, 4, 2, num_kv_heads=2)
  x = jnp.ones((3, 8))
  with pytest.raises(ValueError, match="num_heads=2"):
    attnjax.multi_head_attention(params, x, num_heads=2)
  with pytest.raises(ValueError, match="num_kv_heads=4"):
    attnjax.multi_head_attention(params, x, num_kv_heads=4)
  with pytest.raises(ValueError, match="inputs_k must have shape"):
    attnjax.multi_head_attention(params, x, jnp.ones((3, 5)))
  with pytest.raises(ValueError, match="inputs_kv must have shape"):
    attnjax.multi_head_attention(params, x, inputs_kv=jnp.ones((3, 5)))
  with pytest.raises(ValueError, match="inputs_v must have shape"):
    attnjax.multi_head_attention(params, x, x, jnp.ones((3, 5)))
  with pytest.raises(ValueError, match="inputs_q"):
    attnjax.multi_head_attention(params, jnp.ones((3, 7)))
  with pytest.raises(ValueError, match="num_kv_heads"):
    attnjax.init_multi_head_attention(jax.random.key(0), 8, 4, 2, num_kv_heads=3)
  with pytest.raises(ValueError, match="num_kv_heads=0"):
    attnjax.init_multi_head_attention(jax.random.key(0), 8, 4, 2, num_kv_heads=0)


def rotary_by_hand(params, x_q, x_kv, q_pos, k_pos, max_timescale):
  """Projects, rotates with `apply_rotary`, then attends with plain einsums (no masks)."""
  def project(name, x):
    y = jnp.einsum("...ld,dnh->...lnh", x, params[name]["kernel"])
    return y + jnp.broadcast_to(params[name]["bias"], y.shape)

  q, k, v = project("query", x_q), project("key", x_kv), project("value", x_kv)
  q = attnjax.apply_rotary(q, q_pos, max_timescale=max_timescale)
  k = attnjax.apply_rotary(k, k_pos, max_timescale=max_timescale)
  logits = jnp.einsum("...tnh,...snh->...nts", q, k) / np.sqrt(q.shape[-1])
  heads = jnp.einsum("...nts,...snh->...tnh", jax.nn.softmax(logits, axis=-1), v)
  out = jnp.einsum("...tnh,nhd->...td", heads, params["out"]["kernel"])
  return out + jnp.broadcast_to(params["out"]["bias"], out.shape)


@pytest.mark.parametrize("cross,explicit_positions", [(False, False), (True, True)])
def test_rotary_equals_rotating_projected_queries_and_keys(cross, explicit_positions):
  batch, T, D, N, H, max_timescale = (2,), 5, 8, 2, 4, 100.0
  S, Dkv = (7, 6) if cross else (T, D)
  params = random_params(0, D, N, H, kv_features=Dkv)
  x_q = normal(1, batch + (T, D))
  x_kv = normal(2, batch + (S, Dkv)) if cross else x_q
  if explicit_positions:
    q_pos = np.array([[3, 4, 5, 6, 7], [0, 2, 4, 6, 8]])
    k_pos = np.arange(S)[::-1] * 2 if cross else q_pos
  else:
    q_pos, k_pos = np.arange(T), np.arange(S)
  positions = dict(query_positions=q_pos, key_positions=k_pos) if explicit_positions else {}

  @jax.jit
  def run(params, x_q, x_kv):
    by_hand = rotary_by_hand(params, x_q, x_kv, q_pos, k_pos, max_timescale)
    inputs_kv = x_kv if cross else None
    out = attnjax.multi_head_attention(params, x_q, inputs_kv, rotary=True,
                                       rotary_max_timescale=max_timescale, **positions)
    return by_hand, out, attnjax.multi_head_attention(params, x_q, inputs_kv)

  expected, out, unrotated = run(params, x_q, x_kv)
  np.testing.assert_allclose(out, expected, **F32_TOL)
  assert not np.allclose(unrotated, expected, atol=1e-3)


def decode(params, x, chunks, max_length, **options):
  """Feeds `x [..., L, D]` chunk by chunk through a jitted step with a cache."""
  K, H = params["key"]["kernel"].shape[-2:]
  cache = attnjax.init_kv_cache(x.shape[:-2], max_length, K, H)
  step = jax.jit(functools.partial(attnjax.multi_head_attention, **options))
  outs, start = [], 0
  for size in chunks:
    out, cache = step(params, x[..., start:start + size, :], cache=cache)
    start += size
    assert int(cache["index"]) == start
    outs.append(out)
  return np.concatenate(outs, axis=-2), cache


DECODE_CASES = {
    "rotary_tokens": dict(chunks=[1] * 7, rotary=True),
    "rotary_chunks_longer_cache": dict(chunks=[3, 2, 2], rotary=True, extra=2),
    "window_mqa_chunks": dict(chunks=[2, 3, 2], local_window_size=(1, 0), num_kv_heads=1),
}


@pytest.mark.parametrize("case", DECODE_CASES.values(), ids=DECODE_CASES.keys())
def test_cached_decoding_equals_full_causal_attention(case):
  case = dict(case)
  chunks, extra = case.pop("chunks"), case.pop("extra", 0)
  num_kv_heads = case.pop("num_kv_heads", None)
  batch, D, N, H, L = (2,), 8, 2, 4, sum(chunks)
  params = random_params(0, D, N, H, num_kv_heads=num_kv_heads)
  x = normal(1, batch + (L, D))
  full = jax.jit(functools.partial(attnjax.multi_head_attention, is_causal=True, **case))
  out, cache = decode(params, x, chunks, L + extra, **case)
  np.testing.assert_allclose(out, full(params, x), **F32_TOL)
  assert cache["key"].shape == batch + (L + extra, num_kv_heads or N, H)
  # The positions past the filled ones are untouched.
  assert not np.any(cache["key"][..., L:, :, :]) and not np.any(cache["value"][..., L:, :, :])


def test_cached_decoding_under_x64_equals_full_causal_attention():
  params = random_params(0, 8, 2, 4)
  x = normal(1, (2, 5, 8))
  with jax.enable_x64(True):  # Python ints become int64 there; the cache index is int32.
    full = jax.jit(functools.partial(attnjax.multi_head_attention, is_causal=True, rotary=True))
    out, cache = decode(params, x, [2, 1, 2], 6, rotary=True)
    np.testing.assert_allclose(out, full(params, x), **F32_TOL)
    assert cache["index"].dtype == jnp.int32


def test_cached_decoding_returns_weights_over_the_cache():
  params = random_params(0, 8, 2, 4)
  x = normal(1, (6, 8))
  cache = attnjax.init_kv_cache((), 6, 2, 4)
  fn = jax.jit(functools.partial(attnjax.multi_head_attention, return_weights=True),
               static_argnames="is_causal")
  (out, weights), cache = fn(params, x[:4], cache=cache)
  (last, last_weights), _ = fn(params, x[4:], cache=cache)
  full, full_weights = fn(params, x, is_causal=True)
  np.testing.assert_allclose(np.concatenate([out, last]), full, **F32_TOL)
  assert weights.shape == (2, 4, 6) and last_weights.shape == (2, 2, 6)
  np.testing.assert_allclose(np.concatenate([weights, last_weights], axis=-2), full_weights,
                             **F32_TOL)


def test_cache_errors():
  params = random_params(0, 8, 2, 4)
  cache = attnjax.init_kv_cache((2,), 6, 2, 4)
  x = jnp.ones((2, 1, 8))
  with pytest.raises(ValueError, match="do not fit a cache"):
    attnjax.multi_head_attention(params, jnp.ones((3, 1, 8)), cache=cache)
  with pytest.raises(ValueError, match="do not fit a cache"):
    attnjax.multi_head_attention(params, jnp.ones((1, 8)), cache=cache)
  with pytest.raises(ValueError, match="do not fit a cache"):
    attnjax.multi_head_attention(params, x, cache=attnjax.init_kv_cache((2,), 6, 1, 4))
  with pytest.raises(ValueError, match="self-attention"):
    attnjax.multi_head_attention(params, x, jnp.ones((2, 3, 8)), cache=cache)
  with pytest.raises(ValueError, match="segment ids"):
    ids = jnp.zeros((2, 1), jnp.int32)
    attnjax.multi_head_attention(params, x, cache=cache, q_segment_ids=ids, kv_segment_ids=ids)
  with pytest.raises(ValueError, match="max_length must be a non-negative int, got -1"):
    attnjax.init_kv_cache((2,), -1, 2, 4)
  _, full = attnjax.multi_head_attention(params, jnp.ones((2, 5, 8)), cache=cache)
  with pytest.raises(ValueError, match="5 are filled and 2 more do not fit"):
    attnjax.multi_head_attention(params, jnp.ones((2, 2, 8)), cache=full)


def test_vmap_over_unbatched_inputs_equals_batched():
  params = random_params(0, 8, 4, 2, num_kv_heads=2, kv_features=6)
  x_q, x_kv = normal(1, (3, 5, 8)), normal(2, (3, 7, 6))
  mask = random_mask(3, (3, 4, 5, 7))
  fn = functools.partial(attnjax.multi_head_attention, rotary=True)
  # A stack of models, for vmap over the parameters too (one model per example).
  stacked = jax.tree.map(lambda a: np.stack([a, 2 * a, -a]), params)

  @jax.jit
  def run(x_q, x_kv, mask):
    mapped = jax.vmap(lambda q, kv, m: fn(params, q, kv, mask=m))(x_q, x_kv, mask)
    per_model = jax.vmap(fn)(stacked, x_q, x_kv)
    one_by_one = [fn(jax.tree.map(lambda a, i=i: a[i], stacked), x_q[i], x_kv[i])
                  for i in range(3)]
    return mapped, fn(params, x_q, x_kv, mask=mask), per_model, jnp.stack(one_by_one)

  mapped, batched, per_model, one_by_one = run(x_q, x_kv, mask)
  np.testing.assert_allclose(mapped, batched, **F32_TOL)
  np.testing.assert_allclose(per_model, one_by_one, **F32_TOL)


@pytest.mark.parametrize("options", [dict(), dict(is_causal=True, rotary=True, num_kv_heads=1)],
                         ids=["plain", "causal_rotary_mqa"])
def test_gradients_match_finite_differences(options):
  options = dict(options)
  num_kv_heads = options.pop("num_kv_heads", None)
  params = random_params(0, 4, 2, 2, np.float64, num_kv_heads=num_kv_heads)
  x = normal(1, (2, 3, 4), dtype=np.float64)
  fn = jax.jit(functools.partial(attnjax.multi_head_attention, **options))
  # float64 inputs, but the core computes logits and softmax in float32: loose tolerances.
  with jax.enable_x64(True):
    check_grads(fn, (params, x), order=1, modes=["rev"], eps=1e-3, atol=2e-3, rtol=2e-3)


# ----------------------------------------------------------------------------- variants

from attnjax import masks, positional, score_mods  # noqa: E402

VARIANT_DECODE_CASES = {
    "chunked_alibi_sinks": dict(chunks=[1] * 4 + [3, 2], mask=masks.Chunked(3),
                                score_mod=score_mods.ALiBi(score_mods.alibi_slopes(2))),
    "window_object_t5": dict(chunks=[2, 3, 1, 3], mask=masks.LocalWindow(2, 0),
                             score_mod=score_mods.T5RelativeBias(
                                 normal(7, (8, 2)), num_buckets=8, max_distance=8,
                                 bidirectional=False)),
    "prefix_lm_rotary": dict(chunks=[4, 1, 1, 2], mask=masks.PrefixLM(jnp.array([3, 5])),
                             rotary=True),
}


@pytest.mark.parametrize("case", VARIANT_DECODE_CASES.values(),
                         ids=VARIANT_DECODE_CASES.keys())
def test_cached_decoding_reads_mask_objects_and_score_mods_at_absolute_positions(case):
  case = dict(case)
  chunks = case.pop("chunks")
  L = sum(chunks)
  params = random_params(0, 8, 2, 4, sinks=True)
  x = normal(1, (2, L, 8))
  full = jax.jit(functools.partial(attnjax.multi_head_attention, is_causal=True, **case))
  out, _ = decode(params, x, chunks, L + 2, **case)
  np.testing.assert_allclose(out, full(params, x), **F32_TOL)


def test_sinks_parameter_joins_the_softmax():
  params = random_params(0, 8, 2, 4, sinks=True)
  assert params["sinks"].shape == (2,)
  assert not np.any(attnjax.init_multi_head_attention(jax.random.key(0), 8, 2, 4,
                                                      sinks=True)["sinks"])
  x = normal(1, (3, 5, 8))

  def by_hand(params):
    q, k, v = (jnp.einsum("...ld,dnh->...lnh", x, params[n]["kernel"])
               + params[n]["bias"][None, None] for n in ("query", "key", "value"))
    heads = attnjax.dot_product_attention(q, k, v, sinks=params["sinks"],
                                          implementation="xla")
    out = jnp.einsum("...tnh,nhd->...td", heads, params["out"]["kernel"])
    return out + params["out"]["bias"][None, None]

  np.testing.assert_allclose(attnjax.multi_head_attention(params, x), by_hand(params),
                             **F32_TOL)
  grad = jax.grad(lambda p: jnp.sum(attnjax.multi_head_attention(p, x) ** 2))(params)
  np.testing.assert_allclose(grad["sinks"],
                             jax.grad(lambda p: jnp.sum(by_hand(p) ** 2))(params)["sinks"],
                             rtol=1e-4, atol=1e-5)
  assert np.all(np.asarray(grad["sinks"]) != 0)


def test_process_heads_hook():
  params = random_params(0, 8, 2, 4)
  x = normal(1, (2, 6, 8))
  rotary = attnjax.multi_head_attention(params, x, rotary=True, rotary_max_timescale=100.0)
  hook = attnjax.multi_head_attention(params, x,
                                      process_heads=positional.rotary_heads(100.0))
  np.testing.assert_array_equal(rotary, hook)
  seen = {}

  def scale_queries(query, key, query_positions, key_positions):
    seen["positions"] = (np.asarray(query_positions), np.asarray(key_positions))
    return query * 2.0, key

  out = attnjax.multi_head_attention(params, x[:, :4], normal(2, (2, 5, 8)),
                                     process_heads=scale_queries)
  np.testing.assert_array_equal(seen["positions"][0], np.arange(4))
  np.testing.assert_array_equal(seen["positions"][1], np.arange(5))
  doubled = jax.tree.map(lambda a: a, params)
  doubled["query"] = {n: 2.0 * w for n, w in params["query"].items()}
  np.testing.assert_allclose(out, attnjax.multi_head_attention(doubled, x[:, :4],
                                                               normal(2, (2, 5, 8))),
                             **F32_TOL)
  with pytest.raises(ValueError, match="either rotary=True or process_heads"):
    attnjax.multi_head_attention(params, x, rotary=True, process_heads=scale_queries)
