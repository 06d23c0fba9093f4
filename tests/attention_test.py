"""Tests for `attnjax.attention` against a naive NumPy loop and `jax.nn.dot_product_attention`.

Shapes: query `[..., T, N, H]`, key/value `[..., S, K, H]`, logits/weights/masks
`[..., N, T, S]`, lse `[..., N, T]`; True in a mask means attend.
"""

import functools

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import attnjax

F32_TOL = dict(rtol=2e-5, atol=2e-6)


def naive_attention(
  query,
  key,
  value,
  bias=None,
  mask=None,
  *,
  is_causal=False,
  scale=None,
  local_window_size=None,
  q_segment_ids=None,
  kv_segment_ids=None,
  logits_soft_cap=None,
):
  """Attention one query row at a time in float64; returns (out, weights, lse)."""
  q, k, v = (np.asarray(x, np.float64) for x in (query, key, value))
  *batch, T, N, H = q.shape
  S, K = k.shape[-3], k.shape[-2]
  batch = tuple(batch)
  scale = 1 / np.sqrt(H) if scale is None else scale
  full = batch + (N, T, S)
  bias = np.zeros(full) if bias is None else np.broadcast_to(np.asarray(bias, np.float64), full)
  mask = np.ones(full, bool) if mask is None else np.broadcast_to(np.asarray(mask), full)
  if isinstance(local_window_size, int):
    local_window_size = (local_window_size, local_window_size)
  out = np.zeros(batch + (T, N, H))
  weights = np.zeros(full)
  lse = np.full(batch + (N, T), -np.inf)
  js = np.arange(S)
  for b in np.ndindex(*batch):
    for n in range(N):
      kv_head = n // (N // K)
      for i in range(T):
        logits = scale * (k[b][:, kv_head] @ q[b][i, n]) + bias[b + (n, i)]
        if logits_soft_cap is not None:
          logits = logits_soft_cap * np.tanh(logits / logits_soft_cap)
        visible = mask[b + (n, i)].copy()
        if is_causal:
          visible &= js <= i
        if local_window_size is not None:
          left, right = local_window_size
          visible &= (js >= i - left) & (js <= i + right)
        if q_segment_ids is not None:
          visible &= np.asarray(kv_segment_ids)[b] == np.asarray(q_segment_ids)[b][i]
        if not visible.any():
          continue
        shifted = np.where(visible, logits - logits[visible].max(), -np.inf)
        total = np.exp(shifted).sum()
        weights[b + (n, i)] = np.exp(shifted) / total
        lse[b + (n, i)] = logits[visible].max() + np.log(total)
        out[b + (i, n)] = weights[b + (n, i)] @ v[b][:, kv_head]
  return out, weights, lse


def make_case(
  seed=0,
  *,
  batch=(2,),
  T=4,
  S=5,
  N=2,
  K=2,
  H=4,
  dtype=np.float32,
  magnitude=1.0,
  bias_shape=None,
  mask_shape=None,
  mask_first_key=False,
  segments=False,
  **options,
):
  """Random inputs as a dict of array arguments, plus the static options passed through."""
  rng = np.random.default_rng(seed)

  def normal(shape, scale=1.0):
    return (scale * rng.standard_normal(shape)).astype(dtype)

  arrays = dict(
    query=normal(batch + (T, N, H), magnitude),
    key=normal(batch + (S, K, H), magnitude),
    value=normal(batch + (S, K, H), magnitude),
    bias=None if bias_shape is None else normal(bias_shape, 2.0),
    mask=None,
  )
  if mask_shape is not None:
    arrays["mask"] = rng.random(mask_shape) < 0.7
    if mask_first_key:
      arrays["mask"][..., 0] = True
  if segments:
    # Queries of segment 2 see no key: their rows are empty.
    q_ids = rng.integers(0, 2, batch + (T,)).astype(np.int32)
    q_ids[..., -1] = 2
    arrays["q_segment_ids"] = q_ids
    arrays["kv_segment_ids"] = rng.integers(0, 2, batch + (S,)).astype(np.int32)
  return arrays, options


def without_value(arrays):
  return {name: x for name, x in arrays.items() if name != "value"}


CASES = {
  "mha": dict(T=5, S=7, H=8),
  "no_batch_causal_long_q": dict(batch=(), T=6, S=4, is_causal=True),
  "two_batch_dims_broadcast_mask": dict(batch=(2, 3), T=3, mask_shape=(3, 1, 3, 5)),
  "gqa_bias_over_heads": dict(T=4, S=6, N=4, K=2, bias_shape=(4, 4, 6)),
  "mqa_causal_short_q": dict(T=3, S=6, N=4, K=1, is_causal=True),
  "window_int": dict(batch=(1,), T=6, S=6, local_window_size=1),
  "window_tuple_empty_rows": dict(T=7, S=4, K=1, local_window_size=(1, 0)),
  "segments_empty_rows": dict(T=5, S=6, segments=True),
  "soft_cap_scale_bias": dict(
    magnitude=3.0, bias_shape=(2, 1, 4, 5), logits_soft_cap=2.0, scale=0.9
  ),
  "everything": dict(
    T=6,
    S=7,
    N=4,
    K=2,
    mask_shape=(2, 4, 6, 7),
    bias_shape=(2, 4, 6, 7),
    is_causal=True,
    local_window_size=(3, 1),
    segments=True,
    logits_soft_cap=5.0,
  ),
}


