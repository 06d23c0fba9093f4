"""Tests for `attnjax.score_mods` against NumPy transcriptions of the papers' formulas.

A modifier is called as `mod(score, batch, head, q_idx, kv_idx)` with score `[B, N, T, S]`,
batch `[B, 1, 1, 1]`, head `[1, N, 1, 1]`, q_idx `[1, 1, T, 1]`, kv_idx `[1, 1, 1, S]`.
Every test runs with `jax_numpy_rank_promotion="raise"`.
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import attnjax
from attnjax import score_mods


@pytest.fixture(autouse=True)
def strict_rank_promotion():
  with jax.numpy_rank_promotion("raise"):
    yield


def indices(B, N, q_positions, kv_positions):
  """The broadcastable index arguments for absolute positions q_positions, kv_positions."""
  return (
    jnp.arange(B, dtype=jnp.int32).reshape(B, 1, 1, 1),
    jnp.arange(N, dtype=jnp.int32).reshape(1, N, 1, 1),
    jnp.asarray(q_positions, jnp.int32).reshape(1, 1, -1, 1),
    jnp.asarray(kv_positions, jnp.int32).reshape(1, 1, 1, -1),
  )


def call_eager_and_jit(mod, score, index):
  """`mod(score, *index)` eagerly and with `mod` and all arrays traced under jit."""
  return [mod(score, *index), jax.jit(lambda m, s, i: m(s, *i))(mod, score, index)]


def loop_bias(B, N, q_positions, kv_positions, bias):
  """`[B, N, T, S]` of `bias(h, i, j)` for query position i and key position j."""
  out = np.zeros((B, N, len(q_positions), len(kv_positions)))
  for b, h in np.ndindex(B, N):
    for t, i in enumerate(q_positions):
      for s, j in enumerate(kv_positions):
        out[b, h, t, s] = bias(h, i, j)
  return out


RNG = np.random.default_rng(0)
# (B, N, query positions, key positions): whole sequences, and blocks away from the origin.
GRIDS = {
  "square": (2, 3, np.arange(6), np.arange(6)),
  "block": (1, 4, np.arange(5, 9), np.arange(2, 12)),
  "decode": (2, 2, np.array([20]), np.arange(24)),
}


def check_against_loop(mod, B, N, q_positions, kv_positions, bias, rtol=1e-6, atol=1e-6):
  score = RNG.standard_normal((B, N, len(q_positions), len(kv_positions))).astype(np.float32)
  want = score + loop_bias(B, N, q_positions, kv_positions, bias)
  for got in call_eager_and_jit(mod, score, indices(B, N, q_positions, kv_positions)):
    assert got.dtype == jnp.float32 and got.shape == score.shape
    np.testing.assert_allclose(got, want, rtol=rtol, atol=atol)


def mesh_tf_bucket(relative_position, bidirectional, num_buckets, max_distance):
  """`_relative_position_bucket` of Mesh TensorFlow, transcribed to NumPy (float32 as there)."""
  ret = 0
  n = -np.asarray(relative_position, np.int32)
  if bidirectional:
    num_buckets //= 2
    ret += (n < 0).astype(np.int32) * num_buckets
    n = np.abs(n)
  else:
    n = np.maximum(n, 0)
  max_exact = num_buckets // 2
  is_small = n < max_exact
  with np.errstate(divide="ignore", invalid="ignore"):  # log(0), masked by is_small.
    val_if_large = max_exact + (
      np.log(n.astype(np.float32) / np.float32(max_exact))
      / np.float32(math.log(max_distance / max_exact))
      * np.float32(num_buckets - max_exact)
    ).astype(np.int32)
  val_if_large = np.minimum(val_if_large, num_buckets - 1)
  return ret + np.where(is_small, n, val_if_large)


def naive_bias(mod):
  """`bias(h, i, j)` of an additive modifier, for query position i and key position j."""
  if isinstance(mod, score_mods.ALiBi):
    slopes = np.asarray(mod.slopes, np.float64)
    if mod.symmetric:
      return lambda h, i, j: -slopes[h] * abs(i - j)
    return lambda h, i, j: -slopes[h] * (i - j)  # The paper's -m (i - j).
  if isinstance(mod, score_mods.T5RelativeBias):
    table = np.asarray(mod.table, np.float64)
    return lambda h, i, j: table[
      mesh_tf_bucket(j - i, mod.bidirectional, mod.num_buckets, mod.max_distance), h]
  # FIRE: f(psi(i - j) / psi(max(L, i)))[h], psi(x) = log(|c x| + 1) (Li et al.).
  p = {name: np.asarray(getattr(mod, name), np.float64) for name in (
    "kernel_in", "bias_in", "kernel_out", "bias_out", "c", "threshold_multiplier")}
  L = abs(p["threshold_multiplier"] * mod.init_threshold)

  def psi(x):
    return np.log(abs(p["c"] * x) + 1)

  def bias(h, i, j):
    x = psi(i - j) / (psi(max(L, i)) + mod.eps)
    hidden = np.maximum(x * p["kernel_in"][0] + p["bias_in"], 0.0)
    return hidden @ p["kernel_out"][:, h] + p["bias_out"][h]

  return bias


# ALiBi ------------------------------------------------------------------------------------


def test_alibi_slopes_paper_values():
  # Press et al. 2022, section 3: 8 heads get 1/2, 1/4, ..., 1/256.
  np.testing.assert_allclose(score_mods.alibi_slopes(8), [2.0**-k for k in range(1, 9)])
  # 12 heads: the 8 slopes of 8 heads, then slopes 1, 3, 5, 7 (from 1) of 16 heads.
  want = [2.0**-k for k in range(1, 9)] + [2**-0.5, 2**-1.5, 2**-2.5, 2**-3.5]
  np.testing.assert_allclose(score_mods.alibi_slopes(12), want, rtol=1e-7)
  np.testing.assert_allclose(score_mods.alibi_slopes(1), [2.0**-8])
  assert score_mods.alibi_slopes(5).dtype == jnp.float32


@pytest.mark.parametrize("num_heads", range(1, 41))
def test_alibi_slopes_match_closed_form(num_heads):
  # MPT's closed form (Hugging Face build_alibi_slopes): slopes of the next power of two p,
  # 2^(-8 k / p) for k = 1..p, odd positions first, then even ones, cut to num_heads.
  p = 2 ** math.ceil(math.log2(num_heads))
  slopes = [2.0 ** (-8.0 * k / p) for k in range(1, p + 1)]
  if p != num_heads:
    slopes = (slopes[1::2] + slopes[0::2])[:num_heads]
  np.testing.assert_allclose(score_mods.alibi_slopes(num_heads), slopes, rtol=1e-6)


def test_alibi_slopes_errors():
  for bad in (0, -2, 2.0, True):
    with pytest.raises(ValueError, match="num_heads"):
      score_mods.alibi_slopes(bad)


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("grid", GRIDS.values(), ids=GRIDS.keys())
def test_alibi_matches_loop(grid, symmetric):
  B, N, q_positions, kv_positions = grid
  mod = score_mods.ALiBi(score_mods.alibi_slopes(N), symmetric=symmetric)
  check_against_loop(mod, B, N, q_positions, kv_positions, naive_bias(mod))


def test_alibi_penalizes_past_keys_by_distance():
  bias = score_mods.materialize(score_mods.ALiBi(jnp.array([0.5])), 1, 1, 4, 4)[0, 0]
  np.testing.assert_allclose(np.diag(bias), 0.0)
  np.testing.assert_allclose(bias[3, :], [-1.5, -1.0, -0.5, 0.0])
  symmetric = score_mods.materialize(score_mods.ALiBi(jnp.array([0.5]), symmetric=True),
                                     1, 1, 4, 4)[0, 0]
  np.testing.assert_allclose(symmetric, symmetric.T)
  np.testing.assert_allclose(symmetric[0, :], [0.0, -0.5, -1.0, -1.5])


def test_alibi_errors():
  mod = score_mods.ALiBi(jnp.ones((2, 3)))
  with pytest.raises(ValueError, match=r"slopes.*\(2, 3\)"):
    mod(jnp.zeros((1, 3, 2, 2)), *indices(1, 3, range(2), range(2)))


# T5 relative position bias ----------------------------------------------------------------


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("num_buckets, max_distance", [(32, 128), (64, 256), (8, 20), (6, 7)])
def test_t5_bucket_matches_mesh_tensorflow(bidirectional, num_buckets, max_distance):
  relative_position = np.arange(-1500, 1501, dtype=np.int32)
  want = mesh_tf_bucket(relative_position, bidirectional, num_buckets, max_distance)
  bucket = functools.partial(score_mods.t5_relative_position_bucket,
                             bidirectional=bidirectional, num_buckets=num_buckets,
                             max_distance=max_distance)
  for got in (bucket(relative_position), jax.jit(bucket)(relative_position)):
    assert got.dtype == jnp.int32
    np.testing.assert_array_equal(got, want)
  assert want.min() == 0 and want.max() == num_buckets - 1  # Every bucket is reachable.


# Hand-computed: bidirectional 32 buckets leave 16 a side, 8 exact; larger distances n get
# 8 + int(log(n / 8) / log(128 / 8) * 8). One-directional: 16 exact, 16 + int(log(n / 16) /
# log(8) * 16). relative_position = kv_idx - q_idx; negative for past keys.
T5_HAND = {
  True: {0: 0, -3: 3, 3: 19, -8: 8, -12: 9, -20: 10, -50: 13, -127: 15, -128: 15, -9999: 15,
         20: 26, 9999: 31},
  False: {0: 0, 5: 0, 9999: 0, -5: 5, -15: 15, -20: 17, -64: 26, -127: 31, -9999: 31},
}


@pytest.mark.parametrize("bidirectional", [True, False])
def test_t5_bucket_hand_values(bidirectional):
  relative_position, want = zip(*T5_HAND[bidirectional].items())
  got = score_mods.t5_relative_position_bucket(np.array(relative_position, np.int32),
                                               bidirectional=bidirectional)
  np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("grid", GRIDS.values(), ids=GRIDS.keys())
def test_t5_relative_bias_matches_loop(grid, bidirectional):
  B, N, q_positions, kv_positions = grid
  table = RNG.standard_normal((8, N)).astype(np.float32)
  mod = score_mods.T5RelativeBias(table, num_buckets=8, max_distance=10,
                                  bidirectional=bidirectional)
  check_against_loop(mod, B, N, q_positions, kv_positions, naive_bias(mod))

def test_t5_errors():
  with pytest.raises(TypeError, match="relative_position"):
    score_mods.t5_relative_position_bucket(np.zeros(3, np.float32))
  with pytest.raises(ValueError, match="num_buckets"):
    score_mods.t5_relative_position_bucket(np.zeros(3, np.int32), num_buckets=3)
  with pytest.raises(ValueError, match="max_distance"):
    score_mods.t5_relative_position_bucket(np.zeros(3, np.int32), max_distance=8)
  mod = score_mods.T5RelativeBias(jnp.zeros((16, 2)))
  with pytest.raises(ValueError, match=r"num_buckets=32.*\(16, 2\)"):
    mod(jnp.zeros((1, 2, 3, 3)), *indices(1, 2, range(3), range(3)))


# FIRE -------------------------------------------------------------------------------------


def fire_params(N, hidden=5, init_threshold=6.5):
  mod = score_mods.init_fire(jax.random.key(1), N, hidden=hidden, c=0.3, L=init_threshold)
  # A threshold multiplier away from 1 so that its role is tested.
  return dataclasses.replace(mod, threshold_multiplier=jnp.float32(0.8))


@pytest.mark.parametrize("grid", GRIDS.values(), ids=GRIDS.keys())
def test_fire_matches_loop(grid):
  B, N, q_positions, kv_positions = grid
  mod = fire_params(N)  # L = 0.8 * 6.5 = 5.2: queries on both sides of the threshold.
  check_against_loop(mod, B, N, q_positions, kv_positions, naive_bias(mod), rtol=1e-5,
                     atol=1e-5)


def test_fire_zero_threshold_stays_finite_at_the_origin():
  # L = 0: query 0's denominator psi(0) is 0 and only eps keeps psi(0) / (psi(0) + eps) = 0.
  mod = dataclasses.replace(fire_params(2), threshold_multiplier=jnp.float32(0.0))
  check_against_loop(mod, 1, 2, np.arange(3), np.arange(3), naive_bias(mod), rtol=1e-5,
                     atol=1e-5)


def test_init_fire_defaults_and_ranges():
  mod = score_mods.init_fire(jax.random.key(0), 6)
  # Li et al. 2024, appendix code: width 32, c = 0.1, L = 512 (multiplier 1), eps = 1e-6.
  assert mod.kernel_in.shape == (1, 32) and mod.bias_in.shape == (32,)
  assert mod.kernel_out.shape == (32, 6) and mod.bias_out.shape == (6,)
  assert float(mod.c) == pytest.approx(0.1) and float(mod.threshold_multiplier) == 1.0
  assert mod.init_threshold == 512.0 and mod.eps == 1e-6
  for leaf in jax.tree_util.tree_leaves(mod):
    assert leaf.dtype == jnp.float32
  # nn.Linear's initialization: uniform in +-1/sqrt(fan_in), fan_in 1 then 32.
  for leaf, bound in [(mod.kernel_in, 1.0), (mod.bias_in, 1.0),
                      (mod.kernel_out, 32**-0.5), (mod.bias_out, 32**-0.5)]:
    assert np.all(np.abs(leaf) <= bound) and np.max(np.abs(leaf)) > 0.5 * bound
  with pytest.raises(ValueError, match="hidden"):
    score_mods.init_fire(jax.random.key(0), 6, hidden=0)
  with pytest.raises(ValueError, match="num_heads"):
    score_mods.init_fire(jax.random.key(0), -1)


def test_fire_errors():
  mod = dataclasses.replace(fire_params(2), bias_out=jnp.zeros(3))
  with pytest.raises(ValueError, match=r"bias_out.*\(2,\).*\(3,\)"):
    mod(jnp.zeros((1, 2, 3, 3)), *indices(1, 2, range(3), range(3)))


# Soft-capping -----------------------------------------------------------------------------


def test_soft_cap_matches_closed_form_and_attention_option():
  score = 30 * RNG.standard_normal((2, 3, 4, 5)).astype(np.float32)
  index = indices(2, 3, range(4), range(5))
  for got in call_eager_and_jit(score_mods.SoftCap(7.5), score, index):
    np.testing.assert_allclose(got, 7.5 * np.tanh(score.astype(np.float64) / 7.5), rtol=1e-6)
  assert score_mods.SoftCap(math.inf)(score, *index) is score
  # Softmax of the capped logits: the weights of dot_product_attention's logits_soft_cap.
  q = RNG.standard_normal((4, 3, 8)).astype(np.float32) * 4
  k = RNG.standard_normal((5, 3, 8)).astype(np.float32) * 4
  logits = jnp.einsum("tnh,snh->nts", q, k)[None] / math.sqrt(8)
  capped = score_mods.SoftCap(5.0)(logits, *indices(1, 3, range(4), range(5)))
  np.testing.assert_allclose(
    jax.nn.softmax(capped[0], axis=-1),
    attnjax.attention_weights(q, k, logits_soft_cap=5.0),
    rtol=1e-5, atol=1e-6,
  )


def test_soft_cap_errors():
  for bad in (0.0, -1.0, "5", None):
    with pytest.raises(ValueError, match="cap"):
      score_mods.SoftCap(bad)


# Shared behaviour: gradients, pytrees, vmap, materialize ----------------------------------


def all_mods(N):
  return {
    "alibi": score_mods.ALiBi(score_mods.alibi_slopes(N)),
    "alibi_symmetric": score_mods.ALiBi(score_mods.alibi_slopes(N), symmetric=True),
    "t5": score_mods.T5RelativeBias(RNG.standard_normal((8, N)).astype(np.float32),
                                    num_buckets=8, max_distance=10),
    "fire": fire_params(N),
    "soft_cap": score_mods.SoftCap(3.0),
  }


ADDITIVE = ("alibi", "alibi_symmetric", "t5", "fire")


@pytest.mark.parametrize("name", all_mods(2).keys())
def test_gradients_match_finite_differences(name):
  mod = all_mods(2)[name]
  score = RNG.standard_normal((2, 2, 4, 6)).astype(np.float32)
  index = indices(2, 2, np.arange(4, 8), np.arange(1, 7))
  weights = RNG.standard_normal(score.shape).astype(np.float32)

  def loss(mod, score):  # A random projection, so that every output element matters.
    return jnp.sum(weights * mod(score, *index))

  grads = functools.partial(check_grads, order=1, modes=["rev"], eps=1e-3, atol=2e-2,
                            rtol=2e-2)
  grads(jax.jit(loss), (mod, score))
  if name != "soft_cap":  # The learnable leaves get non-zero gradients.
    leaves = jax.tree_util.tree_leaves(jax.grad(loss)(mod, score))
    assert leaves and all(np.any(np.asarray(leaf) != 0) for leaf in leaves)


@pytest.mark.parametrize("name", all_mods(2).keys())
def test_pytree_leaves_are_the_learnable_arrays(name):
  mod = all_mods(2)[name]
  leaves, treedef = jax.tree_util.tree_flatten(mod)
  want = {"alibi": 1, "alibi_symmetric": 1, "t5": 1, "fire": 6, "soft_cap": 0}[name]
  assert len(leaves) == want
  doubled = jax.tree_util.tree_map(lambda x: 2 * x, mod)
  assert type(doubled) is type(mod) and jax.tree_util.tree_structure(doubled) == treedef
  # Static fields are part of the tree structure: changing one gives a different treedef.
  static_change = {"alibi": dict(symmetric=True), "alibi_symmetric": dict(symmetric=False),
                   "t5": dict(max_distance=11), "fire": dict(eps=1e-3),
                   "soft_cap": dict(cap=4.0)}[name]
  other = dataclasses.replace(mod, **static_change)
  assert jax.tree_util.tree_structure(other) != treedef


@pytest.mark.parametrize("name", all_mods(3).keys())
def test_vmap_over_batch_matches_batched_call(name):
  mod = all_mods(3)[name]
  score = RNG.standard_normal((2, 3, 4, 5)).astype(np.float32)
  batch, head, q_idx, kv_idx = indices(2, 3, np.arange(3, 7), np.arange(5))
  per_example = jax.vmap(mod, in_axes=(0, 0, None, None, None))(
    score, batch, head[0], q_idx[0], kv_idx[0])
  np.testing.assert_allclose(per_example, mod(score, batch, head, q_idx, kv_idx), rtol=1e-6)


@pytest.mark.parametrize("name", ["alibi", "t5", "fire"])
def test_vmap_over_stacked_modifiers(name):
  # One modifier per layer, stacked on a leading axis (as in a scanned model).
  mods = [all_mods(2)[name] for _ in range(3)]
  mods = [jax.tree_util.tree_map(lambda x, k=k: x * (1 + k), m) for k, m in enumerate(mods)]
  stacked = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *mods)
  materialize = functools.partial(score_mods.materialize, batch_size=1, num_heads=2, q_len=4,
                                  kv_len=6)
  got = jax.vmap(lambda m: materialize(m))(stacked)
  for k, m in enumerate(mods):
    np.testing.assert_allclose(got[k], materialize(m), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", ADDITIVE)
def test_materialize_is_the_additive_bias(name):
  mod = all_mods(3)[name]
  bias = score_mods.materialize(mod, 2, 3, 4, 6)
  assert bias.shape == (2, 3, 4, 6) and bias.dtype == jnp.float32
  np.testing.assert_allclose(bias, loop_bias(2, 3, range(4), range(6), naive_bias(mod)), rtol=1e-5,
                             atol=1e-6)
  score = RNG.standard_normal((2, 3, 4, 6)).astype(np.float32)
  np.testing.assert_allclose(mod(score, *indices(2, 3, range(4), range(6))), score + bias,
                             rtol=1e-6, atol=1e-6)


def test_materialized_bias_in_jax_attention_matches_numpy():
  B, T, S, N, H = 1, 5, 7, 4, 8
  mod = score_mods.ALiBi(score_mods.alibi_slopes(N))
  q = RNG.standard_normal((B, T, N, H)).astype(np.float32)
  k = RNG.standard_normal((B, S, N, H)).astype(np.float32)
  v = RNG.standard_normal((B, S, N, H)).astype(np.float32)
  got = jax.nn.dot_product_attention(q, k, v, bias=score_mods.materialize(mod, B, N, T, S))
  slopes = np.asarray(score_mods.alibi_slopes(N), np.float64)
  logits = np.einsum("btnh,bsnh->bnts", q, k) / math.sqrt(H)
  logits = logits + slopes[None, :, None, None] * (np.arange(S) - np.arange(T)[:, None])
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  np.testing.assert_allclose(got, np.einsum("bnts,bsnh->btnh", weights, v), rtol=1e-5,
                             atol=1e-5)


def test_materialize_errors():
  for bad in (0, -1, 2.0):
    with pytest.raises(ValueError, match="q_len"):
      score_mods.materialize(score_mods.SoftCap(1.0), 1, 1, bad, 2)


# AtPositions: a modifier read at position ids ---------------------------------------------


def id_tables(B, T, S):
  """Per-example ids that are not 0, 1, ...: sorted random ones (queries) and a permutation
  with repeats (keys)."""
  q = np.sort(RNG.choice(40, size=(B, T), replace=True), axis=1).astype(np.int32)
  kv = RNG.integers(0, 40, size=(B, S)).astype(np.int32)
  return q, kv


@pytest.mark.parametrize("name", ADDITIVE)
def test_at_positions_matches_loop_over_ids(name):
  B, N, T, S = 2, 3, 4, 6
  mod = all_mods(N)[name]
  q_ids, kv_ids = id_tables(B, T, S)
  at = score_mods.AtPositions(mod, q_ids, kv_ids)
  bias = naive_bias(mod)
  score = RNG.standard_normal((B, N, T, S)).astype(np.float32)
  want = score.astype(np.float64).copy()
  for b, h, t, s in np.ndindex(B, N, T, S):
    want[b, h, t, s] += bias(h, q_ids[b, t], kv_ids[b, s])
  for got in call_eager_and_jit(at, score, indices(B, N, range(T), range(S))):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  # One table for the whole batch ([1, L]) is read for every example.
  shared = score_mods.AtPositions(mod, q_ids[:1], kv_ids[:1])
  got = shared(score, *indices(B, N, range(T), range(S)))
  np.testing.assert_allclose(got[1], want[0] - score[0] + score[1], rtol=1e-5, atol=1e-5)


def test_at_positions_in_attention_matches_dense_bias_and_gradients_reach_the_inner_mod():
  B, T, N, H = 2, 37, 2, 8
  mod = all_mods(N)["fire"]
  ids = np.sort(RNG.choice(200, size=(B, T), replace=False), axis=1).astype(np.int32)
  q, k, v = (RNG.standard_normal((B, T, N, H)).astype(np.float32) for _ in range(3))
  bias = np.zeros((B, N, T, T), np.float32)
  naive = naive_bias(mod)
  for b, h, t, s in np.ndindex(B, N, T, T):
    bias[b, h, t, s] = naive(h, ids[b, t], ids[b, s])

  def dense(mod):
    return jax.nn.dot_product_attention(q, k, v, bias=jnp.asarray(bias) if mod is None else
                                        score_mods.materialize(mod, B, N, T, T), is_causal=True)

  want = dense(None)
  for implementation in ("xla", "blockwise"):
    def loss(mod, implementation=implementation):
      out = attnjax.dot_product_attention(q, k, v, is_causal=True, implementation=implementation,
                                          score_mod=score_mods.AtPositions(mod, ids, ids))
      return out
    np.testing.assert_allclose(jax.jit(loss)(mod), want, rtol=2e-5, atol=2e-5)
    grads = jax.grad(lambda m: jnp.sum(loss(m) ** 2))(mod)
    leaves = jax.tree_util.tree_leaves(grads)
    assert leaves and all(np.all(np.isfinite(np.asarray(leaf))) for leaf in leaves)
    assert np.any(np.asarray(grads.kernel_out) != 0)


def test_at_positions_errors():
  mod = score_mods.ALiBi(score_mods.alibi_slopes(2))
  score = np.zeros((2, 2, 3, 3), np.float32)
  with pytest.raises(ValueError, match=r"q_positions must have shape \[batch or 1, length\]"):
    score_mods.AtPositions(mod, np.zeros((2, 3, 1), np.int32), np.zeros((2, 3), np.int32))(
        score, *indices(2, 2, range(3), range(3)))
  with pytest.raises(ValueError, match="kv_positions has a batch of 3, the attention 2"):
    score_mods.AtPositions(mod, np.zeros((2, 3), np.int32), np.zeros((3, 3), np.int32))(
        score, *indices(2, 2, range(3), range(3)))
