"""Tests for `score_mod` and `sinks` in `attnjax.dot_product_attention` on every path.

Values are compared with a float64 NumPy attention that applies the modifier to the whole
`[B, N, T, S]` grid of logits at once (the ready-made modifiers themselves are checked against
the papers' formulas in score_mods_test.py) and adds each head's sink to the softmax
denominator; gradients with the dense path and with finite differences.
"""

import functools
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.test_util import check_grads

import attnjax
from attnjax import blockwise, masks, score_mods

B, T, S, N, K, H = 2, 37, 45, 4, 2, 8  # T != S, not powers of two, GQA (G = 2).
PATHS = {  # implementation, block sizes, whether blockwise runs as lax loops
  "xla": ("xla", None, False),
  "unrolled": ("blockwise", (32, 16), False),
  "loops": ("blockwise", (16, 8), True),
}


@pytest.fixture(autouse=True)
def strict_rank_promotion():
  with jax.numpy_rank_promotion("raise"):
    yield


def problem(seed=0, T=T, S=S):
  rng = np.random.default_rng(seed)
  q = jnp.asarray(rng.normal(size=(B, T, N, H)), jnp.float32)
  k, v = (jnp.asarray(rng.normal(size=(B, S, K, H)), jnp.float32) for _ in range(2))
  return rng, q, k, v


def mods(rng):
  table = jnp.asarray(rng.normal(size=(N, 9)), jnp.float32)
  temperature = jnp.asarray(rng.uniform(0.5, 2.0, size=(N,)), jnp.float32)
  fire = score_mods.init_fire(jax.random.key(int(rng.integers(1 << 30))), N)
  return {
    "alibi": score_mods.ALiBi(score_mods.alibi_slopes(N)),
    "alibi_symmetric": score_mods.ALiBi(score_mods.alibi_slopes(N), symmetric=True),
    "t5": score_mods.T5RelativeBias(jnp.asarray(rng.normal(size=(8, N)), jnp.float32),
                                    num_buckets=8, max_distance=20),
    "fire": fire,
    "soft_cap": score_mods.SoftCap(2.0),
    # A closure over a traced table, and a multiplicative per-head temperature.
    "closure": lambda s, b, h, i, j: s + table[h, jnp.clip(i - j, 0, 8)],
    "temperature": lambda s, b, h, i, j: s * temperature[h],
  }


