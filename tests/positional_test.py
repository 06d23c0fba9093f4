"""Tests for `attnjax.positional` against closed forms written as loops.

x is `[..., L, N, H]` (length, heads, head_dim); positions are `[..., L]`.
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


def naive_sinusoidal(positions, dim, max_timescale, layout):
  positions = np.asarray(positions, np.float64)
  half = dim // 2
  out = np.zeros(positions.shape + (dim,))
  for index in np.ndindex(*positions.shape):
    p = positions[index]
    for i in range(half):
      if layout == "interleaved":  # Vaswani et al. 2017.
        angle = p / max_timescale ** (2 * i / dim)
        out[index + (2 * i,)], out[index + (2 * i + 1,)] = np.sin(angle), np.cos(angle)
      else:  # tensor2tensor: [sin | cos], timescales 1 .. max_timescale.
        angle = p * max_timescale ** (-i / (half - 1))
        out[index + (i,)], out[index + (half + i,)] = np.sin(angle), np.cos(angle)
  return out


def naive_rotary(x, positions, max_timescale, layout):
  x, positions = np.asarray(x, np.float64), np.asarray(positions, np.float64)
  *leading, L, N, H = x.shape
  half = H // 2
  out = np.zeros(x.shape)
  for index in np.ndindex(*leading):
    for t in range(L):
      for n in range(N):
        for i in range(half):
          a_at, b_at = (i, i + half) if layout == "half" else (2 * i, 2 * i + 1)
          angle = positions[index + (t,)] * max_timescale ** (-2 * i / H)
          a, b = x[index + (t, n, a_at)], x[index + (t, n, b_at)]
          out[index + (t, n, a_at)] = a * np.cos(angle) - b * np.sin(angle)
          out[index + (t, n, b_at)] = a * np.sin(angle) + b * np.cos(angle)
  return out


RNG = np.random.default_rng(0)
SINUSOIDAL_CASES = {
  "length_interleaved": (6, 8, 10_000.0, "interleaved"),
  "length_concat": (5, 6, 100.0, "concat"),
  "float_positions_interleaved": (RNG.uniform(0, 50, (2, 3, 4)), 8, 10_000.0, "interleaved"),
  "float_positions_concat": (RNG.uniform(0, 50, (2, 3, 4)), 10, 10_000.0, "concat"),
  "int_positions_concat": (RNG.integers(0, 64, (2, 5)), 8, 1_000.0, "concat"),
}


@pytest.mark.parametrize(
  "positions, dim, max_timescale, layout",
  SINUSOIDAL_CASES.values(),
  ids=SINUSOIDAL_CASES.keys(),
)
def test_sinusoidal_matches_closed_form(positions, dim, max_timescale, layout, eager_and_jit):
  options = dict(dim=dim, max_timescale=max_timescale, layout=layout)
  if isinstance(positions, int):
    want = naive_sinusoidal(np.arange(positions), dim, max_timescale, layout)
    results = eager_and_jit(
      attnjax.sinusoidal_position_encoding, {}, positions_or_length=positions, **options
    )
  else:
    want = naive_sinusoidal(positions, dim, max_timescale, layout)
    positions = positions.astype(np.float32 if positions.dtype.kind == "f" else np.int32)
    results = eager_and_jit(
      attnjax.sinusoidal_position_encoding, dict(positions_or_length=positions), **options
    )
  for got in results:
    assert got.dtype == jnp.float32 and got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_sinusoidal_dtype_and_errors():
  got = attnjax.sinusoidal_position_encoding(4, 6, dtype=jnp.bfloat16)
  assert got.dtype == jnp.bfloat16
  want = naive_sinusoidal(np.arange(4), 6, 10_000.0, "interleaved")
  np.testing.assert_allclose(np.asarray(got, np.float32), want, atol=1e-2)
  with pytest.raises(ValueError, match="dim"):
    attnjax.sinusoidal_position_encoding(4, 7)
  with pytest.raises(ValueError, match="layout"):
    attnjax.sinusoidal_position_encoding(4, 6, layout="bogus")


def test_sinusoidal_accepts_numpy_integer_sizes():
  got = attnjax.sinusoidal_position_encoding(np.int64(5), np.int32(6))
  np.testing.assert_allclose(got, naive_sinusoidal(np.arange(5), 6, 10_000.0, "interleaved"),
                             rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("max_timescale", [0.0, -10.0])
def test_non_positive_max_timescale_is_refused(max_timescale):
  with pytest.raises(ValueError, match="max_timescale must be positive"):
    attnjax.sinusoidal_position_encoding(4, 6, max_timescale=max_timescale)
  with pytest.raises(ValueError, match="max_timescale must be positive"):
    attnjax.apply_rotary(np.ones((3, 2, 4), np.float32), np.arange(3),
                         max_timescale=max_timescale)


ROTARY_CASES = {
  "half_int_positions_no_batch": ((5, 2, 8), np.arange(5), 10_000.0, "half"),
  "interleaved_int_positions_no_batch": ((5, 2, 8), np.arange(5), 10_000.0, "interleaved"),
  "half_float_positions_batch": ((2, 4, 3, 6), RNG.uniform(0, 30, (2, 4)), 100.0, "half"),
  "interleaved_float_positions_batch": (
    (2, 4, 3, 6),
    RNG.uniform(-5, 30, (2, 4)),
    10_000.0,
    "interleaved",
  ),
}


@pytest.mark.parametrize(
  "shape, positions, max_timescale, layout", ROTARY_CASES.values(), ids=ROTARY_CASES.keys()
)
def test_rotary_matches_naive_loop(shape, positions, max_timescale, layout, eager_and_jit):
  x = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
  positions = positions.astype(np.float32 if positions.dtype.kind == "f" else np.int32)
  want = naive_rotary(x, positions, max_timescale, layout)
  for got in eager_and_jit(
    attnjax.apply_rotary,
    dict(x=x, positions=positions),
    max_timescale=max_timescale,
    layout=layout,
  ):
    assert got.dtype == jnp.float32 and got.shape == x.shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(  # A rotation preserves the norm of each head vector.
      np.linalg.norm(got, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-5
    )


@pytest.mark.parametrize("layout", ["half", "interleaved"])
def test_rotary_low_precision_keeps_dtype(layout):
  x = np.random.default_rng(2).standard_normal((6, 2, 8)).astype(jnp.bfloat16)
  got = attnjax.apply_rotary(x, np.arange(6), layout=layout)
  assert got.dtype == jnp.bfloat16
  want = naive_rotary(x, np.arange(6), 10_000.0, layout)
  np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=2e-2, atol=2e-2)


def test_rotary_errors():
  with pytest.raises(ValueError, match="5"):
    attnjax.apply_rotary(np.zeros((3, 2, 5), np.float32), np.arange(3))
  with pytest.raises(ValueError, match="layout"):
    attnjax.apply_rotary(np.zeros((3, 2, 4), np.float32), np.arange(3), layout="bogus")
  with pytest.raises(TypeError, match="x must be floating point.*int32"):
    attnjax.apply_rotary(np.ones((3, 2, 4), np.int32), np.arange(3))


_H = 8
_QK = np.random.default_rng(3).standard_normal((2, 1, 1, _H)).astype(np.float32)


@functools.partial(jax.jit, static_argnames="layout")
def _rotated_score(m, n, layout):
  """q.k after rotating q to position m and k to position n."""
  q = attnjax.apply_rotary(_QK[0], m[None], layout=layout)
  k = attnjax.apply_rotary(_QK[1], n[None], layout=layout)
  return jnp.sum(q * k)


@hypothesis.given(
  m=st.integers(0, 64),
  n=st.integers(0, 64),
  shift=st.integers(-64, 512),
  layout=st.sampled_from(["half", "interleaved"]),
)
def test_rotary_score_depends_only_on_relative_position(m, n, shift, layout):
  m, n = np.int32(m), np.int32(n)
  score = _rotated_score(m, n, layout)
  shifted = _rotated_score(m + shift, n + shift, layout)
  bound = np.linalg.norm(_QK[0]) * np.linalg.norm(_QK[1])
  np.testing.assert_allclose(shifted, score, atol=1e-4 * bound)
  want = np.sum(
    naive_rotary(_QK[0], [m], 10_000.0, layout) * naive_rotary(_QK[1], [n], 10_000.0, layout)
  )
  np.testing.assert_allclose(score, want, rtol=1e-4, atol=1e-5 * bound)


def test_vmap_over_unbatched_inputs_matches_batched_call():
  rng = np.random.default_rng(4)
  x = rng.standard_normal((3, 5, 2, 8)).astype(np.float32)
  positions = rng.uniform(0, 20, (3, 5)).astype(np.float32)
  np.testing.assert_allclose(
    jax.vmap(attnjax.apply_rotary)(x, positions),
    attnjax.apply_rotary(x, positions),
    rtol=1e-6,
    atol=1e-6,
  )
  encode = functools.partial(attnjax.sinusoidal_position_encoding, dim=8, layout="concat")
  np.testing.assert_allclose(jax.vmap(encode)(positions), encode(positions), rtol=1e-6, atol=1e-6)


def test_gradients_match_finite_differences():
  grads = functools.partial(check_grads, order=1, modes=["rev"], eps=1e-3)
  rng = np.random.default_rng(5)
  x = rng.standard_normal((4, 2, 6)).astype(np.float32)
  positions = rng.uniform(0, 5, (4,)).astype(np.float32)
  for layout in ("half", "interleaved"):
    grads(jax.jit(functools.partial(attnjax.apply_rotary, layout=layout)), (x, positions))
  for layout in ("interleaved", "concat"):
    encode = functools.partial(attnjax.sinusoidal_position_encoding, dim=6, layout=layout)
    grads(jax.jit(encode), (positions,))


@pytest.mark.parametrize("jit", [False, True])
def test_randomized_positions_are_sorted_distinct_and_in_range(jit):
  fn = attnjax.positional.randomized_positions
  if jit:
    fn = jax.jit(fn, static_argnums=(1, 2, 3))
  pos = np.asarray(fn(jax.random.key(0), 200, 7, 20))
  assert pos.shape == (200, 7) and pos.dtype == np.int32
  assert np.all(np.diff(pos, axis=1) > 0)  # sorted and distinct
  assert pos.min() >= 0 and pos.max() < 20
  # A uniform 7-subset of 20 holds each position with probability 7/20 (Ruoss et al. 2023).
  counts = np.bincount(pos.ravel(), minlength=20) / 200
  np.testing.assert_allclose(counts, 7 / 20, atol=0.12)
  # The whole range is used, not only its start.
  assert pos[:, -1].mean() > 15


def test_randomized_positions_with_lengths_draw_only_the_real_tokens():
  lengths = np.array([0, 3, 5, 2])
  pos = np.asarray(attnjax.positional.randomized_positions(
      jax.random.key(1), 4, 5, 9, lengths=lengths))
  for row, n in zip(pos, lengths, strict=True):
    assert np.all(np.diff(row[:n]) > 0) and np.all(row[:n] < 9)
    np.testing.assert_array_equal(row[n:], 8)
  # The same key, other keys of the batch: another draw.
  other = attnjax.positional.randomized_positions(jax.random.key(2), 4, 5, 9, lengths=lengths)
  assert np.any(np.asarray(other) != pos)


def test_randomized_positions_errors():
  fn = attnjax.positional.randomized_positions
  with pytest.raises(ValueError, match="length=6 distinct positions do not fit below "
                                       "max_position=5"):
    fn(jax.random.key(0), 2, 6, 5)
  with pytest.raises(ValueError, match="batch must be a non-negative int, got -1"):
    fn(jax.random.key(0), -1, 2, 5)
  with pytest.raises(ValueError, match=r"lengths must have shape \[batch\] = \(2,\), got \(3,\)"):
    fn(jax.random.key(0), 2, 2, 5, lengths=np.ones(3, np.int32))