# Eager dispatch compiles each primitive for each new shape: a few eager cases suffice.
EAGER_CASES = {"no_batch_causal_long_q", "two_batch_dims_broadcast_mask", "everything"}


def jit_only(fn, arrays, **options):
  return [jax.jit(lambda arrays: fn(**arrays, **options))(arrays)]


@pytest.mark.parametrize("name", CASES)
def test_matches_naive_reference(name, eager_and_jit):
  arrays, options = make_case(**CASES[name])
  run = eager_and_jit if name in EAGER_CASES else jit_only
  want_out, want_weights, want_lse = naive_attention(**arrays, **options)
  results = run(
    attnjax.dot_product_attention, arrays, return_weights=True, return_lse=True, **options
  )
  for out, weights, lse in results:
    assert out.dtype == jnp.float32 and out.shape == want_out.shape
    assert weights.dtype == jnp.float32 and lse.dtype == jnp.float32
    np.testing.assert_allclose(out, want_out, **F32_TOL)
    np.testing.assert_allclose(weights, want_weights, **F32_TOL)
    np.testing.assert_allclose(lse, want_lse, **F32_TOL)
  for weights in run(attnjax.attention_weights, without_value(arrays), **options):
    np.testing.assert_allclose(weights, want_weights, **F32_TOL)


def test_return_structure_and_xla_implementation():
  arrays, options = make_case(batch=(3,), T=4, S=6, N=4, K=2, is_causal=True)
  want_out, want_weights, want_lse = naive_attention(**arrays, **options)
  out = attnjax.dot_product_attention(**arrays, **options)
  assert isinstance(out, jax.Array)
  np.testing.assert_allclose(out, want_out, **F32_TOL)
  out, weights = attnjax.dot_product_attention(**arrays, return_weights=True, **options)
  assert weights.shape == (3, 4, 4, 6)
  np.testing.assert_allclose(weights, want_weights, **F32_TOL)
  out, lse = attnjax.dot_product_attention(**arrays, return_lse=True, **options)
  assert lse.shape == (3, 4, 4)
  np.testing.assert_allclose(lse, want_lse, **F32_TOL)
  out = attnjax.dot_product_attention(**arrays, implementation="xla", **options)
  np.testing.assert_allclose(out, want_out, **F32_TOL)


JAX_NN_CASES = {
  "bias_and_mask": dict(T=4, S=6, bias_shape=(2, 2, 4, 6), mask_shape=(2, 1, 4, 6)),
  "causal_short_q": dict(T=3, S=6, is_causal=True),
  "causal_long_q_gqa": dict(T=6, S=4, N=4, K=2, is_causal=True),
  "window_scale": dict(T=6, S=6, local_window_size=2, scale=0.3),
  "window_tuple_causal_mqa_bias": dict(
    T=6, S=6, N=4, K=1, local_window_size=(2, 1), is_causal=True, bias_shape=(2, 4, 6, 6)
  ),
}


@pytest.mark.parametrize("case", JAX_NN_CASES.values(), ids=JAX_NN_CASES.keys())
def test_matches_jax_nn(case):
  arrays, options = make_case(H=8, mask_first_key=True, **case)
  if arrays["mask"] is not None:  # jax.nn wants a rank-4 mask.
    arrays["mask"] = np.broadcast_to(
      arrays["mask"], (2, case.get("N", 2), case["T"], case["S"])
    )
  want = jit_only(jax.nn.dot_product_attention, arrays, **options)[0]
  out = jit_only(attnjax.dot_product_attention, arrays, **options)[0]
  np.testing.assert_allclose(out, want, **F32_TOL)


def visibility(T, S, *, is_causal, local_window_size):
  i, j = np.arange(T)[:, None], np.arange(S)[None, :]
  visible = np.ones((T, S), bool)
  if is_causal:
    visible &= j <= i
  if local_window_size is not None:
    left, right = local_window_size
    visible &= (j >= i - left) & (j <= i + right)
  return visible


