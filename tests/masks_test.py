"""Tests for `attnjax.masks` against explicit loops and the matching attention options.

Masks are bool, `[..., heads, q_len, kv_len]` (heads often 1 or absent); True means attend.
"""

import functools
import re

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


@pytest.mark.parametrize(
  "window, problem",
  [(-1, "non-negative"), ((1, -2), "non-negative"), (1.5, "an int"), ((1, 2, 3), "an int")],
)
def test_sliding_window_mask_errors_name_its_window_argument(window, problem):
  got = re.escape(repr(window))
  with pytest.raises(ValueError, match=rf"^window must be {problem}.*, got {got}$"):
    attnjax.sliding_window_mask(4, 4, window)
  with pytest.raises(ValueError, match=rf"^local_window_size must be {problem}"):
    attnjax.dot_product_attention(*[np.ones((4, 1, 2), np.float32)] * 3, local_window_size=window)


def test_sliding_window_mask_takes_concrete_but_not_traced_jax_windows():
  want = loop_mask(None, 4, 5, lambda _, i, j: i - 2 <= j <= i + 1)
  assert_mask_equal(attnjax.sliding_window_mask(4, 5, (jnp.asarray(2), jnp.asarray(1))), want)
  assert_mask_equal(attnjax.sliding_window_mask(4, 5, jnp.asarray([2, 1])), want)
  with pytest.raises(ValueError, match="^window must be static"):
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


# ----------------------------------------------------------------------------- mask objects

from attnjax import blockwise as _blockwise  # noqa: E402
from attnjax import masks  # noqa: E402


