"""Wrong-answer regressions: unbounded windows, non-finite padding, soft cap inf, cache overrun.

Each test compares with an independent result (no window, the same inputs without padding)
on every implementation and, for the blockwise path, on unrolled and lax-loop plans.
"""

import sys

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attnjax
from attnjax import blockwise

BIG = [2**31 - 1, np.iinfo(np.int32).max, sys.maxsize, 2**40]
PLANS = ["xla", "blockwise_unrolled", "blockwise_loops"]


def _attention(plan, monkeypatch):
  if plan == "blockwise_loops":
    monkeypatch.setattr(blockwise, "_MAX_UNROLLED_PAIRS", 0)
  impl = "xla" if plan == "xla" else "blockwise"
  def fn(q, k, v, **kw):
    return attnjax.dot_product_attention(q, k, v, implementation=impl, return_lse=True,
                                         block_sizes=None if impl == "xla" else (16, 16), **kw)
  return fn


def _value_and_grad(fn, q, k, v, **kw):
  def loss(q, k, v):
    out, lse = fn(q, k, v, **kw)
    return jnp.sum(jnp.sin(out.astype(jnp.float32))), (out, lse)
  (_, (out, lse)), grads = jax.jit(jax.value_and_grad(loss, (0, 1, 2), has_aux=True))(q, k, v)
  return [np.asarray(x, np.float32) for x in (out, lse, *grads)]


@hypothesis.settings(max_examples=8)
@hypothesis.given(
    left=st.sampled_from(["T-1", "T", *BIG]), right=st.sampled_from(["S-1", "S", *BIG]),
    is_causal=st.booleans(), dtype=st.sampled_from([jnp.float32, jnp.bfloat16]),
    seed=st.integers(0, 2**16))
@pytest.mark.parametrize("plan", PLANS)
def test_window_as_long_as_the_sequence_is_no_window(plan, left, right, is_causal, dtype, seed):
  with pytest.MonkeyPatch.context() as monkeypatch:
    fn = _attention(plan, monkeypatch)
    T, S = 37, 45
    left = {"T-1": T - 1, "T": T}.get(left, left)
    right = {"S-1": S - 1, "S": S}.get(right, right)
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.normal(size=(2, T, 4, 8)), dtype)
    k, v = (jnp.asarray(rng.normal(size=(2, S, 2, 8)), dtype) for _ in range(2))
    got = _value_and_grad(fn, q, k, v, is_causal=is_causal, local_window_size=(left, right))
    want = _value_and_grad(fn, q, k, v, is_causal=is_causal)
    for g, w in zip(got, want):
      np.testing.assert_array_equal(g, w)


def test_issue_reproducers_for_huge_windows():
  rng = np.random.default_rng(0)
  q, k, v = (rng.normal(size=(1, 512, 2, 16)).astype("f4") for _ in range(3))
  big = 2**31 - 1
  np.testing.assert_array_equal(
      attnjax.dot_product_attention(q, k, v, is_causal=True, local_window_size=(big, big)),
      attnjax.dot_product_attention(q, k, v, is_causal=True))
  q, k, v = (rng.normal(size=(2, 1024, 2, 8)).astype("f4") for _ in range(3))
  def grad(window):
    return jax.grad(lambda q: jnp.sum(jnp.sin(attnjax.dot_product_attention(
        q, k, v, is_causal=True, local_window_size=window))))(q)
  np.testing.assert_array_equal(grad((big, 0)), grad((sys.maxsize, 0)))
  np.testing.assert_allclose(grad((big, 0)), jax.grad(lambda q: jnp.sum(jnp.sin(
      attnjax.dot_product_attention(q, k, v, is_causal=True, implementation="xla"))))(q),
      atol=1e-5)


def test_huge_window_in_masks_and_cache_decoding():
  np.testing.assert_array_equal(attnjax.sliding_window_mask(5, 7, (sys.maxsize, 2**31 - 1)),
                                np.ones((5, 7), bool))
  params = attnjax.init_multi_head_attention(jax.random.key(0), 16, 2, 8)
  x = jax.random.normal(jax.random.key(1), (1, 6, 16))
  full = attnjax.multi_head_attention(params, x, is_causal=True)
  cache = attnjax.init_kv_cache((1,), 8, 2, 8)
  out, _ = attnjax.multi_head_attention(params, x, cache=cache, local_window_size=sys.maxsize)
  np.testing.assert_allclose(out, full, atol=1e-6)