@hypothesis.settings(max_examples=10)
@hypothesis.given(
  seed=st.integers(0, 2**16),
  heads=st.sampled_from([(2, 2), (4, 2), (4, 1)]),
  kv_len=st.sampled_from([3, 6]),
  is_causal=st.booleans(),
  local_window_size=st.sampled_from([None, (1, 0), (2, 1)]),
)
def test_gradient_support_is_the_visible_set(seed, heads, kv_len, is_causal, local_window_size):
  """Causality by gradients: out[i] depends on key/value j only where j is visible to i."""
  N, K = heads
  arrays, _ = make_case(seed, batch=(), T=4, S=kv_len, N=N, K=K)
  attend = functools.partial(
    attnjax.dot_product_attention, is_causal=is_causal, local_window_size=local_window_size
  )
  jac_k, jac_v = jax.jit(jax.jacrev(attend, argnums=(1, 2)))(
    arrays["query"], arrays["key"], arrays["value"]
  )
  visible = visibility(4, kv_len, is_causal=is_causal, local_window_size=local_window_size)
  # jac: [T, N, H, S, K, H] -> does out[i] depend on key/value j at all?
  depends_k = np.abs(np.asarray(jac_k)).sum(axis=(1, 2, 4, 5)) > 0
  depends_v = np.abs(np.asarray(jac_v)).sum(axis=(1, 2, 4, 5)) > 0
  np.testing.assert_array_equal(depends_k & ~visible, False)
  np.testing.assert_array_equal(depends_v, visible)
  # Query head n reads value head n // (N // K) only.
  reads = np.abs(np.asarray(jac_v)).sum(axis=(0, 2, 3, 5)) > 0
  np.testing.assert_array_equal(reads, np.arange(N)[:, None] // (N // K) == np.arange(K))


@pytest.mark.parametrize("implementation", ["xla", "blockwise", None])
@pytest.mark.parametrize(
  "batch, T, S",
  [((0,), 4, 6), ((2, 0), 3, 5), ((2,), 0, 6), ((2,), 4, 0)],
  ids=["empty_batch", "empty_second_batch_dim", "no_queries", "no_keys"],
)
def test_empty_batch_or_length_gives_empty_results_and_gradients(
  implementation, batch, T, S, eager_and_jit
):
  """Size-0 batch, query or key dims give size-0 (or zero, lse -inf) results and gradients."""
  arrays, options = make_case(
    batch=batch, T=T, S=S, N=4, K=2, bias_shape=batch + (1, T, S), mask_shape=batch + (4, T, S),
    is_causal=True, local_window_size=(2, 1),
  )
  arrays["q_segment_ids"] = np.zeros(batch + (T,), np.int32)
  arrays["kv_segment_ids"] = np.zeros(batch + (S,), np.int32)
  want_out, want_weights, want_lse = naive_attention(**arrays, **options)
  if implementation == "xla":
    weights = attnjax.attention_weights(**without_value(arrays), **options)
    np.testing.assert_array_equal(weights, want_weights)
  options.update(implementation=implementation, return_lse=True)

  floats = {name: arrays[name] for name in ("query", "key", "value", "bias")}

  def loss(floats):
    out, lse = attnjax.dot_product_attention(**{**arrays, **floats}, **options)
    return jnp.sum(out) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0))

  for grad_fn in (jax.grad(loss), jax.jit(jax.grad(loss))):
    grads = grad_fn(floats)
    for name, x in floats.items():
      assert grads[name].shape == x.shape, name
      np.testing.assert_array_equal(grads[name], 0.0)
  for out, lse in eager_and_jit(attnjax.dot_product_attention, arrays, **options):
    assert out.shape == want_out.shape and lse.shape == want_lse.shape
    np.testing.assert_array_equal(out, want_out)
    np.testing.assert_array_equal(lse, want_lse)


@pytest.mark.parametrize(
  "implementation, block_sizes",
  [("xla", None), ("blockwise", None), ("blockwise", (64, 32)), (None, None)],
)
def test_export_with_symbolic_batch_matches_direct_call(implementation, block_sizes):
  T = S = 160  # The default implementation is blockwise from 128 keys on CPU.
  (b,) = jax.export.symbolic_shape("b")

  def attend(query, key, value, bias, mask, q_segment_ids, kv_segment_ids):
    return attnjax.dot_product_attention(
      query, key, value, bias, mask, q_segment_ids=q_segment_ids,
      kv_segment_ids=kv_segment_ids, is_causal=True, local_window_size=(100, 0),
      return_lse=True, implementation=implementation, block_sizes=block_sizes,
    )

  specs = [
    jax.ShapeDtypeStruct(shape, dtype)
    for shape, dtype in [
      ((b, T, 4, 16), jnp.float32), ((b, S, 2, 16), jnp.float32), ((b, S, 2, 16), jnp.float32),
      ((b, 1, T, S), jnp.float32), ((b, 4, 1, S), jnp.bool_), ((b, T), jnp.int32),
      ((b, S), jnp.int32),
    ]
  ]
  exported = jax.export.export(jax.jit(attend))(*specs)
  for batch in (1, 3):
    arrays, _ = make_case(
      batch, batch=(batch,), T=T, S=S, N=4, K=2, H=16, bias_shape=(batch, 1, T, S),
      mask_shape=(batch, 4, 1, S), mask_first_key=True, segments=True,
    )
    args = [arrays[name] for name in (
      "query", "key", "value", "bias", "mask", "q_segment_ids", "kv_segment_ids")]
    for got, want in zip(exported.call(*args), attend(*args), strict=True):
      assert got.shape == want.shape
      np.testing.assert_allclose(got, want, **F32_TOL)


