"""Tests for attnjax.blockwise against the dense implementation="xla" path."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attnjax
from attnjax import blockwise

# Each case: keyword overrides of the default problem below.
CASES = {
    "causal": dict(is_causal=True),
    "full": dict(),
    "causal_T_gt_S": dict(is_causal=True, T=45, S=21),
    "window": dict(window=(5, 3)),
    "causal_window_segments": dict(is_causal=True, window=(9, 0), segments=True),
    "mask_bias_cap": dict(mask=True, bias=(2, 1, 37, 50), soft_cap=2.0, window=(6, 20)),
    "mqa_bias_heads": dict(K=1, bias=(1, 4, 37, 50), is_causal=True),
    "bias_row": dict(bias=(2, 4, 1, 50)),
    "mha_bias_col": dict(K=4, bias=(1, 1, 37, 1), soft_cap=5.0, segments=True),
    "fully_masked_rows": dict(mask=True, bias=(2, 4, 37, 50), hide_rows=True),
}


def _problem(B=2, T=37, S=50, N=4, K=2, H=16, is_causal=False, window=None, segments=False,
             mask=False, bias=None, soft_cap=None, hide_rows=False, dtype=jnp.float32):
  """Random canonical inputs [B,T,N,H], [B,S,K,H] and the options both paths take."""
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.normal(size=shape), dtype)
             for shape in ((B, T, N, H), (B, S, K, H), (B, S, K, H)))
  opts = dict(is_causal=is_causal, window=window, logits_soft_cap=soft_cap,
              q_segment_ids=None, kv_segment_ids=None, mask=None)
  if segments:
    opts["q_segment_ids"] = jnp.asarray(np.sort(rng.integers(0, 3, (B, T)), -1), jnp.int32)
    opts["kv_segment_ids"] = jnp.asarray(np.sort(rng.integers(0, 3, (B, S)), -1), jnp.int32)
  if mask or hide_rows:
    m = rng.random((1, N, T, S)) < 0.7
    if hide_rows:
      m[:, :, 3] = False  # every key hidden from query 3
      m[:, 1, 10:] = False  # head 1 sees nothing after query 10
    opts["mask"] = jnp.asarray(m)
  b = None if bias is None else jnp.asarray(rng.normal(size=bias), jnp.float32)
  return (q, k, v, b), opts


def _dense(q, k, v, bias, opts):
  return attnjax.dot_product_attention(
      q, k, v, bias, opts["mask"], is_causal=opts["is_causal"],
      local_window_size=opts["window"], q_segment_ids=opts["q_segment_ids"],
      kv_segment_ids=opts["kv_segment_ids"], logits_soft_cap=opts["logits_soft_cap"],
      return_lse=True, implementation="xla")


def _blockwise(q, k, v, bias, opts, block_q=32, block_k=32):
  H = q.shape[-1]
  return blockwise.blockwise_attention(q, k, v, bias, opts["mask"], scale=H ** -0.5,
                                       block_q=block_q, block_k=block_k, **_bw_opts(opts))


def _bw_opts(opts):
  return {name: value for name, value in opts.items() if name != "mask"}


def _value_and_grads(attention, cotangent, argnums):
  """(out, lse) and the gradients of a scalar that touches every output and finite lse."""
  def loss(q, k, v, bias):
    out, lse = attention(q, k, v, bias)
    lse_term = jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0) * 0.3)
    return jnp.sum(out.astype(jnp.float32) * cotangent) + lse_term, (out, lse)
  grad_fn = jax.grad(loss, argnums, has_aux=True)
  return lambda *args: grad_fn(*args)[::-1]


def _compare(args, opts, tol, **blocks):
  q, k, v, bias = args
  cotangent = jnp.asarray(np.random.default_rng(1).normal(size=q.shape), jnp.float32)
  argnums = (0, 1, 2) if bias is None else (0, 1, 2, 3)
  (out_d, lse_d), grads_d = jax.jit(_value_and_grads(lambda *a: _dense(*a, opts), cotangent,
                                                  argnums))(*args)
  (out_b, lse_b), grads_b = jax.jit(_value_and_grads(lambda *a: _blockwise(*a, opts, **blocks),
                                                  cotangent, argnums))(*args)
  assert out_b.dtype == q.dtype and out_b.shape == q.shape
  assert lse_b.dtype == jnp.float32 and lse_b.shape == lse_d.shape
  np.testing.assert_allclose(np.asarray(out_b, np.float32), np.asarray(out_d, np.float32),
                             atol=tol, rtol=tol)
  np.testing.assert_array_equal(np.isneginf(lse_b), np.isneginf(lse_d))
  np.testing.assert_allclose(lse_b, lse_d, atol=tol, rtol=tol)
  for name, g_d, g_b in zip("qkvb", grads_d, grads_b, strict=False):
    assert g_b.shape == g_d.shape and g_b.dtype == g_d.dtype, name
    assert np.all(np.isfinite(np.asarray(g_b, np.float32))), name
    scale = max(1.0, float(jnp.max(jnp.abs(g_d.astype(jnp.float32)))))
    np.testing.assert_allclose(np.asarray(g_b, np.float32), np.asarray(g_d, np.float32),
                               atol=tol * scale, rtol=tol, err_msg=f"d{name}")


@pytest.mark.parametrize("case", CASES)
def test_matches_dense_unrolled(case):
  args, opts = _problem(**CASES[case])
  _compare(args, opts, tol=2e-5)


@pytest.mark.parametrize("case", ["mask_bias_cap", "mha_bias_col", "fully_masked_rows"])
def test_matches_dense_lax_loops(case, monkeypatch):
  monkeypatch.setattr(blockwise, "_MAX_UNROLLED_PAIRS", 0)
  args, opts = _problem(**CASES[case])
  _compare(args, opts, tol=2e-5, block_q=8, block_k=16)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_query_stays_in_its_row(bad):
  # Unrolled steps wait on a zero computed from the previous step's results; a NaN or inf
  # there must not reach other rows.
  (q, k, v, _), opts = _problem(B=1, T=64, S=64, N=2, K=2, is_causal=True)
  q = q.at[0, 0, 0, 0].set(bad)
  out_d, _ = _dense(q, k, v, None, opts)
  out_b, _ = jax.jit(lambda q, k, v: _blockwise(q, k, v, None, opts, block_q=16, block_k=16))(
      q, k, v)
  finite = np.isfinite(np.asarray(out_d))
  assert not finite[0, 0, 0].all() and finite[:, 1:].all() and finite[:, :, 1].all()
  np.testing.assert_array_equal(np.isfinite(np.asarray(out_b)), finite)
  np.testing.assert_allclose(np.asarray(out_b)[finite], np.asarray(out_d)[finite], atol=2e-5)


def test_matches_dense_eagerly():
  (q, k, v, bias), opts = _problem(T=20, S=24, is_causal=True, segments=True)
  out_d, lse_d = _dense(q, k, v, bias, opts)
  out_b, lse_b = _blockwise(q, k, v, bias, opts, block_q=8, block_k=16)
  np.testing.assert_allclose(out_b, out_d, atol=2e-5, rtol=2e-5)
  np.testing.assert_allclose(lse_b, lse_d, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("case,head_dim", [("causal", 12), ("mask_bias_cap", 16)])
def test_bfloat16(case, head_dim):
  # Head dim 12: a scale that is not a power of two stays on the logits instead of q.
  args, opts = _problem(**CASES[case], H=head_dim, dtype=jnp.bfloat16)
  _compare(args, opts, tol=2e-2)


def test_fully_masked_rows_are_zero():
  (q, k, v, bias), opts = _problem(**CASES["fully_masked_rows"])
  out, lse = jax.jit(lambda *a: _blockwise(*a, opts))(q, k, v, bias)
  np.testing.assert_array_equal(out[:, 3], 0.0)
  np.testing.assert_array_equal(out[:, 11:, 1], 0.0)
  assert np.all(np.isneginf(lse[:, :, 3])) and np.all(np.isneginf(lse[:, 1, 11:]))
  dq = jax.jit(jax.grad(lambda q: jnp.sum(_blockwise(q, k, v, bias, opts)[0])))(q)
  np.testing.assert_array_equal(dq[:, 3], 0.0)


def test_public_api_and_vmap():
  (q, k, v, _), _ = _problem(B=2, T=300, S=300, N=2, K=1, H=8)
  public = lambda q, k, v, impl: attnjax.dot_product_attention(  # noqa: E731
      q, k, v, is_causal=True, local_window_size=(100, 0), implementation=impl)
  expected = public(q, k, v, "xla")
  np.testing.assert_allclose(jax.jit(public, static_argnums=3)(q, k, v, "blockwise"),
                             expected, atol=2e-5, rtol=2e-5)
  # Unbatched inputs [T, N, H] under vmap.
  vmapped = jax.vmap(lambda q, k, v: public(q, k, v, "blockwise"))(q, k, v)
  np.testing.assert_allclose(vmapped, expected, atol=2e-5, rtol=2e-5)


def _count_dots(f, *args):
  jaxpr = jax.make_jaxpr(f)(*args)
  return str(jaxpr).count("dot_general")


def test_causal_skips_hidden_blocks():
  (q, k, v, _), opts = _problem(T=64, S=64)
  full = _count_dots(lambda *a: _blockwise(*a, None, opts, block_q=16, block_k=16), q, k, v)
  causal = _count_dots(lambda *a: _blockwise(*a, None, dict(opts, is_causal=True), block_q=16,
                                             block_k=16), q, k, v)
  # 4 x 4 blocks, two matmuls each: 16 pairs visited without causality, 10 with it.
  assert (full, causal) == (2 * 16, 2 * 10)
  window = _count_dots(lambda *a: _blockwise(*a, None, dict(opts, window=(0, 0)), block_q=16,
                                             block_k=16), q, k, v)
  assert window == 2 * 4


@pytest.mark.parametrize("unrolled", [True, False])
def test_no_quadratic_buffers(unrolled, monkeypatch, assert_no_quadratic_buffers):
  if not unrolled:
    monkeypatch.setattr(blockwise, "_MAX_UNROLLED_PAIRS", 0)
  T = S = 512
  (q, k, v, _), opts = _problem(B=1, T=T, S=S, N=1, K=1, H=32, is_causal=True)

  def loss(q, k, v):
    return jnp.sum(_blockwise(q, k, v, None, opts, block_q=128, block_k=128)[0])

  compiled = jax.jit(jax.value_and_grad(loss, (0, 1, 2))).lower(q, k, v).compile()
  assert_no_quadratic_buffers(compiled, T, S)


def test_default_block_sizes():
  assert blockwise.default_block_sizes(64, 512, 512, "cpu") == (128, 64)
  assert blockwise.default_block_sizes(1, 32768, 32768, "cpu") == (1024, 1024)
  assert blockwise.default_block_sizes(16, 2048, 2048, "cpu") == (256, 256)
  assert blockwise.default_block_sizes(1, 5, 3, "cpu") == (8, 4)


@pytest.mark.parametrize("case", ["causal_window_segments", "mha_bias_col"])
def test_backward_from_given_results_sums_over_key_parts(case):
  """Gradients of each half of the keys, from the results over all keys, are the dense
  attention's gradients restricted to that half."""
  (q, k, v, _), opts = _problem(**{**CASES[case], "bias": None})
  mask = attnjax.masks.from_arguments(opts["mask"], opts["is_causal"], opts["window"],
                                      opts["q_segment_ids"], opts["kv_segment_ids"],
                                      (q.shape[0],), q.shape[2], q.shape[1], k.shape[1])
  rng = np.random.default_rng(2)
  dout = jnp.asarray(rng.normal(size=q.shape), jnp.float32)
  dlse = jnp.asarray(rng.normal(size=(q.shape[0], q.shape[2], q.shape[1])), jnp.float32)
  (out, lse), vjp = jax.vjp(lambda q, k, v: _dense(q, k, v, None, opts), q, k, v)
  dq, dk, dv = vjp((dout, jnp.where(jnp.isfinite(lse), dlse, 0.0)))
  B, T, N, _ = q.shape

  def part(start, stop):  # keys [start, stop) and the mask on them
    shifted = attnjax.masks.MaskFn(lambda b, h, i, j: mask(b, h, i, j + start))
    return slice(start, stop), shifted.canonical((B,), N, T, stop - start)
  parts = [part(0, 30), part(30, k.shape[1])]
  grads = [blockwise.blockwise_attention_backward(
      q, k[:, keys], v[:, keys], m, out, lse, dout, dlse, scale=q.shape[-1] ** -0.5,
      logits_soft_cap=opts["logits_soft_cap"], block_q=8, block_k=16) for keys, m in parts]
  np.testing.assert_allclose(grads[0][0] + grads[1][0], dq, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(jnp.concatenate([grads[0][1], grads[1][1]], 1), dk, atol=1e-5,
                             rtol=1e-5)
  np.testing.assert_allclose(jnp.concatenate([grads[0][2], grads[1][2]], 1), dv, atol=1e-5,
                             rtol=1e-5)