@pytest.mark.parametrize("plan", PLANS)
def test_soft_cap_inf_means_no_cap(plan, monkeypatch):
  fn = _attention(plan, monkeypatch)
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.normal(size=(2, 20, 2, 8)), jnp.float32) for _ in range(3))
  for g, w in zip(_value_and_grad(fn, q, k, v, logits_soft_cap=float("inf")),
                  _value_and_grad(fn, q, k, v)):
    np.testing.assert_array_equal(g, w)
  for bad in (0.0, -1.0, float("nan")):
    with pytest.raises(ValueError, match="logits_soft_cap"):
      fn(q, k, v, logits_soft_cap=bad)


def test_cache_overrun_under_jit_poisons_the_outputs():
  from flax import nnx

  from attnjax import linen as attn_linen
  from attnjax import nnx as attn_nnx

  params = attnjax.init_multi_head_attention(jax.random.key(0), 16, 2, 8)
  x = jax.random.normal(jax.random.key(1), (1, 5, 16))
  step = jax.jit(lambda cache, x_t: attnjax.multi_head_attention(
      params, x_t, cache=cache, return_weights=True))
  cache = attnjax.init_kv_cache((1,), 4, 2, 8)
  for t in range(5):
    (out, weights), cache = step(cache, x[:, t:t + 1])
    assert np.all(np.isfinite(out)) == (t < 4) and np.all(np.isnan(out)) == (t >= 4)
    assert np.all(np.isnan(weights)) == (t >= 4)
  with pytest.raises(ValueError, match="4 positions"):  # Eagerly it is an error.
    attnjax.multi_head_attention(params, x, cache=attnjax.init_kv_cache((1,), 4, 2, 8))

  module = attn_linen.MultiHeadAttention(num_heads=2, decode=True)
  variables = module.init(jax.random.key(2), x[:, :4])
  apply = jax.jit(lambda v, x_t: module.apply(v, x_t, mutable=["cache"]))
  outs = []
  for t in range(5):
    out, state = apply(variables, x[:, t:t + 1])
    variables = {**variables, **state}
    outs.append(out)
  assert np.all(np.isfinite(outs[3])) and np.all(np.isnan(outs[4]))

  layer = attn_nnx.MultiHeadAttention(16, 2, decode=True, rngs=nnx.Rngs(0))
  layer.init_cache(x[:, :4].shape)
  call = nnx.jit(lambda layer, x_t: layer(x_t))
  outs = [call(layer, x[:, t:t + 1]) for t in range(5)]
  assert np.all(np.isfinite(outs[3])) and np.all(np.isnan(outs[4]))


def _padded_problem(seed, T=40, S=48):
  rng = np.random.default_rng(seed)
  q = rng.normal(size=(2, T, 4, 8)).astype("f4")
  k, v = (rng.normal(size=(2, S, 2, 8)).astype("f4") for _ in range(2))
  return q, k, v


def _plant(x, rows, values):
  """x with the entries [b, row, head, 0] for each row in rows[b] set to cycling values."""
  x = x.copy()
  for b, rs in enumerate(rows):
    for n, r in enumerate(rs):
      x[b, r, n % x.shape[2], n % x.shape[3]] = values[n % len(values)]
  return x


BAD = [np.nan, np.inf, -np.inf]


def _masked_loss_grads(fn, q, k, v, live_rows, **kw):
  """Outputs and gradients of a loss that reads only the live query rows ([B, T] bool)."""
  ct = np.random.default_rng(7).normal(size=q.shape).astype("f4") * live_rows[..., None, None]
  def loss(q, k, v):
    out, lse = fn(q, k, v, **kw)
    lse_term = jnp.where(live_rows[:, None, :] & jnp.isfinite(lse), lse, 0.0)
    return jnp.sum(jnp.where(live_rows[..., None, None], out, 0.0) * ct) + jnp.sum(lse_term), out
  (_, out), grads = jax.jit(jax.value_and_grad(loss, (0, 1, 2), has_aux=True))(q, k, v)
  return np.asarray(out), [np.asarray(g) for g in grads]