def test_export_with_symbolic_lengths_needs_xla():
  b, t = jax.export.symbolic_shape("b, t")
  spec = jax.ShapeDtypeStruct((b, t, 2, 4), jnp.float32)
  for implementation in ("xla", None):
    attend = functools.partial(
      attnjax.dot_product_attention, is_causal=True, local_window_size=3,
      implementation=implementation,
    )
    exported = jax.export.export(jax.jit(attend))(spec, spec, spec)
    for batch, T in ((1, 5), (2, 130)):
      arrays, _ = make_case(T, batch=(batch,), T=T, S=T)
      args = arrays["query"], arrays["key"], arrays["value"]
      np.testing.assert_allclose(exported.call(*args), attend(*args), **F32_TOL)
  blockwise = functools.partial(attnjax.dot_product_attention, implementation="blockwise")
  with pytest.raises(ValueError, match="static query length T, got the symbolic t"):
    jax.export.export(jax.jit(blockwise))(spec, spec, spec)


def test_empty_rows_give_zeros_and_zero_finite_gradients():
  arrays, _ = make_case(3, T=4, S=5, mask_shape=(2, 2, 4, 5), bias_shape=(2, 2, 4, 5))
  mask = arrays["mask"]
  mask[..., 0] = True
  mask[0, 1, 2, :] = False  # Empty by the mask, for one head.
  q_ids = np.array([[0, 0, 0, 0], [0, 0, 0, 1]], np.int32)
  kv_ids = np.array([[0, 0, 1, 1, 0], [0, 0, 0, 0, 0]], np.int32)  # Batch 1, query 3: empty.
  segments = dict(q_segment_ids=q_ids, kv_segment_ids=kv_ids)
  visible = mask & (q_ids[:, None, :, None] == kv_ids[:, None, None, :])
  empty_BTN = ~visible.any(-1).transpose(0, 2, 1)
  assert empty_BTN.sum() == 3
  primals = (arrays["query"], arrays["key"], arrays["value"], arrays["bias"])

  def ours(q, k, v, bias):
    return attnjax.dot_product_attention(q, k, v, bias, mask, **segments)

  def reference(q, k, v, bias):  # Returns the mean of the values on empty rows.
    return jax.nn.dot_product_attention(q, k, v, bias, visible)

  out, ours_vjp = jax.vjp(jax.jit(ours), *primals)
  np.testing.assert_array_equal(np.asarray(out)[empty_BTN], 0.0)
  _, weights, lse = jax.jit(
    functools.partial(
      attnjax.dot_product_attention, return_weights=True, return_lse=True, **segments
    )
  )(*primals, mask)
  np.testing.assert_array_equal(np.asarray(weights)[~visible.any(-1)], 0.0)
  np.testing.assert_array_equal(np.asarray(lse)[~visible.any(-1)], -np.inf)

  rng = np.random.default_rng(0)
  cotangent = rng.standard_normal(out.shape).astype(np.float32)
  # A cotangent that ignores the empty rows: the same gradients as jax.nn.
  off_empty = cotangent * ~empty_BTN[..., None]
  _, reference_vjp = jax.vjp(jax.jit(reference), *primals)
  for got, want in zip(ours_vjp(off_empty), reference_vjp(off_empty), strict=True):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
  # A cotangent on the empty rows only: no gradient anywhere.
  for grad in ours_vjp(cotangent * empty_BTN[..., None]):
    np.testing.assert_array_equal(grad, 0.0)
  grad_q, grad_k, grad_v, grad_bias = ours_vjp(cotangent)
  for grad in (grad_q, grad_k, grad_v, grad_bias):
    assert np.isfinite(grad).all()
  np.testing.assert_array_equal(np.asarray(grad_q)[empty_BTN], 0.0)
  np.testing.assert_array_equal(np.asarray(grad_bias)[~visible], 0.0)


@pytest.mark.parametrize(
  "dtype, magnitude, tol",
  [
    (jnp.bfloat16, 3.0, 2e-2),
    (jnp.bfloat16, 100.0, 2e-2),
    (jnp.float16, 3.0, 3e-3),
    (jnp.float16, 100.0, 3e-3),  # q.k reaches ~1e5: overflows if summed in float16.
  ],
)
def test_low_precision_inputs_match_float32(dtype, magnitude, tol):
  # H = 16 makes the default scale 1/4 exact in any float format.
  arrays, options = make_case(
    T=5,
    S=6,
    N=4,
    K=2,
    H=16,
    dtype=dtype,
    magnitude=magnitude,
    bias_shape=(2, 4, 5, 6),
    is_causal=True,
  )
  want_out, want_weights, want_lse = naive_attention(**arrays, **options)
  out, weights, lse = jax.jit(
    functools.partial(
      attnjax.dot_product_attention, return_weights=True, return_lse=True, **options
    )
  )(**arrays)
  assert out.dtype == dtype and weights.dtype == jnp.float32 and lse.dtype == jnp.float32
  assert np.isfinite(np.asarray(out, np.float32)).all()
  np.testing.assert_allclose(
    np.asarray(out, np.float32), want_out, rtol=tol, atol=tol * magnitude
  )
  np.testing.assert_allclose(weights, want_weights, atol=tol)
  np.testing.assert_allclose(lse, want_lse, rtol=1e-4, atol=1e-4)


