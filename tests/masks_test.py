"""Tests for `attnjax.masks` against explicit loops and the matching attention options.

Masks are bool, `[..., heads, q_len, kv_len]` (heads often 1 or absent); True means attend.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attnjax


def loop_mask(leading, q_len, kv_len, visible):
  """`[*leading, 1, q_len, kv_len]` of `visible(index, i, j)`; just `[q_len, kv_len]` if None."""
  out = np.zeros((*(leading or ()), 1, q_len, kv_len), bool)
  for index in np.ndindex(*(leading or ())):
    for i in range(q_len):
      for j in range(kv_len):
        out[index + (0, i, j)] = visible(index, i, j)
  return out if leading is not None else out[0]


def assert_mask_equal(got, want):
  assert got.dtype == jnp.bool_ and got.shape == want.shape
  np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize(
  "q_len, kv_len, offset",
  [(4, None, 0), (3, 6, 0), (6, 3, 0), (3, 6, 3), (4, 4, -1)],
)
def test_causal_mask(q_len, kv_len, offset, eager_and_jit):
  kv = q_len if kv_len is None else kv_len
  want = loop_mask(None, q_len, kv, lambda _, i, j: j <= i + offset)
  for got in eager_and_jit(
    attnjax.causal_mask, dict(offset=jnp.int32(offset)), q_len=q_len, kv_len=kv_len
  ):
    assert_mask_equal(got, want)
  if offset == 0:
    assert_mask_equal(attnjax.causal_mask(q_len, kv_len), want)


def test_causal_mask_with_traced_offset_for_decoding():
  """One query at a time against a cache of 6: query at step t sees keys 0..t."""
  step = jax.jit(lambda t: attnjax.causal_mask(1, 6, offset=t))
  for t in range(6):
    np.testing.assert_array_equal(step(t), np.arange(6)[None, :] <= t)
  offsets = np.array([0, 2, 5])
  batched = jax.vmap(lambda t: attnjax.causal_mask(2, 6, offset=t))(offsets)
  want = np.arange(6)[None, None, :] <= np.arange(2)[None, :, None] + offsets[:, None, None]
  np.testing.assert_array_equal(batched, want)


@pytest.mark.parametrize("leading", [(), (2, 3)])
def test_padding_mask(leading, eager_and_jit):
  rng = np.random.default_rng(0)
  q_valid = rng.random((*(leading or ()), 4)) < 0.6
  kv_valid = rng.random((*(leading or ()), 5)) < 0.6
  want = loop_mask(leading, 4, 5, lambda b, i, j: q_valid[b][i] and kv_valid[b][j])
  for got in eager_and_jit(attnjax.padding_mask, dict(q_valid=q_valid, kv_valid=kv_valid)):
    assert_mask_equal(got, want)


@pytest.mark.parametrize("q_lengths, kv_lengths", [(3, 2), ([4, 0, 2], [1, 5, 3])])
def test_lengths_mask(q_lengths, kv_lengths, eager_and_jit):
  q_lengths, kv_lengths = np.array(q_lengths, np.int32), np.array(kv_lengths, np.int32)
  leading = q_lengths.shape
  want = loop_mask(leading, 4, 5, lambda b, i, j: i < q_lengths[b] and j < kv_lengths[b])
  lengths = dict(q_lengths=q_lengths, kv_lengths=kv_lengths)
  for got in eager_and_jit(attnjax.lengths_mask, lengths, q_len=4, kv_len=5):
    assert_mask_equal(got, want)


def test_lengths_mask_refuses_negative_or_fractional_lengths():
  with pytest.raises(ValueError, match=r"q_lengths must be non-negative, got \[2, -1\]"):
    attnjax.lengths_mask(np.array([2, -1]), np.array([1, 1]), 3, 3)
  with pytest.raises(ValueError, match="kv_lengths must be non-negative"):
    attnjax.lengths_mask(1, -2, 3, 3)
  with pytest.raises(TypeError, match="kv_lengths must be integers"):
    attnjax.lengths_mask(1, 2.5, 3, 3)
  with pytest.raises(ValueError, match="q_len must be a non-negative int"):
    attnjax.lengths_mask(1, 1, -3, 3)
  # Traced lengths cannot be checked; in range they give the loop's mask.
  want = loop_mask((2,), 3, 3, lambda b, i, j: i < [1, 3][b[0]] and j < [2, 0][b[0]])
  traced = jax.jit(attnjax.lengths_mask, static_argnums=(2, 3))
  assert_mask_equal(traced(np.array([1, 3]), np.array([2, 0]), 3, 3), want)


@pytest.mark.parametrize("leading", [(), (2,)])
def test_segment_mask(leading, eager_and_jit):
  rng = np.random.default_rng(1)
  q_ids = rng.integers(0, 3, (*(leading or ()), 4)).astype(np.int32)
  kv_ids = rng.integers(0, 3, (*(leading or ()), 6)).astype(np.int32)
  want = loop_mask(leading, 4, 6, lambda b, i, j: q_ids[b][i] == kv_ids[b][j])
  ids = dict(q_segment_ids=q_ids, kv_segment_ids=kv_ids)
  for got in eager_and_jit(attnjax.segment_mask, ids):
    assert_mask_equal(got, want)


@pytest.mark.parametrize(
  "q_len, kv_len, window, left, right",
  [(5, 5, 1, 1, 1), (4, 7, (2, 0), 2, 0), (7, 4, (0, 3), 0, 3), (3, 3, 0, 0, 0)],
)
def test_sliding_window_mask(q_len, kv_len, window, left, right, eager_and_jit):
  want = loop_mask(None, q_len, kv_len, lambda _, i, j: i - left <= j <= i + right)
  for got in eager_and_jit(
    attnjax.sliding_window_mask, {}, q_len=q_len, kv_len=kv_len, window=window
  ):
    assert_mask_equal(got, want)


@pytest.mark.parametrize("window", [-1, (1, -2)])
def test_sliding_window_mask_rejects_negative_windows(window):
  with pytest.raises(ValueError, match="window"):
    attnjax.sliding_window_mask(4, 4, window)


def test_sliding_window_mask_takes_concrete_but_not_traced_jax_windows():
  want = loop_mask(None, 4, 5, lambda _, i, j: i - 2 <= j <= i + 1)
  assert_mask_equal(attnjax.sliding_window_mask(4, 5, (jnp.asarray(2), jnp.asarray(1))), want)
  assert_mask_equal(attnjax.sliding_window_mask(4, 5, jnp.asarray([2, 1])), want)
  with pytest.raises(ValueError, match="local_window_size must be static"):
    jax.jit(lambda w: attnjax.sliding_window_mask(4, 5, w))(jnp.asarray(1))


def test_combine_masks(eager_and_jit):
  rng = np.random.default_rng(2)
  causal = np.tril(np.ones((4, 5), bool))
  padding = rng.random((2, 1, 4, 5)) < 0.7
  per_head = rng.random((3, 4, 5)) < 0.7
  masks = [causal, None, padding, per_head]
  want = causal & padding & per_head
  for got in eager_and_jit(lambda masks: attnjax.combine_masks(*masks), dict(masks=masks)):
    assert_mask_equal(got, want)
  assert_mask_equal(attnjax.combine_masks(None, padding), padding)
  assert attnjax.combine_masks(None, None) is None
  assert attnjax.combine_masks() is None


def test_masks_match_the_attention_options():
  """Helper masks passed as `mask` give the same attention as the built-in options."""
  rng = np.random.default_rng(3)
  T, S = 5, 6
  q, k, v = (rng.standard_normal((2, n, 2, 4)).astype(np.float32) for n in (T, S, S))
  q_ids = np.array([[0, 0, 1, 1, 2], [0, 1, 1, 1, 1]], np.int32)
  kv_ids = np.array([[0, 1, 1, 0, 2, 2], [1, 1, 0, 0, 1, 1]], np.int32)

  @functools.partial(jax.jit, static_argnames=("window",))
  def both(mask, q_ids, kv_ids, window):
    by_option = attnjax.dot_product_attention(
      q,
      k,
      v,
      is_causal=True,
      local_window_size=window,
      q_segment_ids=q_ids,
      kv_segment_ids=kv_ids,
      return_lse=True,
    )
    by_mask = attnjax.dot_product_attention(q, k, v, mask=mask, return_lse=True)
    return by_option, by_mask

  mask = attnjax.combine_masks(
    attnjax.causal_mask(T, S),
    attnjax.sliding_window_mask(T, S, (1, 2)),
    attnjax.segment_mask(q_ids, kv_ids),
  )
  by_option, by_mask = both(mask, q_ids, kv_ids, (1, 2))
  for got, want in zip(by_mask, by_option, strict=True):
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_vmap_over_unbatched_inputs_matches_batched_call():
  rng = np.random.default_rng(4)
  q_valid, kv_valid = rng.random((3, 4)) < 0.6, rng.random((3, 5)) < 0.6
  np.testing.assert_array_equal(
    jax.vmap(attnjax.padding_mask)(q_valid, kv_valid), attnjax.padding_mask(q_valid, kv_valid)
  )
  q_ids, kv_ids = rng.integers(0, 2, (3, 4)), rng.integers(0, 2, (3, 5))
  np.testing.assert_array_equal(
    jax.vmap(attnjax.segment_mask)(q_ids, kv_ids), attnjax.segment_mask(q_ids, kv_ids)
  )
  q_lengths, kv_lengths = np.array([1, 4, 0]), np.array([5, 2, 3])
  lengths_mask = functools.partial(attnjax.lengths_mask, q_len=4, kv_len=5)
  np.testing.assert_array_equal(
    jax.vmap(lengths_mask)(q_lengths, kv_lengths), lengths_mask(q_lengths, kv_lengths)
  )
  masks = (rng.random((3, 2, 4, 5)) < 0.5, rng.random((3, 1, 4, 5)) < 0.5)
  np.testing.assert_array_equal(
    jax.vmap(attnjax.combine_masks)(*masks), attnjax.combine_masks(*masks)
  )