@pytest.mark.parametrize("plan", PLANS)
@pytest.mark.parametrize("masking", ["lengths", "segments", "causal"])
def test_non_finite_padding_reaches_no_other_position(plan, masking, monkeypatch):
  fn = _attention(plan, monkeypatch)
  T, S = 40, 48
  q, k, v = _padded_problem(0, T, S)
  q_len, kv_len = np.array([31, 40]), np.array([29, 48])
  pad_q = [range(q_len[b], T) for b in range(2)]
  pad_kv = [range(kv_len[b], S) for b in range(2)]
  if masking == "lengths":
    kw = dict(mask=attnjax.lengths_mask(q_len, kv_len, T, S))
  elif masking == "segments":  # Padding is a segment of its own, seen by padding queries.
    kw = dict(q_segment_ids=(np.arange(T) >= q_len[:, None]).astype("i4"),
              kv_segment_ids=(np.arange(S) >= kv_len[:, None]).astype("i4"))
  else:  # Padding only at the end of the keys; padded queries see it and are not read.
    q, k, v = _padded_problem(0, S, S)
    q_len, pad_q = kv_len, pad_kv
    kw = dict(is_causal=True)
  live = np.arange(q.shape[1]) < q_len[:, None]
  bad_q, bad_k, bad_v = (_plant(x, pads, BAD) for x, pads in ((q, pad_q), (k, pad_kv),
                                                                (v, pad_kv)))
  zero = lambda x, pads: _plant(x, pads, [0.0])  # noqa: E731
  got_out, got_grads = _masked_loss_grads(fn, bad_q, bad_k, bad_v, live, **kw)
  want_out, want_grads = _masked_loss_grads(fn, zero(q, pad_q), zero(k, pad_kv),
                                            zero(v, pad_kv), live, **kw)
  np.testing.assert_allclose(got_out[live], want_out[live], rtol=1e-6, atol=1e-6)
  for name, g, w in zip("qkv", got_grads, want_grads):
    assert np.all(np.isfinite(g)), f"d{name} is not finite"
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6, err_msg=f"d{name}")


@pytest.mark.parametrize("plan", PLANS)
@pytest.mark.parametrize("where", ["query", "key", "value"])
def test_a_visible_non_finite_entry_makes_exactly_the_rows_that_see_it_nan(plan, where,
                                                                            monkeypatch):
  fn = _attention(plan, monkeypatch)
  T = S = 36
  q, k, v = _padded_problem(1, T, S)
  segments = (np.arange(T) >= 20).astype("i4")[None].repeat(2, 0)
  kw = dict(is_causal=True, local_window_size=(6, 0), q_segment_ids=segments,
            kv_segment_ids=segments)
  pos, head = 9, 1  # batch 0, position 9, head 1 (key/value head 1 serves query heads 2, 3)
  x = {"query": q, "key": k, "value": v}[where].copy()
  x[0, pos, head, 3] = np.nan
  args = {"query": (x, k, v), "key": (q, x, v), "value": (q, k, x)}[where]
  out, lse = jax.jit(lambda q, k, v: fn(q, k, v, **kw))(*args)
  i, j = np.arange(T)[:, None], np.arange(S)[None]
  visible = (j <= i) & (j >= i - 6) & (segments[0][:, None] == segments[0][None])
  expected = np.zeros((2, T, 4), bool)
  if where == "query":
    expected[0, pos, head] = True
  else:
    expected[0, :, 2] = expected[0, :, 3] = visible[:, pos]
  np.testing.assert_array_equal(np.isnan(np.asarray(out)).any(-1), expected)
  np.testing.assert_array_equal(np.isnan(np.asarray(out)).all(-1), expected)
  np.testing.assert_array_equal(np.isnan(np.asarray(lse)), np.swapaxes(expected, 1, 2))
  clean = fn(q, k, v, **kw)
  np.testing.assert_allclose(np.asarray(out)[~expected], np.asarray(clean[0])[~expected],
                             rtol=1e-6, atol=1e-6)