def test_dropout_rate_zero_and_rng_determinism():
  arrays, _ = make_case(batch=(), T=3, S=4)
  want = attnjax.dot_product_attention(**arrays)
  np.testing.assert_array_equal(attnjax.dot_product_attention(**arrays, dropout_rate=0.0), want)
  np.testing.assert_array_equal(
    attnjax.dot_product_attention(**arrays, dropout_rate=0.0, dropout_rng=jax.random.key(0)),
    want,
  )

  @jax.jit
  def dropped(rng):
    return attnjax.dot_product_attention(**arrays, dropout_rate=0.5, dropout_rng=rng)

  first = dropped(jax.random.key(0))
  np.testing.assert_array_equal(dropped(jax.random.key(0)), first)
  np.testing.assert_allclose(  # The same weights dropped; eager and jit may round apart.
    attnjax.dot_product_attention(**arrays, dropout_rate=0.5, dropout_rng=jax.random.key(0)),
    first, rtol=1e-6, atol=1e-6,
  )
  assert not np.allclose(dropped(jax.random.key(1)), first)
  assert not np.allclose(first, want)


def test_dropout_keeps_or_drops_each_weight_and_rescales():
  """With value j = one-hot(j), out[i, n, j] is weight[n, i, j] * keep / (1 - rate)."""
  rate, S = 0.3, 8
  arrays, options = make_case(batch=(4,), T=8, S=S, H=S, is_causal=True)
  arrays["value"] = np.broadcast_to(np.eye(S, dtype=np.float32)[:, None, :], (4, S, 2, S))
  _, want_weights, _ = naive_attention(**arrays, **options)
  out, weights = jit_only(
    attnjax.dot_product_attention,
    dict(arrays, dropout_rng=jax.random.key(7)),
    dropout_rate=rate,
    return_weights=True,
    **options,
  )[0]
  np.testing.assert_allclose(weights, want_weights, **F32_TOL)  # Before dropout.
  out_BNTS = np.asarray(out).transpose(0, 2, 1, 3)
  positive = want_weights > 0
  np.testing.assert_array_equal(out_BNTS[~positive], 0.0)
  kept = out_BNTS[positive] * (1 - rate) / want_weights[positive]
  np.testing.assert_allclose(np.minimum(np.abs(kept), np.abs(kept - 1)), 0.0, atol=1e-5)
  assert abs(np.mean(kept > 0.5) - (1 - rate)) < 0.1


def test_dropout_mean_over_rngs_is_the_output_without_dropout():
  arrays, _ = make_case(batch=(), T=3, S=4)
  want = jit_only(attnjax.dot_product_attention, arrays)[0]
  samples = 2000
  rngs = jax.random.split(jax.random.key(0), samples)
  outs = jax.jit(
    jax.vmap(
      lambda rng: attnjax.dot_product_attention(**arrays, dropout_rate=0.5, dropout_rng=rng)
    )
  )(rngs)
  outs = np.asarray(outs)
  assert not np.allclose(outs[0], outs[1])
  standard_error = outs.std(axis=0) / np.sqrt(samples)
  assert (np.abs(outs.mean(axis=0) - want) <= 5 * standard_error + 1e-6).all()


def test_lse_carries_a_gradient_unlike_jax_nn_residual():
  """d lse_i / d q_i = scale * sum_j p_ij k_j: the closed form of the softmax's gradient."""
  arrays, _ = make_case(5, T=4, S=6, N=2, K=2, H=8)
  q, k, v = arrays["query"], arrays["key"], arrays["value"]
  for implementation in ("xla", "blockwise"):
    def total_lse(q, implementation=implementation):
      lse = attnjax.dot_product_attention(q, k, v, return_lse=True,
                                          implementation=implementation)[1]
      return jnp.sum(lse)
    _, weights, _ = naive_attention(q, k, v)  # [B, N, T, S]
    want = np.einsum("bnts,bsnh->btnh", weights, k.astype(np.float64)) / np.sqrt(8)
    np.testing.assert_allclose(jax.grad(total_lse)(q), want, **F32_TOL)
  residual_grad = jax.grad(
    lambda q: jnp.sum(jax.nn.dot_product_attention(q, k, v, return_residual=True)[1]))(q)
  np.testing.assert_array_equal(residual_grad, 0.0)