def naive(q, k, v, visible=None, score_mod=None, sinks=None):
  """(out [B, T, N, H], lse [B, N, T]) in float64; rows with no visible key give zeros."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  G = q.shape[2] // k.shape[2]
  k, v = np.repeat(k, G, axis=2), np.repeat(v, G, axis=2)
  Bq, Tq, Nq, Hq = q.shape
  Sk = k.shape[1]
  logits = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(Hq)
  if score_mod is not None:
    index = [np.arange(n, dtype=np.int32).reshape([n if a == axis else 1 for a in range(4)])
             for axis, n in enumerate((Bq, Nq, Tq, Sk))]
    logits = np.asarray(score_mod(jnp.asarray(logits, jnp.float32), *index), np.float64)
  vis = np.ones(logits.shape, bool) if visible is None else np.broadcast_to(visible,
                                                                             logits.shape)
  logits = np.where(vis, logits, -np.inf)
  if sinks is not None:
    logits = np.concatenate(
        [logits, np.broadcast_to(np.asarray(sinks, np.float64)[None, :, None, None],
                                 (Bq, Nq, Tq, 1))], axis=-1)
  m = np.max(logits, -1, keepdims=True)
  m = np.where(np.isfinite(m), m, 0)
  e = np.exp(logits - m)
  total = e.sum(-1, keepdims=True)
  lse = np.where(total[..., 0] > 0, np.log(np.maximum(total[..., 0], 1e-300)) + m[..., 0],
                 -np.inf)
  p = e[..., :Sk] / np.maximum(total, 1e-300)
  return np.einsum("bnts,bsnh->btnh", p, v), lse


def attend(path, q, k, v, monkeypatch=None, **kw):
  impl, blocks, loops = PATHS[path]
  if loops:
    monkeypatch.setattr(blockwise, "_MAX_UNROLLED_PAIRS", 0)
  return attnjax.dot_product_attention(q, k, v, implementation=impl, block_sizes=blocks,
                                       return_lse=True, **kw)


# ----------------------------------------------------------------------------- values


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("name", ["alibi", "alibi_symmetric", "t5", "fire", "soft_cap",
                                  "closure", "temperature"])
def test_score_mods_match_numpy(name, path, monkeypatch):
  rng, q, k, v = problem()
  build, params = modifier(name, rng)
  fn = jax.jit(lambda q, k, v, params: attend(path, q, k, v, monkeypatch,
                                              score_mod=build(params), is_causal=True))
  out, lse = fn(q, k, v, params)
  want_out, want_lse = naive(q, k, v, np.tril(np.ones((T, S), bool)), build(params))
  np.testing.assert_allclose(out, want_out, atol=3e-5, rtol=3e-5)
  np.testing.assert_allclose(lse, want_lse, atol=3e-5, rtol=3e-5)


@pytest.mark.parametrize("path", PATHS)
def test_sinks_match_numpy_with_empty_rows(path, monkeypatch):
  rng, q, k, v = problem(1)
  sinks = jnp.asarray(rng.normal(size=(N,)) * 2, jnp.float32)
  lengths = masks.Lengths(jnp.array([T, 0]), jnp.array([20, S]))  # batch 1: every row empty
  out, lse = jax.jit(lambda q, k, v, s: attend(path, q, k, v, monkeypatch, sinks=s,
                                               mask=lengths & masks.Causal()))(q, k, v, sinks)
  i, j = np.arange(T)[:, None], np.arange(S)[None]
  visible = ((j <= i)[None] & (i < np.array([T, 0])[:, None, None])
             & (j < np.array([20, S])[:, None, None]))[:, None]
  want_out, want_lse = naive(q, k, v, visible, sinks=sinks)
  np.testing.assert_allclose(out, want_out, atol=2e-5, rtol=2e-5)
  np.testing.assert_allclose(lse, want_lse, atol=2e-5, rtol=2e-5)
  np.testing.assert_array_equal(out[1], 0)  # no visible key: zeros, and lse is the sink
  np.testing.assert_allclose(lse[1], np.broadcast_to(sinks[:, None], (N, T)))


def test_sink_shares_the_row_with_the_keys():
  _, q, k, v = problem(2)
  sinks = jnp.array([-1.0, 0.0, 1.0, 3.0])
  w = attnjax.attention_weights(q, k, sinks=sinks, is_causal=True)
  _, lse = attnjax.dot_product_attention(q, k, v, sinks=sinks, is_causal=True,
                                         return_lse=True)
  np.testing.assert_allclose(w.sum(-1), 1 - np.exp(np.asarray(sinks)[:, None] - np.asarray(lse)),
                             atol=1e-6)
  # A sink of -inf is no sink.
  np.testing.assert_allclose(
      attnjax.dot_product_attention(q, k, v, sinks=jnp.full((N,), -jnp.inf),
                                    implementation="blockwise"),
      attnjax.dot_product_attention(q, k, v, implementation="xla"), atol=2e-6)


# ----------------------------------------------------------------------------- gradients


def modifier(name, rng):
  """(build, params): ``build(params)`` is the modifier, params its learnable arrays."""
  if name == "closure":
    return (lambda t: lambda s, b, h, i, j: s + jnp.asarray(t)[h, jnp.clip(i - j, 0, 8)],
            jnp.asarray(rng.normal(size=(N, 9)), jnp.float32))
  if name == "temperature":
    return (lambda t: lambda s, b, h, i, j: s * jnp.asarray(t)[h],
            jnp.asarray(rng.uniform(0.5, 2.0, size=(N,)), jnp.float32))
  return (lambda m: m), mods(rng)[name]


def loss_fn(path, build, mask, seed, monkeypatch=None):
  rng = np.random.default_rng(seed)
  ct = jnp.asarray(rng.normal(size=(B, T, N, H)), jnp.float32)
  lse_ct = jnp.asarray(rng.normal(size=(B, N, T)), jnp.float32)

  def loss(q, k, v, params, sinks):
    out, lse = attend(path, q, k, v, monkeypatch, score_mod=build(params), sinks=sinks,
                      mask=mask)
    return jnp.sum(out * ct) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0) * lse_ct)
  return loss


@pytest.mark.parametrize("path", ["unrolled", "loops"])
@pytest.mark.parametrize("name", ["alibi", "t5", "fire", "soft_cap", "closure",
                                  "temperature"])
def test_gradients_to_modifier_arrays_and_sinks_match_dense(name, path, monkeypatch):
  rng, q, k, v = problem(3)
  build, params = modifier(name, rng)
  sinks = jnp.asarray(rng.normal(size=(N,)), jnp.float32)
  segments = jnp.asarray(np.sort(rng.integers(0, 3, (B, T)), -1))
  kv_segments = jnp.asarray(np.sort(rng.integers(0, 3, (B, S)), -1))
  mask = masks.Segments(segments, kv_segments) & masks.Causal()
  args = (q, k, v, params, sinks)
  grad = functools.partial(jax.grad, argnums=(0, 1, 2, 3, 4))
  want = jax.jit(grad(loss_fn("xla", build, mask, 4)))(*args)
  got = jax.jit(grad(loss_fn(path, build, mask, 4, monkeypatch)))(*args)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    np.testing.assert_allclose(g, w, atol=5e-5, rtol=5e-5)
  if name != "soft_cap":  # The modifier's arrays and the sinks do get gradients.
    assert all(np.any(np.asarray(g) != 0) for g in jax.tree.leaves(got[3:]))


@pytest.mark.parametrize("path", PATHS)
def test_gradients_match_finite_differences(path, monkeypatch):
  T_, S_ = 9, 11
  rng, q, k, v = problem(5, T_, S_)
  build, params = modifier("closure", rng)
  sinks = jnp.asarray(rng.normal(size=(N,)), jnp.float32)
  impl, _, loops = PATHS[path]
  if loops:
    monkeypatch.setattr(blockwise, "_MAX_UNROLLED_PAIRS", 0)

  def f(q, k, v, params, sinks):
    out, lse = attnjax.dot_product_attention(
        q, k, v, score_mod=build(params), sinks=sinks, is_causal=True, implementation=impl,
        block_sizes=None if impl == "xla" else (4, 4), return_lse=True)
    return out, lse

  # Central differences in float32 (attention's logits are float32 whatever the inputs).
  check_grads(f, (q, k, v, params, sinks), order=1, modes=["rev"], eps=1e-2, atol=1e-2,
              rtol=1e-2)


# ----------------------------------------------------------------------------- transforms


def test_vmap_over_batch_and_over_modifiers():
  rng, q, k, v = problem(6)
  slopes = jnp.asarray(rng.uniform(0.1, 1.0, size=(3, N)), jnp.float32)
  sinks = jnp.asarray(rng.normal(size=(3, N)), jnp.float32)

  def one(slopes, sinks, impl):
    return attnjax.dot_product_attention(q, k, v, score_mod=score_mods.ALiBi(slopes),
                                         sinks=sinks, is_causal=True, implementation=impl)
  for impl in ("xla", "blockwise"):
    got = jax.jit(jax.vmap(functools.partial(one, impl=impl)))(slopes, sinks)
    for n in range(3):
      np.testing.assert_allclose(got[n], one(slopes[n], sinks[n], "xla"), atol=2e-5)
  # vmap over the batch: the modifier sees the inner batch index.
  per_example = jax.vmap(lambda q, k, v: attnjax.dot_product_attention(
      q, k, v, score_mod=score_mods.ALiBi(slopes[0]), sinks=sinks[0],
      implementation="blockwise"))(q, k, v)
  np.testing.assert_allclose(per_example, attnjax.dot_product_attention(
      q, k, v, score_mod=score_mods.ALiBi(slopes[0]), sinks=sinks[0]), atol=2e-5)


_MASKS = ["causal", "window", "chunked", "prefix", "segments", "lengths", "fn"]


def _mask(name, rng, T, S):
  if name == "causal":
    return masks.Causal(offset=int(rng.integers(-3, 4)))
  if name == "window":
    return masks.LocalWindow(int(rng.integers(0, 9)), int(rng.integers(0, 9)))
  if name == "chunked":
    return masks.Chunked(int(rng.integers(1, 12)))
  if name == "prefix":
    return masks.PrefixLM(jnp.asarray(rng.integers(0, T, B)))
  if name == "segments":
    return masks.Segments(jnp.asarray(np.sort(rng.integers(0, 4, (B, T)), -1)),
                          jnp.asarray(np.sort(rng.integers(0, 4, (B, S)), -1)))
  if name == "lengths":
    return masks.Lengths(jnp.asarray(rng.integers(0, T + 1, B)),
                         jnp.asarray(rng.integers(0, S + 1, B)))
  return masks.MaskFn(lambda b, h, i, j: (i + j + h) % 4 != 1)


@settings(max_examples=6, deadline=None)
@given(st.lists(st.sampled_from(_MASKS), min_size=1, max_size=3),
       st.lists(st.sampled_from(["&", "|"]), min_size=2, max_size=2),
       st.sampled_from(["alibi", "t5", "fire", "soft_cap", "closure", None]),
       st.booleans(), st.integers(0, 2 ** 20))
def test_random_combinations_agree_with_dense(names, ops, mod_name, use_sinks, seed):
  rng, q, k, v = problem(seed % 7)
  rng = np.random.default_rng(seed)
  mask = masks.as_mask(_mask(names[0], rng, T, S))
  for name, op in zip(names[1:], ops):
    other = _mask(name, rng, T, S)
    mask = mask & other if op == "&" else mask | other
  build, params = modifier(mod_name, rng) if mod_name else ((lambda p: None), None)
  sinks = jnp.asarray(rng.normal(size=(N,)), jnp.float32) if use_sinks else None

  def loss(impl, q, k, v, params, sinks):
    out, lse = attnjax.dot_product_attention(q, k, v, mask=mask, score_mod=build(params),
                                             sinks=sinks, implementation=impl,
                                             block_sizes=(8, 8), return_lse=True)
    return jnp.sum(out ** 2) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0))
  argnums = (0, 1, 2) + ((3,) if mod_name else ()) + ((4,) if use_sinks else ())
  with mock.patch.object(blockwise, "_MAX_UNROLLED_PAIRS", 0):  # lax loops compile fast
    got = jax.jit(jax.value_and_grad(functools.partial(loss, "blockwise"), argnums))(
        q, k, v, params, sinks)
  want = jax.jit(jax.value_and_grad(functools.partial(loss, "xla"), argnums))(
      q, k, v, params, sinks)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    np.testing.assert_allclose(g, w, atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------- errors


def test_bad_score_mod_and_sinks_are_named():
  _, q, k, v = problem()
  attention = functools.partial(attnjax.dot_product_attention, q, k, v)
  with pytest.raises(ValueError, match=r"score_mod must return the score's shape"):
    attention(score_mod=lambda s, b, h, i, j: s[..., :1])
  with pytest.raises(ValueError, match=r"score_mod must return .* float32.*bfloat16"):
    attention(score_mod=lambda s, b, h, i, j: s.astype(jnp.bfloat16))
  with pytest.raises(ValueError, match=r"score_mod must return .*got tuple"):
    attention(score_mod=lambda s, b, h, i, j: (s, s))
  with pytest.raises(TypeError, match=r"score_mod must be a callable"):
    attention(score_mod=3.0)
  with pytest.raises(ValueError, match=r"sinks must have shape \[num_heads\] = \(4,\).*\(2,\)"):
    attention(sinks=jnp.zeros(2))
  with pytest.raises(ValueError, match=r"sinks must have shape .*\(1, 4\)"):
    attention(sinks=jnp.zeros((1, 4)))
  with pytest.raises(TypeError, match=r"sinks must be floating point, got dtype int32"):
    attention(sinks=jnp.zeros(4, jnp.int32))
  with pytest.raises(TypeError, match=r"MaskFn: fn must return bool"):
    attention(mask=masks.MaskFn(lambda b, h, i, j: i - j))
  with pytest.raises(ValueError, match=r"segment"):
    attention(mask=masks.Segments(jnp.zeros((B, T + 1), jnp.int32),
                                  jnp.zeros((B, S), jnp.int32)))
  with pytest.raises(ValueError, match=r"length"):
    attention(mask=masks.Lengths(jnp.zeros((B + 1,), jnp.int32), jnp.zeros((B,), jnp.int32)))