def _rule(name, B, T, S, rng):
  """(mask object, NumPy [B, N|1, T, S] visibility) of a named mask, from its definition."""
  i, j = np.arange(T)[:, None], np.arange(S)[None]
  if name == "causal":
    return masks.Causal(), (j <= i)[None, None]
  if name == "causal_offset":
    return masks.Causal(offset=5), (j <= i + 5)[None, None]
  if name == "window":
    return masks.LocalWindow(7, 2), ((j >= i - 7) & (j <= i + 2))[None, None]
  if name == "chunked":
    return masks.Chunked(12), (i // 12 == j // 12)[None, None]
  if name == "prefix":
    p = np.array([9, 0, 30])[:B]
    return masks.PrefixLM(jnp.asarray(p)), ((j <= i) | (j < p[:, None, None]))[:, None]
  if name == "segments":
    qs = np.sort(rng.integers(0, 4, (B, T)), -1)
    ks = np.sort(rng.integers(0, 4, (B, S)), -1)
    return (masks.Segments(jnp.asarray(qs), jnp.asarray(ks)),
            (qs[:, :, None] == ks[:, None, :])[:, None])
  if name == "lengths":
    ql, kl = np.array([T, 5, 0])[:B], np.array([3, S, 17])[:B]
    return (masks.Lengths(jnp.asarray(ql), jnp.asarray(kl)),
            ((i < ql[:, None, None]) & (j < kl[:, None, None]))[:, None])
  if name == "fn_heads":
    fn = lambda b, h, qi, ki: (ki + h) % 3 != 0  # noqa: E731
    return masks.MaskFn(fn), ((j + np.arange(4)[:, None, None]) % 3 != 0)[None]
  if name == "array":
    m = rng.random((B, 1, T, S)) < 0.6
    return m, m
  raise ValueError(name)


NAMES = ["causal", "causal_offset", "window", "chunked", "prefix", "segments", "lengths",
         "fn_heads", "array"]
COMBOS = [("causal", "&", "chunked"), ("segments", "&", "causal"), ("window", "|", "prefix"),
          ("lengths", "&", "fn_heads"), ("causal", "~", None), ("array", "&", "window")]


def _combo(combo, B, T, S, rng):
  a, op, b = combo
  ma, va = _rule(a, B, T, S, rng)
  if op == "~":
    return ~masks.as_mask(ma), ~va
  mb, vb = _rule(b, B, T, S, rng)
  mo = masks.as_mask(ma)
  return (mo & mb, va & vb) if op == "&" else (mo | mb, va | vb)


def _problem(T, S, seed=0):
  rng = np.random.default_rng(seed)
  q = jnp.asarray(rng.normal(size=(3, T, 4, 8)), jnp.float32)
  k, v = (jnp.asarray(rng.normal(size=(3, S, 2, 8)), jnp.float32) for _ in range(2))
  return rng, q, k, v


def _naive(q, k, v, visible):
  """float64 NumPy attention with a [B, N|1, T, S] visibility; empty rows give zeros."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  k, v = np.repeat(k, 2, axis=2), np.repeat(v, 2, axis=2)
  logits = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(q.shape[-1])
  vis = np.broadcast_to(visible, logits.shape)
  logits = np.where(vis, logits, -np.inf)
  m = np.max(logits, -1, keepdims=True)
  p = np.where(vis, np.exp(logits - np.where(np.isfinite(m), m, 0)), 0)
  p = p / np.maximum(p.sum(-1, keepdims=True), 1e-300)
  return np.einsum("bnts,bsnh->btnh", p, v)


@pytest.mark.parametrize("case", NAMES + [f"{a}{op}{b or ''}" for a, op, b in COMBOS])
@pytest.mark.parametrize("impl", ["xla", "blockwise"])
def test_mask_objects_match_their_rule(case, impl):
  T, S = 37, 45
  rng, q, k, v = _problem(T, S)
  combo = next((c for c in COMBOS if f"{c[0]}{c[1]}{c[2] or ''}" == case), None)
  mask, visible = _combo(combo, 3, T, S, rng) if combo else _rule(case, 3, T, S, rng)
  fn = jax.jit(lambda q, k, v, mask: attnjax.dot_product_attention(
      q, k, v, mask=mask, implementation=impl, block_sizes=(16, 8)))
  np.testing.assert_allclose(fn(q, k, v, mask), _naive(q, k, v, visible), atol=2e-5)


@pytest.mark.parametrize("case", ["causal", "window", "chunked", "prefix", "segments",
                                  "lengths", "fn_heads", "array"])
@pytest.mark.parametrize("block", [(8, 8), (16, 4), (32, 16)])
def test_block_grid_is_sound(case, block):
  T, S = 37, 45
  rng = np.random.default_rng(3)
  mask, visible = _rule(case, 3, T, S, rng)
  mask = masks.as_mask(mask).canonical((3,), 4, T, S)
  bq, bk = block
  empty, full = mask.block_grid(T, S, bq, bk)
  vis = np.broadcast_to(visible, (3, 4, T, S))
  for i in range(-(-T // bq)):
    for j in range(-(-S // bk)):
      blk = vis[:, :, i * bq:(i + 1) * bq, j * bk:(j + 1) * bk]
      if empty is not None and np.asarray(empty)[i, j]:
        assert not blk.any(), (i, j)
      if full is not None and np.asarray(full)[i, j]:
        assert blk.all(), (i, j)
  if case in ("causal", "window", "chunked"):  # exact, and static
    assert isinstance(empty, np.ndarray)
    for i in range(-(-T // bq)):
      for j in range(-(-S // bk)):
        blk = vis[:, :, i * bq:(i + 1) * bq, j * bk:(j + 1) * bk]
        assert empty[i, j] == (not blk.any()) and full[i, j] == blk.all()


@pytest.mark.parametrize("case", ["segments&causal", "window|prefix", "lengths&fn_heads",
                                  "causal&chunked"])
@pytest.mark.parametrize("loops", [False, True])
def test_blockwise_gradients_with_mask_objects(case, loops, monkeypatch):
  if loops:
    monkeypatch.setattr(_blockwise, "_MAX_UNROLLED_PAIRS", 0)
  T, S = 33, 40
  rng, q, k, v = _problem(T, S, 1)
  combo = next(c for c in COMBOS if f"{c[0]}{c[1]}{c[2] or ''}" == case)
  mask, _ = _combo(combo, 3, T, S, rng)
  ct = jnp.asarray(rng.normal(size=q.shape), jnp.float32)
  def grads(impl):
    def loss(q, k, v):
      return jnp.sum(attnjax.dot_product_attention(q, k, v, mask=mask, implementation=impl,
                                                   block_sizes=(8, 8)) * ct)
    return jax.jit(jax.grad(loss, (0, 1, 2)))(q, k, v)
  for g, w in zip(grads("blockwise"), grads("xla")):
    np.testing.assert_allclose(g, w, atol=2e-5, rtol=2e-5)


def test_keyword_arguments_are_sugar_over_mask_objects():
  T = S = 40
  rng, q, k, v = _problem(T, S, 2)
  ids = jnp.asarray(np.sort(rng.integers(0, 3, (3, T)), -1))
  for impl in ("xla", "blockwise"):
    kw = attnjax.dot_product_attention(q, k, v, is_causal=True, local_window_size=(5, 0),
                                       q_segment_ids=ids, kv_segment_ids=ids,
                                       implementation=impl)
    obj = attnjax.dot_product_attention(
        q, k, v, mask=masks.Causal() & masks.LocalWindow(5, 0) & masks.Segments(ids, ids),
        implementation=impl)
    np.testing.assert_array_equal(kw, obj)


def test_packed_documents_skip_blocks_at_run_time():
  T, docs = 256, 8
  ids = jnp.repeat(jnp.arange(docs), T // docs)[None]
  mask = (masks.Segments(ids, ids) & masks.Causal()).canonical((1,), 1, T, T)
  empty = jax.jit(lambda m: masks.runtime_block_empty(m, T, T, 32, 32))(mask)
  expected = ~np.eye(8, dtype=bool) | np.triu(np.ones((8, 8), bool), 1)
  np.testing.assert_array_equal(empty, expected)
  # The blockwise program holds a conditional around the block body for traced masks.
  hlo = jax.jit(lambda q, ids: attnjax.dot_product_attention(
      q, q, q, mask=masks.Segments(ids, ids), implementation="blockwise",
      block_sizes=(32, 32))).lower(jnp.zeros((1, T, 1, 8)), ids).as_text()
  assert "conditional" in hlo or "case" in hlo


def test_mask_object_errors_name_the_argument():
  q = jnp.zeros((2, 8, 2, 4))
  with pytest.raises(TypeError, match="MaskFn"):
    attnjax.dot_product_attention(q, q, q, mask=masks.MaskFn(lambda b, h, i, j: i - j))
  with pytest.raises(ValueError, match="q_segment_ids"):
    attnjax.dot_product_attention(q, q, q, mask=masks.Segments(jnp.zeros((2, 7), int),
                                                               jnp.zeros((2, 8), int)))
  with pytest.raises(ValueError, match="kv_lengths"):
    attnjax.dot_product_attention(q, q, q, mask=masks.Lengths(jnp.zeros(2, int),
                                                              jnp.zeros(3, int)))
  with pytest.raises(ValueError, match="Chunked"):
    masks.Chunked(0)
  with pytest.raises(ValueError, match="LocalWindow"):
    masks.LocalWindow(-1, 0)


def test_mask_objects_under_vmap():
  T = S = 20
  rng, q, k, v = _problem(T, S, 4)
  ids = jnp.asarray(np.sort(rng.integers(0, 3, (3, T)), -1))
  def one(q, k, v, ids):
    return attnjax.dot_product_attention(q, k, v, mask=masks.Segments(ids, ids) & masks.Causal(),
                                         implementation="blockwise", block_sizes=(8, 8))
  batched = attnjax.dot_product_attention(q, k, v, mask=masks.Segments(ids, ids) & masks.Causal(),
                                          implementation="xla")
  np.testing.assert_allclose(jax.vmap(one)(q, k, v, ids), batched, atol=2e-5)


def _dots(f, *args):
  return str(jax.make_jaxpr(f)(*args)).count("dot_general")


def test_chunked_and_modified_causal_skip_blocks_statically():
  q = jnp.zeros((1, 64, 1, 8))

  def forward(mask, **kw):
    return lambda q: attnjax.dot_product_attention(q, q, q, mask=mask, block_sizes=(16, 16),
                                                   implementation="blockwise", **kw)
  # 4 x 4 blocks, two matmuls each: chunks of 16 visit the 4 diagonal blocks, causal 10,
  # causal chunks of 32 visit 6, and a score modifier changes none of it.
  assert _dots(forward(masks.Chunked(16)), q) == 2 * 4
  assert _dots(forward(masks.Causal()), q) == 2 * 10
  assert _dots(forward(masks.Chunked(32) & masks.Causal()), q) == 2 * 6
  alibi = attnjax.score_mods.ALiBi(attnjax.score_mods.alibi_slopes(1))
  assert _dots(forward(masks.Causal(), score_mod=alibi), q) == 2 * 10


def test_prefix_lm_skips_blocks_at_run_time():
  T = 128
  prefix = jnp.array([40, 0])
  mask = (masks.PrefixLM(prefix)).canonical((2,), 1, T, T)
  empty = jax.jit(lambda m: masks.runtime_block_empty(m, T, T, 32, 32))(mask)
  # A block is empty iff it is above the diagonal for every row of the batch and past the
  # longest prefix: row 0's prefix of 40 reaches key block 1.
  i, j = np.arange(4)[:, None], np.arange(4)[None]
  np.testing.assert_array_equal(empty, (j > i) & (j * 32 >= 40))
  hlo = jax.jit(lambda q, p: attnjax.dot_product_attention(
      q, q, q, mask=masks.PrefixLM(p), implementation="blockwise",
      block_sizes=(32, 32))).lower(jnp.zeros((2, T, 1, 8)), prefix).as_text()
  assert "conditional" in hlo or "case" in hlo