def test_merge_attention_equals_attention_over_all_keys(eager_and_jit):
  arrays, _ = make_case(5, T=4, S=9, N=4, K=2, mask_shape=(2, 4, 4, 9), bias_shape=(2, 4, 4, 9))
  mask = arrays["mask"]
  mask[0, 1, 2, 2:5] = False  # Empty in the second chunk only.
  mask[1, 3, 0, :] = False  # Empty in every chunk.
  chunks = [slice(0, 2), slice(2, 5), slice(5, 9)]
  partial_attention = jax.jit(functools.partial(attnjax.dot_product_attention, return_lse=True))
  outputs, lses = [], []
  for chunk in chunks:
    out, lse = partial_attention(
      arrays["query"],
      arrays["key"][:, chunk],
      arrays["value"][:, chunk],
      arrays["bias"][..., chunk],
      mask[..., chunk],
    )
    outputs.append(out)
    lses.append(lse)
  assert np.isneginf(lses[1][0, 1, 2])
  want_out, _, want_lse = naive_attention(**arrays)
  for out, lse in eager_and_jit(attnjax.merge_attention, dict(outputs=outputs, lses=lses)):
    np.testing.assert_allclose(out, want_out, **F32_TOL)
    np.testing.assert_allclose(lse, want_lse, **F32_TOL)
  out, lse = attnjax.merge_attention(outputs[:1], lses[:1])
  np.testing.assert_allclose(out, outputs[0], **F32_TOL)
  np.testing.assert_allclose(lse, lses[0], **F32_TOL)


@hypothesis.given(q_order=st.permutations(range(4)), kv_order=st.permutations(range(5)))
def test_permuting_queries_and_keys_without_positions(q_order, kv_order):
  """Permuting keys with values changes nothing; permuting queries permutes the outputs."""
  arrays, _ = make_case(
    11, T=4, S=5, N=4, K=2, mask_shape=(2, 4, 4, 5), bias_shape=(2, 4, 4, 5), segments=True
  )
  q_order, kv_order = np.array(q_order), np.array(kv_order)
  permuted = dict(
    query=arrays["query"][:, q_order],
    key=arrays["key"][:, kv_order],
    value=arrays["value"][:, kv_order],
    bias=arrays["bias"][..., q_order, :][..., kv_order],
    mask=arrays["mask"][..., q_order, :][..., kv_order],
    q_segment_ids=arrays["q_segment_ids"][:, q_order],
    kv_segment_ids=arrays["kv_segment_ids"][:, kv_order],
  )
  out, lse = _attend_with_lse(arrays)
  permuted_out, permuted_lse = _attend_with_lse(permuted)
  np.testing.assert_allclose(permuted_out, np.asarray(out)[:, q_order], **F32_TOL)
  np.testing.assert_allclose(permuted_lse, np.asarray(lse)[..., q_order], **F32_TOL)


@jax.jit
def _attend_with_lse(arrays):
  return attnjax.dot_product_attention(**arrays, return_lse=True)


def test_vmap_over_unbatched_inputs_matches_batched_call():
  arrays, options = make_case(
    batch=(3,),
    T=4,
    S=5,
    N=4,
    K=2,
    mask_shape=(3, 4, 4, 5),
    bias_shape=(3, 4, 4, 5),
    segments=True,
    is_causal=True,
    logits_soft_cap=4.0,
  )
  attend = functools.partial(
    attnjax.dot_product_attention, return_weights=True, return_lse=True, **options
  )
  batched = jax.jit(lambda arrays: attend(**arrays))(arrays)
  vmapped = jax.jit(jax.vmap(lambda arrays: attend(**arrays)))(arrays)
  for got, want in zip(vmapped, batched, strict=True):
    np.testing.assert_allclose(got, want, **F32_TOL)

  weights = functools.partial(attnjax.attention_weights, **options)
  np.testing.assert_allclose(
    jax.jit(jax.vmap(lambda arrays: weights(**arrays)))(without_value(arrays)),
    batched[1],
    **F32_TOL,
  )

  outputs, lses = [batched[0], 2 * batched[0]], [batched[2], batched[2] - 1.0]
  merged = jax.jit(attnjax.merge_attention)(outputs, lses)
  vmapped = jax.jit(jax.vmap(attnjax.merge_attention))(outputs, lses)
  for got, want in zip(vmapped, merged, strict=True):
    np.testing.assert_allclose(got, want, **F32_TOL)


def test_gradients_match_finite_differences():
  grads = functools.partial(check_grads, order=1, modes=["rev"], eps=1e-3)
  arrays, _ = make_case(batch=(), T=3, S=4, N=2, K=1, mask_shape=(2, 3, 4), bias_shape=(2, 3, 4))
  mask = arrays["mask"]
  mask[..., 0] = True
  mask[1, 2, :] = False  # An empty row.
  q, k, v, bias = arrays["query"], arrays["key"], arrays["value"], arrays["bias"]

  @jax.jit
  def out_and_weights(q, k, v, bias):
    return attnjax.dot_product_attention(
      q, k, v, bias, mask, is_causal=True, logits_soft_cap=3.0, return_weights=True
    )

  @jax.jit
  def out_and_lse(q, k, v, bias):
    return attnjax.dot_product_attention(q, k, v, bias, local_window_size=1, return_lse=True)

  @jax.jit
  def weights(q, k, bias):
    return attnjax.attention_weights(q, k, bias, mask, local_window_size=(1, 2))

  @jax.jit
  def merged(out_a, out_b, lse_a, lse_b):
    return attnjax.merge_attention([out_a, out_b], [lse_a, lse_b])

  grads(out_and_weights, (q, k, v, bias))
  grads(out_and_lse, (q, k, v, bias))
  grads(weights, (q, k, bias))
  out, lse = out_and_lse(q, k, v, bias)
  empty_in_b = (lse - 1.0).at[1, 0].set(-jnp.inf)  # Row 0 of head 1 is empty in part b.
  grads(merged, (out, 2 * out, lse, empty_in_b))


