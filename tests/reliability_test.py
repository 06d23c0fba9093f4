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