def _shapes_as_text(*shapes):
  return [text for shape in shapes for text in (str(tuple(shape)), str(list(shape)))]


_Q, _KV = (2, 3, 2, 4), (2, 4, 2, 4)
BAD_INPUTS = {
  "query_rank": (
    dict(query=np.zeros((3, 4))),
    {},
    ValueError,
    ["query"],
    _shapes_as_text((3, 4)),
  ),
  "key_head_dim": (
    dict(key=np.zeros((2, 4, 2, 6)), value=np.zeros((2, 4, 2, 6))),
    {},
    ValueError,
    ["key", "query"],
    _shapes_as_text((2, 4, 2, 6), _Q),
  ),
  "value_length": (
    dict(value=np.zeros((2, 5, 2, 4))),
    {},
    ValueError,
    ["value"],
    _shapes_as_text((2, 5, 2, 4)),
  ),
  "value_heads": (
    dict(value=np.zeros((2, 4, 1, 4))),
    {},
    ValueError,
    ["value"],
    _shapes_as_text((2, 4, 1, 4)),
  ),
  "value_head_dim": (
    dict(value=np.zeros((2, 4, 2, 6))),
    {},
    ValueError,
    ["value"],
    _shapes_as_text((2, 4, 2, 6)),
  ),
  "heads_not_multiple": (
    dict(query=np.zeros((2, 3, 3, 4))),
    {},
    ValueError,
    ["query", "key"],
    _shapes_as_text((2, 3, 3, 4), _KV),
  ),
  "batch_dims_differ": (
    dict(key=np.zeros((3, 4, 2, 4)), value=np.zeros((3, 4, 2, 4))),
    {},
    ValueError,
    ["query", "key"],
    _shapes_as_text((3, 4, 2, 4), _Q),
  ),
  "float_mask": (
    dict(mask=np.ones((2, 2, 3, 4), np.float32)),
    {},
    TypeError,
    ["mask"],
    ["float32"],
  ),
  "mask_broadcast": (
    dict(mask=np.ones((3, 3, 4), bool)),
    {},
    ValueError,
    ["mask"],
    _shapes_as_text((3, 3, 4)),
  ),
  "bias_broadcast": (
    dict(bias=np.zeros((2, 5, 4), np.float32)),
    {},
    ValueError,
    ["bias"],
    _shapes_as_text((2, 5, 4)),
  ),
  "dtypes_differ": (
    dict(key=np.zeros(_KV, jnp.bfloat16)),
    {},
    (ValueError, TypeError),
    ["key", "query"],
    ["bfloat16"],
  ),
  "negative_window": ({}, dict(local_window_size=-1), ValueError, ["local_window_size"], ["-1"]),
  "negative_window_right": (
    {},
    dict(local_window_size=(2, -1)),
    ValueError,
    ["local_window_size"],
    ["-1"],
  ),
  "segment_ids_alone": (
    dict(q_segment_ids=np.zeros((2, 3), np.int32)),
    {},
    ValueError,
    ["segment_ids"],
    [],
  ),
  "unknown_implementation": (
    {},
    dict(implementation="bogus"),
    ValueError,
    ["implementation"],
    ["bogus"],
  ),
  "dropout_without_rng": ({}, dict(dropout_rate=0.5), ValueError, ["dropout_rng"], []),
}


@pytest.mark.parametrize(
  "overrides, options, error, names, got", BAD_INPUTS.values(), ids=BAD_INPUTS.keys()
)
def test_bad_input_raises_at_trace_time_naming_the_argument(overrides, options, error, names, got):
  arrays = dict(
    query=np.zeros(_Q, np.float32),
    key=np.zeros(_KV, np.float32),
    value=np.zeros(_KV, np.float32),
  )
  arrays.update(
    {
      name: x if x.dtype != np.float64 else x.astype(np.float32)
      for name, x in overrides.items()
    }
  )
  with pytest.raises(error) as raised:
    jax.jit(lambda arrays: attnjax.dot_product_attention(**arrays, **options))(arrays)
  message = str(raised.value)
  assert any(name in message for name in names), message
  assert not got or any(text in message for text in got), message


TRACED_OPTIONS = {  # name: (options given the traced value, a value).
  "dropout_rate": (lambda x: dict(dropout_rate=x, dropout_rng=jax.random.key(0)), 0.1),
  "logits_soft_cap": (lambda x: dict(logits_soft_cap=x), 2.0),
  "is_causal": (lambda x: dict(is_causal=x), True),
  "local_window_size": (lambda x: dict(local_window_size=x), 1),
  "local_window_size_pair": (lambda x: dict(local_window_size=(x, 2)), 1),
}


@pytest.mark.parametrize("name", TRACED_OPTIONS)
def test_traced_static_options_raise_naming_the_argument(name):
  make_options, value = TRACED_OPTIONS[name]
  q = np.zeros(_Q, np.float32)
  attend = jax.jit(lambda x: attnjax.dot_product_attention(q, q, q, **make_options(x)))
  argument = name.removesuffix("_pair")
  with pytest.raises(ValueError, match=f"{argument} must be static"):
    attend(jnp.asarray(value))


def test_concrete_jax_scalar_windows_are_accepted_like_ints():
  arrays, _ = make_case(T=6, S=6)
  for window, pair in [
    (jnp.asarray(2), (2, 2)),
    ((jnp.asarray(2), np.int64(1)), (2, 1)),
    (jnp.asarray([2, 1]), (2, 1)),
  ]:
    want, _, _ = naive_attention(**arrays, local_window_size=pair)
    got = attnjax.dot_product_attention(**arrays, local_window_size=window)
    np.testing.assert_allclose(got, want, **F32_TOL)
  with pytest.raises(ValueError, match="local_window_size"):
    attnjax.dot_product_attention(**arrays, local_window_size=jnp.asarray(2.0))


def _uses_blockwise(**kwargs):
  q = jnp.zeros((1, kwargs.pop("T"), 2, 8))
  k = jnp.zeros((1, kwargs.pop("S"), 2, 8))
  jaxpr = jax.make_jaxpr(lambda q, k: attnjax.dot_product_attention(q, k, k, **kwargs))(q, k)
  return "name=_attend" in str(jaxpr)  # The blockwise path's custom derivative.


def test_default_implementation_dispatch_on_cpu():
  assert not _uses_blockwise(T=8, S=127)
  assert _uses_blockwise(T=8, S=128)
  assert _uses_blockwise(T=300, S=300, is_causal=True)
  assert not _uses_blockwise(T=300, S=300, return_weights=True)
  assert not _uses_blockwise(T=300, S=300, dropout_rate=0.1, dropout_rng=jax.random.key(0))
  assert not _uses_blockwise(T=8, S=300, implementation="xla")
  assert _uses_blockwise(T=8, S=8, implementation="blockwise")


def test_block_sizes_and_static_scale_for_blockwise():
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.normal(size=(2, 37, 4, 8)), jnp.float32) for _ in range(3))
  ref = attnjax.dot_product_attention(q, k, v, is_causal=True, implementation="xla")
  out = attnjax.dot_product_attention(q, k, v, is_causal=True, implementation="blockwise",
                                      block_sizes=(16, 8))
  np.testing.assert_allclose(out, ref, atol=1e-5, rtol=1e-5)
  with pytest.raises(ValueError, match="static scale"):
    jax.jit(lambda s: attnjax.dot_product_attention(q, k, v, scale=s,
                                                    implementation="blockwise"))(0.5)


def test_minus_inf_bias_hides_keys_like_a_mask():
  rng = np.random.default_rng(1)
  q, k, v = (jnp.asarray(rng.normal(size=(3, 1, 4)), jnp.float32) for _ in range(3))
  hidden = np.array([[False, True, False], [True, True, True], [False, False, False]])
  bias = jnp.where(hidden, -jnp.inf, 0.0)
  fn = functools.partial(attnjax.dot_product_attention, implementation="xla")
  np.testing.assert_allclose(fn(q, k, v, bias=bias), fn(q, k, v, mask=~hidden), atol=1e-6)
  assert not np.any(fn(q, k, v, bias=bias)[1])
  grads = jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v, bias=bias) ** 2), (0, 1, 2))(q, k, v)
  assert all(np.all(np.isfinite(g)) for g in grads)


def test_precision_reaches_both_einsums_of_the_dense_path():
  rng = np.random.default_rng(2)
  q, k, v = (rng.normal(size=(1, 128, 2, 4)).astype(np.float32) for _ in range(3))
  highest = functools.partial(attnjax.dot_product_attention, is_causal=True,
                              precision=jax.lax.Precision.HIGHEST)
  jaxpr = str(jax.make_jaxpr(highest)(q, k, v))
  # 128 keys would pick the blockwise path on CPU; a precision picks the dense one.
  assert "name=_attend" not in jaxpr and jaxpr.count("dot_general") == 2
  assert jaxpr.count("precision=(Precision.HIGHEST, Precision.HIGHEST)") == 2
  np.testing.assert_allclose(jax.jit(highest)(q, k, v),
                             naive_attention(q, k, v, is_causal=True)[0], **F32_TOL)
  with pytest.raises(ValueError, match="precision='highest' needs implementation='xla'"):
    attnjax.dot_product_attention(q, k, v, precision="highest", implementation="blockwise")
