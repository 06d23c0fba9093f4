"""Blockwise attention: FlashAttention-2 tiling and online softmax in pure JAX.

Shape letters: B batch, T query length, S key/value length, N query heads, K key/value heads,
G = N // K query heads per key/value head, H head dim; bq, bk query and key block sizes.

  q  [B, T, N, H]     k, v  [B, S, K, H]     bias, mask  [B|1, N|1, T|1, S|1]
  out  [B, T, N, H]   lse  [B, N, T]

Queries are cut into blocks of bq and keys into blocks of bk. Each query block walks the key
blocks it can see with a running max and sum (online softmax), so memory is linear in the
length: nothing of size T x S is formed unless the caller passes a full-size bias or mask.
Blocks that causality or the local window hide entirely are never visited, so causal
attention does about half the work of full attention. The backward pass (``jax.custom_vjp``)
keeps only q, k, v, out and lse, and in one sweep over key blocks recomputes each block's
probabilities from lse (five matmuls per block), adding each block's gradients in place.

The algorithm is here; how its blocks are cut and run on XLA (unrolled or ``lax`` loops,
chains of blocks side by side, the layouts blocks are cut from) is in
``attnjax._scheduling``, which changes no number computed here. Masks are applied only to the
blocks that need them.

Numerics follow ``attnjax.attention``: logits and softmax in float32, masked logits get a
large finite negative, a query row with no visible key returns zeros and zero gradients, and
its lse is -inf.

References:
  Dao et al. 2022, "FlashAttention: Fast and Memory-Efficient Exact Attention with IO-Awareness".
  Dao 2023, "FlashAttention-2: Faster Attention with Better Parallelism and Work Partitioning".
  Rabe & Staats 2021, "Self-attention Does Not Need O(n^2) Memory".
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array, lax

from attnjax import _linear_call  # noqa: F401  Registers linear_call's vmap and JVP rules.
from attnjax import masks as masks_lib
from attnjax._scheduling import (
  _after,
  _block,
  _default_lanes,
  _hulls,
  _Layout,
  _pick,
  _sweep,
  _token,
)

# Logit of a hidden key. The running max starts at half of it, so exp(_HIDDEN - max) is exactly
# 0 even in a row where every key is hidden (its sum stays 0 and its output is set to 0).
_HIDDEN = float(np.finfo(np.float32).min)
_MAX_START = _HIDDEN / 2

# Above this many visited (query block, key block) pairs the loops become lax loops: unrolled
# programs compile in about a second per 30 pairs.
_MAX_UNROLLED_PAIRS = 64


def default_block_sizes(batch_heads: int, q_len: int, kv_len: int,
                        backend: str | None = None) -> tuple[int, int]:
  """Block sizes (block_q, block_k) that ran fastest in ``experiments/benchmark_attention.py``.

  The backward pass uses square blocks of ``min(block_q, block_k)`` queries and block_k keys.

  Args:
    batch_heads: batch size times number of query heads, B * N.
    q_len: number of queries T.
    kv_len: number of keys S.
    backend: ``"cpu"``, ``"gpu"`` or ``"tpu"``; defaults to ``jax.default_backend()``.

  Returns:
    (block_q, block_k), each a power of two no larger than needed for the lengths.
  """
  backend = backend or jax.default_backend()
  if backend == "cpu":
    # Unrolled plans: key blocks of logits for all batch * heads of about 256K floats (1 MB)
    # keep the program's temporary memory small, and query blocks twice as long halve the key
    # blocks cut out in the forward pass. Longer sequences run as lax loops, where blocks of
    # about 1M logits amortise the per-iteration cost.
    def side(logits):
      return 1 << (int(np.sqrt(logits / max(batch_heads, 1))).bit_length() - 1)
    small = min(max(side(2 ** 18), 64), 512)
    if -(-q_len // small) * -(-kv_len // small) <= _MAX_UNROLLED_PAIRS:
      block_q, block_k = 2 * small, small
    else:
      block_q = block_k = min(max(side(2 ** 20), 128), 1024)
  else:  # Untested: there is no GPU or TPU on the machines this was tuned on.
    block_q = block_k = 512
  return (min(block_q, _next_pow2(q_len)), min(block_k, _next_pow2(kv_len)))


def blockwise_attention(q: Array, k: Array, v: Array, bias: Array | None,
                        mask: Array | masks_lib.Mask | None,
                        *, scale: float, is_causal: bool, window: tuple[int, int] | None,
                        q_segment_ids: Array | None, kv_segment_ids: Array | None,
                        logits_soft_cap: float | None, block_q: int | None = None,
                        block_k: int | None = None, score_mod: Callable | None = None,
                        sinks: Array | None = None) -> tuple[Array, Array]:
  """Scaled dot-product attention computed block by block, on canonical inputs.

  Most callers want ``attnjax.dot_product_attention(..., implementation="blockwise")``, which
  validates and canonicalises its arguments and then calls this function.

  Args:
    q: query ``[B, T, N, H]``.
    k: key ``[B, S, K, H]``, same dtype as ``q``; N must be a multiple of K.
    v: value ``[B, S, K, H]``, same dtype as ``q``.
    bias: None or float32 ``[B|1, N|1, T|1, S|1]`` added to the scaled logits.
    mask: None, a bool ``[B|1, N|1, T|1, S|1]`` (True where the query may attend) or a
      :class:`attnjax.masks.Mask` in canonical form (batch dims flattened); combined with
      the following masking arguments by AND.
    scale: Python float multiplying q.k (a traced scale is not supported).
    is_causal: key j is visible to query i iff j <= i (top-left aligned).
    window: None or (left, right): key j is visible to query i iff i - left <= j <= i + right.
    q_segment_ids: None or int32 ``[B, T]``; a key is visible iff its segment id is equal.
    kv_segment_ids: None or int32 ``[B, S]``; given iff ``q_segment_ids`` is.
    logits_soft_cap: None or c > 0: logits become c * tanh(logits / c) after the bias.
    block_q: queries per block; default from :func:`default_block_sizes` (a symbolic batch
      size B, as in shape-polymorphic ``jax.export``, counts as 1 there).
    block_k: keys per block; default from :func:`default_block_sizes`.
    score_mod: None or ``fn(score, batch, head, q_idx, kv_idx) -> score``, applied to each
      block of scaled logits (float32 ``[B, N, bq, bk]`` with broadcastable int32 indices)
      before the bias. Arrays it closes over or holds as pytree leaves get gradients, summed
      block by block.
    sinks: None or float32 ``[N]``: a per-head logit that joins every row's softmax
      denominator without a value.

  Returns:
    ``(out, lse)``: out ``[B, T, N, H]`` in q's dtype, and the float32 log-sum-exp of the
    visible logits (and the sink) ``[B, N, T]``, -inf for a query with no visible key and
    no sink.
  """
  B, T, N, H = q.shape
  S, K = k.shape[1], k.shape[2]
  for name, n in (("query length T", T), ("key length S", S)):
    if jax.export.is_symbolic_dim(n):
      raise ValueError(f"blockwise attention needs a static {name}, got the symbolic {n}; "
                       "use implementation='xla'")
  # A batch size left symbolic by shape-polymorphic export counts as 1 for the default blocks.
  default_q, default_k = default_block_sizes(N if jax.export.is_symbolic_dim(B) else B * N, T, S)
  if (block_q is not None and block_q < 1) or (block_k is not None and block_k < 1):
    raise ValueError(f"block_q and block_k must be positive, got {block_q} and {block_k}")
  # A block longer than the padded length would only add padding.
  bq = min(block_q or default_q, _next_pow2(T))
  bk = min(block_k or default_k, _next_pow2(S))
  if 0 in (B, T, N, S):
    lse = jnp.full((B, N, T), -jnp.inf, jnp.float32)
    if sinks is not None and 0 not in (B, T, N):  # No keys: only the sink.
      lse = jnp.broadcast_to(sinks.astype(jnp.float32)[:, None], (B, N, T))
    return jnp.zeros(q.shape, q.dtype), lse
  scale = float(scale)
  # Scaling each query block as it is cut out is cheaper than scaling every block of logits; in
  # float32, or when the scale is a power of two, it changes nothing beyond float32 rounding.
  q_scale = 1.0
  if q.dtype == jnp.float32 or np.frexp(scale)[0] == 0.5:
    q_scale, scale = scale, 1.0
  mask = masks_lib.from_arguments(mask, is_causal, window, q_segment_ids, kv_segment_ids,
                                  (B,), N, T, S)
  plan = _Plan(scale=scale, q_scale=q_scale,
               soft_cap=None if logits_soft_cap is None else float(logits_soft_cap),
               T=T, S=S, G=N // K, bq=bq, bk=bk, lanes=_default_lanes())
  plan = plan.with_grid(mask)
  score_consts: tuple = ()
  if score_mod is not None:
    fns, score_consts = _ScoreFns.convert(score_mod, B, N, (bq, min(bq, bk)), bk)
    plan = dataclasses.replace(plan, score_mod=fns)
  pad_t, pad_s = plan.nq * bq - T, plan.nk * bk - S

  # The caller's layout, padded to whole blocks: q [B, Tp, K, G, H], k and v [B, Sp, K, H].
  # Blocks are cut along the length axis (see _Layout).
  q5 = _pad_axis(q, 1, pad_t).reshape(B, -1, K, plan.G, H)
  k4, v4 = _pad_axis(k, 1, pad_s), _pad_axis(v, 1, pad_s)
  extras = _Extras(bias=None if bias is None else _to_5d(bias, K, pad_t, pad_s, 0.0),
                   mask=mask, score=score_consts,
                   sinks=None if sinks is None else sinks.astype(jnp.float32).reshape(K, -1))

  out5, lse4 = _attend(plan, q5, k4, v4, extras)
  return out5.reshape(B, -1, N, H)[:, :T], lse4.reshape(B, N, -1)[:, :, :T]


def _pad_axis(x: Array, axis: int, pad: int) -> Array:
  if not pad:
    return x
  return jnp.pad(x, [(0, pad if a == axis else 0) for a in range(x.ndim)])


def _next_pow2(n: int) -> int:
  return 1 << max(0, n - 1).bit_length()


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class _Extras:
  """Optional inputs: bias [B|1, K|1, G|1, Tp|1, Sp|1] (padded), the mask, the arrays the
  score modifier closes over (see :class:`_ScoreFns`) and sinks [K, G]."""
  bias: Array | None
  mask: masks_lib.Mask | None
  score: tuple = ()
  sinks: Array | None = None


@dataclasses.dataclass(frozen=True, eq=False)
class _ScoreFns:
  """A score modifier closure-converted for the block shapes of one plan: ``fns[bq]`` takes
  ``(score [B, N, bq, bk], batch, head, q_idx, kv_idx, *consts)``, where ``consts`` are the
  traced arrays the modifier closes over, passed explicitly so that the custom VJP returns
  their gradients. Compared and hashed by identity, as a static part of the plan."""
  fns: dict[int, Callable]

  @staticmethod
  def convert(score_mod: Callable, B: int, N: int, block_qs, bk: int):
    """(_ScoreFns, consts) for query blocks of each size in ``block_qs`` and bk keys."""
    def call(score, batch, head, q_idx, kv_idx):
      return score_mod(score, batch, head, q_idx, kv_idx)

    fns, consts = {}, None
    for bq in sorted(set(block_qs)):
      fn, found = jax.closure_convert(call, *_score_avals(B, N, bq, bk))
      if consts is not None and [id(c) for c in found] != [id(c) for c in consts]:
        raise ValueError("score_mod must read the same arrays whatever the block shape; it "
                         f"read {len(consts)} and {len(found)} traced arrays for two shapes")
      fns[bq], consts = fn, found
    return _ScoreFns(fns), tuple(consts or ())

  def __call__(self, s: Array, consts: tuple, i, j) -> Array:
    """The modifier on block (i, j) of logits s [B, K, G, bq, bk]."""
    B, K, G, bq, bk = s.shape
    batch = lax.iota(jnp.int32, B).reshape(-1, 1, 1, 1)
    head = lax.iota(jnp.int32, K * G).reshape(1, -1, 1, 1)
    q_idx = (i * bq + lax.iota(jnp.int32, bq)).reshape(1, 1, -1, 1)
    kv_idx = (j * bk + lax.iota(jnp.int32, bk)).reshape(1, 1, 1, -1)
    out = self.fns[bq](s.reshape(B, K * G, bq, bk), batch, head, q_idx, kv_idx, *consts)
    return out.reshape(s.shape)


def _score_avals(B: int, N: int, bq: int, bk: int):
  """Abstract arguments of a score modifier on a [B, N, bq, bk] block of logits."""
  def index(shape):
    return jax.ShapeDtypeStruct(shape, jnp.int32)
  return (jax.ShapeDtypeStruct((B, N, bq, bk), jnp.float32), index((B, 1, 1, 1)),
          index((1, N, 1, 1)), index((1, 1, bq, 1)), index((1, 1, 1, bk)))


def _to_5d(x: Array, K: int, pad_t: int, pad_s: int, fill) -> Array:
  """[B|1, N|1, T|1, S|1] -> [B|1, K|1, G|1, Tp|1, Sp|1], padding the full-size T and S dims."""
  b, n, t, s = x.shape
  x = x.reshape(b, K, n // K, t, s) if n > 1 else x.reshape(b, 1, 1, t, s)
  pads = ((0, 0),) * 3 + ((0, pad_t if t > 1 else 0), (0, pad_s if s > 1 else 0))
  return jnp.pad(x, pads, constant_values=fill)


@dataclasses.dataclass(frozen=True)
class _Plan:
  """Static description of one blockwise attention: options, lengths and block grid. The logits
  are ``scale * (q_scale * q) . k``: q_scale is applied to each query block as it is cut out.
  ``empty`` and ``full`` say which blocks the mask's static part hides entirely or shows
  entirely (rows of query blocks, columns of key blocks); data-dependent masks are classified
  at run time (:func:`_runtime_empty`)."""
  scale: float
  q_scale: float
  soft_cap: float | None
  T: int
  S: int
  G: int
  bq: int
  bk: int
  lanes: int = 1
  score_mod: _ScoreFns | None = None
  empty: tuple[tuple[bool, ...], ...] = ()
  full: tuple[tuple[bool, ...], ...] = ()

  @property
  def nq(self) -> int:
    return -(-self.T // self.bq)

  @property
  def nk(self) -> int:
    return -(-self.S // self.bk)

  def with_grid(self, mask: masks_lib.Mask | None) -> _Plan:
    """This plan with the static block classification of ``mask`` for its block sizes."""
    empty, full = masks_lib.static_block_grid(mask, self.T, self.S, self.bq, self.bk)
    if self.S % self.bk:  # The last key block holds padding, hidden by position.
      full[:, -1] = False
    return dataclasses.replace(self, empty=tuple(map(tuple, empty.tolist())),
                               full=tuple(map(tuple, full.tolist())))

  def _grid(self, transpose: bool) -> np.ndarray:
    """Bool [nq, nk] (or transposed) of the blocks not known to be empty."""
    grid = np.logical_not(np.asarray(self.empty, bool).reshape(self.nq, self.nk))
    return grid.T if transpose else grid

  def kv_blocks(self, i):
    """Key blocks [lo, hi) that query block i may see (i a Python int or a traced scalar)."""
    return _pick(_hulls(self._grid(False)), i)

  def q_blocks(self, j):
    """Query blocks [lo, hi) that may see key block j (j a Python int or a traced scalar)."""
    return _pick(_hulls(self._grid(True)), j)

  def pairs(self) -> list[tuple[int, int]]:
    return [(i, j) for i in range(self.nq) for j in range(*self.kv_blocks(i))
            if not self.empty[i][j]]

  def unrolled(self) -> bool:
    return len(self.pairs()) <= _MAX_UNROLLED_PAIRS

  def needs_mask(self, i, j) -> bool:
    """Whether block (i, j) may hold a hidden key (by the mask or padding)."""
    if not isinstance(i, int) or not isinstance(j, int):
      return True
    return not self.full[i][j]


def _slice_blocks(plan: _Plan, ex: _Extras, i, j) -> _Extras:
  """The rows of query block i and columns of key block j of the per-logit inputs."""
  def rows_cols(x):
    return None if x is None else _block(_block(x, 3, i, plan.bq), 4, j, plan.bk)
  return dataclasses.replace(ex, bias=rows_cols(ex.bias))


def _scores(plan: _Plan, q_blk: Array, k_blk: Array, ex_blk: _Extras, i, j,
            pullback: bool = False):
  """Hidden-masked float32 logits of block (i, j) [B, K, G, bq, bk], tanh if soft-capped, and
  with ``pullback`` that of the score modifier (ds -> (ds, d consts)), else None."""
  s = jnp.einsum("bkgqh,bksh->bkgqs", q_blk, k_blk, preferred_element_type=jnp.float32)
  if plan.scale != 1.0:
    s = s * plan.scale
  mod_vjp = None
  if plan.score_mod is not None:
    mod = functools.partial(plan.score_mod, i=i, j=j)
    if pullback:
      s, mod_vjp = jax.vjp(mod, s, ex_blk.score)
    else:
      s = mod(s, ex_blk.score)
  if ex_blk.bias is not None:
    s = s + ex_blk.bias
  tanh = None
  if plan.soft_cap is not None:
    tanh = jnp.tanh(s / plan.soft_cap)
    s = plan.soft_cap * tanh
  if plan.needs_mask(i, j):
    s = jnp.where(_visible(plan, ex_blk.mask, s.shape, i, j), s, _HIDDEN)
  return s, tanh, mod_vjp


def _visible(plan: _Plan, mask: masks_lib.Mask | None, shape, i, j) -> Array:
  """The mask's rule on block (i, j), and keys past S hidden: bool, broadcastable to
  ``shape`` = [B, K, G, bq, bk]."""
  B, K, G = shape[:3]
  q_idx = (i * plan.bq + lax.iota(jnp.int32, plan.bq)).reshape(1, 1, -1, 1)
  kv_idx = (j * plan.bk + lax.iota(jnp.int32, plan.bk)).reshape(1, 1, 1, -1)
  visible = kv_idx < plan.S
  if mask is not None:
    batch = lax.iota(jnp.int32, B).reshape(-1, 1, 1, 1)
    head = lax.iota(jnp.int32, K * G).reshape(1, -1, 1, 1)
    m = mask(batch, head, q_idx, kv_idx)
    m = m.reshape((1,) * (4 - m.ndim) + m.shape)
    visible = visible & m
  b, n = visible.shape[:2]
  heads = (K, G) if n > 1 else (1, 1)
  return visible.reshape((b,) + heads + visible.shape[2:])


# ----------------------------------------------------------------------------- forward


def _forward(plan: _Plan, q5: Array, k4: Array, v4: Array, ex: _Extras):
  """(out [B, Tp, K, G, H] in q's dtype, lse [B, K, G, Tp] float32)."""
  B, Tp, K, G, H = q5.shape
  unrolled = plan.unrolled()
  layout = _Layout(plan, whole=not unrolled)
  # A value hidden from a query must not reach it through 0 * NaN in p @ v: values are cut
  # with non-finite entries zeroed. A query, or the key of a key/value pair, with a
  # non-finite entry is cut as all NaN, so that exactly the rows that see it get a NaN logit
  # (whatever q.k would have been), and so a NaN output and lse.
  q_block = layout.queries(q5, plan.q_scale, valid=True)
  kv_ok = jnp.all(jnp.isfinite(k4) & jnp.isfinite(v4), axis=-1)
  k_block, v_block = layout.keys(k4, valid=kv_ok), layout.keys(v4, finite=True)

  # A sink is a logit without a value: the running max and sum start from it.
  m_start, sum_start = jnp.float32(_MAX_START), jnp.float32(0)
  if ex.sinks is not None:
    m_start = jnp.maximum(ex.sinks, _MAX_START)[None, :, :, None]
    sum_start = jnp.exp(ex.sinks[None, :, :, None] - m_start)

  def init(i):
    rows = (B, K, G, plan.bq)
    return (q_block(i), jnp.broadcast_to(m_start, rows), jnp.broadcast_to(sum_start, rows),
            jnp.zeros((B, K, G, plan.bq, H), jnp.float32), jnp.zeros((), jnp.float32))

  def step(i, j, carry):
    q_blk, m, row_sum, acc, token = carry
    k_blk, v_blk = _after(token, (k_block(j), v_block(j)), unrolled)
    s, _, _ = _scores(plan, q_blk, k_blk, _slice_blocks(plan, ex, i, j), i, j)
    m_new = jnp.maximum(m, jnp.max(s, axis=-1))
    p = jnp.exp(s - m_new[..., None])
    alpha = jnp.exp(m - m_new)
    row_sum = row_sum * alpha + jnp.sum(p, axis=-1)
    pv = jnp.einsum("bkgqs,bksh->bkgqh", p.astype(v_blk.dtype), v_blk,
                    preferred_element_type=jnp.float32)
    acc = acc * alpha[..., None] + pv
    return (q_blk, m_new, row_sum, acc, _token(m_new, row_sum, acc)), ()

  def finish(i, carry):  # The block's output [B, K, G, bq, H] and lse [B, K, G, bq].
    _, m, row_sum, acc, _ = carry
    inv_sum = jnp.where(row_sum > 0, 1 / row_sum, 0.0)
    return (acc * inv_sum[..., None]).astype(q5.dtype), m + jnp.log(row_sum)

  empty = masks_lib.runtime_block_empty(ex.mask, plan.T, plan.S, plan.bq, plan.bk)
  _, (out, lse4) = _sweep(plan, plan.nq, plan.kv_blocks, init, step, finish=finish,
                          runtime_empty=empty)
  return jnp.moveaxis(out, 3, 1), lse4


# ----------------------------------------------------------------------------- backward


def _backward(plan: _Plan, q5, k4, v4, ex: _Extras, out5, lse4, dout5, dlse4):
  """Float32 gradients (dq5, dk4, dv4) and the cotangent of ``ex`` in one sweep, key blocks outside
  (FlashAttention-2). Each step adds its block's dq, dk and dv in place, so no accumulator
  outlives its step. dk and dv are computed transposed ([B, K, H, bk]): XLA:CPU multiplies
  do^T p fast but p^T do slowly."""
  unrolled = plan.unrolled()
  layout = _Layout(plan, whole=not unrolled)
  # Blocks are cut with non-finite entries zeroed (a hidden NaN must not reach other rows
  # through 0 * NaN in the matmuls), and rows whose forward result was NaN (they saw a
  # non-finite entry) count as empty: they pass no gradient on.
  q_block = layout.queries(q5, plan.q_scale, finite=True)
  do_block = layout.queries(dout5)
  k_block, v_block = layout.keys(k4, finite=True), layout.keys(v4, finite=True)
  dq, add_dq, dq_done = layout.grad(q5.shape, plan.bq)
  dk, add_dk, dk_done = layout.grad(k4.shape, plan.bk)
  dv, add_dv, dv_done = layout.grad(v4.shape, plan.bk)
  # d lse / d logit = p, so the lse cotangent enters like a shift of rowsum(dout * out).
  delta = jnp.einsum("bqkgh,bqkgh->bkgq", dout5.astype(jnp.float32), out5.astype(jnp.float32))
  delta = delta - dlse4
  # A row with no visible key has lse = -inf, a row that saw a non-finite entry NaN; +inf
  # makes their probabilities exp(-inf) = 0.
  empty = jnp.isneginf(lse4) | jnp.isnan(lse4)
  lse_safe = jnp.where(empty, jnp.inf, lse4)
  delta = jnp.where(empty, 0.0, delta)

  def init(j):
    return k_block(j), v_block(j), jnp.zeros((), jnp.float32)

  def step(j, i, carry):  # The block's gradients, added in place by ``apply``.
    k_blk, v_blk, token = carry
    q_blk, do_blk = _after(token, (q_block(i), do_block(i)), unrolled)
    lse_blk, delta_blk = _block(lse_safe, 3, i, plan.bq), _block(delta, 3, i, plan.bq)
    s, tanh, mod_vjp = _scores(plan, q_blk, k_blk, _slice_blocks(plan, ex, i, j), i, j,
                               pullback=True)
    p = jnp.exp(s - lse_blk[..., None])
    dp = jnp.einsum("bkgqh,bksh->bkgqs", do_blk, v_blk, preferred_element_type=jnp.float32)
    ds = p * (dp - delta_blk[..., None])
    if tanh is not None:
      ds = ds * (1 - tanh * tanh)
    dbias = None
    if ex.bias is not None:
      axes = tuple(a for a in range(5) if ex.bias.shape[a] == 1)
      dbias = jnp.sum(ds, axis=axes, keepdims=True)
    d_consts = None
    if mod_vjp is not None:
      ds, d_consts = mod_vjp(ds)
    ds = ds.astype(q_blk.dtype)
    dq_blk = jnp.einsum("bkgqs,bksh->bkgqh", ds, k_blk, preferred_element_type=jnp.float32)
    dk_t = jnp.einsum("bkgqh,bkgqs->bkhs", q_blk, ds, preferred_element_type=jnp.float32)
    dv_t = jnp.einsum("bkgqh,bkgqs->bkhs", do_blk, p.astype(do_blk.dtype),
                      preferred_element_type=jnp.float32)
    # q_blk carries q_scale, so dk needs only the logit scale; dq needs both.
    update = (dq_blk * (plan.scale * plan.q_scale), dk_t * plan.scale, dv_t, dbias, d_consts)
    return (k_blk, v_blk, _token(dq_blk, dk_t, dv_t)), update

  def apply(j, i, shared, update):
    dq, dk, dv, dbias5, dscore = shared
    dq_blk, dk_t, dv_t, dbias, d_consts = update
    if dbias is not None:
      dbias5 = _add_bias_block(dbias5, dbias, i, j, plan)
    if d_consts is not None:
      dscore = tuple(map(_add_cotangent, dscore, d_consts))
    return add_dq(dq, i, dq_blk), add_dk(dk, j, dk_t), add_dv(dv, j, dv_t), dbias5, dscore

  shared = (dq, dk, dv, None if ex.bias is None else jnp.zeros(ex.bias.shape, jnp.float32),
            tuple(map(_zero_cotangent, ex.score)))
  # The first key blocks wait for delta, so that XLA does not cut them out at the very start.
  dq, dk, dv, dbias5, dscore = _sweep(plan, plan.nk, plan.q_blocks, init, step, shared, apply,
                              transpose=True, runtime_empty=masks_lib.runtime_block_empty(
                                  ex.mask, plan.T, plan.S, plan.bq, plan.bk),
                              start=_token(delta))[0]
  dsinks = None
  if ex.sinks is not None:  # d out / d sink = -p_sink out and d lse / d sink = p_sink.
    p_sink = jnp.exp(ex.sinks[None, :, :, None] - lse_safe)
    dsinks = -jnp.sum(p_sink * delta, axis=(0, 3))
  dex = _Extras(bias=dbias5, mask=None, score=tuple(
      d.astype(c.dtype) if d is not None else None for d, c in zip(dscore, ex.score)),
                sinks=dsinks)
  return dq_done(dq), dk_done(dk), dv_done(dv), dex


def _zero_cotangent(x: Array) -> Array | None:
  """Float32 zeros to gather the gradient of a score-modifier array in (None if not float)."""
  return jnp.zeros(jnp.shape(x), jnp.float32) if jnp.issubdtype(x.dtype, jnp.inexact) else None


def _add_cotangent(acc: Array | None, d) -> Array | None:
  return None if acc is None else acc + d.astype(jnp.float32)


def _add_bias_block(dbias5: Array, dbias: Array, i, j, plan: _Plan) -> Array:
  """dbias5 with one block's bias gradient added at block (i, j) of its full-size dims."""
  starts = [0, 0, 0, i * plan.bq if dbias5.shape[3] > 1 else 0,
            j * plan.bk if dbias5.shape[4] > 1 else 0]
  current = lax.dynamic_slice(dbias5, starts, dbias.shape)
  return lax.dynamic_update_slice(dbias5, current + dbias, starts)


# ----------------------------------------------------------------------------- derivatives
#
# _attend is a custom_jvp whose tangent is JAX's own JVP of the forward sweep (exact, memory
# linear in the length, nothing saved), wrapped in ``linear_call`` with the FlashAttention-2
# backward pass as its transpose: under jax.grad, JAX linearizes the JVP rule and transposes
# the linear_call into _attend_bwd, so reverse mode runs _forward once and _attend_bwd once.


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _attend(plan: _Plan, q5, k4, v4, ex: _Extras):
  return _forward(plan, q5, k4, v4, ex)


def _attend_jvp(plan, primals, tangents):
  out5, lse4 = _forward(plan, *primals)
  leaves, tree = jax.tree.flatten(primals)
  t_leaves = tree.flatten_up_to(tangents)  # type: ignore[attr-defined]
  # Only inexact inputs with a nonzero tangent enter the linear call (integer leaves, such as
  # segment ids, have none).
  moved = [n for n, (x, t) in enumerate(zip(leaves, t_leaves))
           if jnp.issubdtype(x.dtype, jnp.inexact)
           and not isinstance(t, jax.custom_derivatives.SymbolicZero)]
  if not moved:
    return (out5, lse4), (jnp.zeros_like(out5), jnp.zeros_like(lse4))

  def tangent(res, t_moved):
    leaves, _, lse4 = res
    def forward(*xs):
      args = list(leaves)
      for n, x in zip(moved, xs):
        args[n] = x
      return _forward(plan, *tree.unflatten(args))
    dout5, dlse4 = jax.jvp(forward, [leaves[n] for n in moved], list(t_moved))[1]
    # A row that sees no key (lse -inf) or a non-finite entry (lse NaN) has zero tangents, as
    # it has zero gradients.
    finite = jnp.isfinite(lse4)
    keep = jnp.moveaxis(finite, 3, 1)[..., None]
    return jnp.where(keep, dout5, 0).astype(dout5.dtype), jnp.where(finite, dlse4, 0.0)

  def cotangent(res, cts):
    leaves, out5, lse4 = res
    grads = _attend_bwd(plan, (*tree.unflatten(leaves), out5, lse4), cts)
    g_leaves = _leaf_cotangents(grads, tree.unflatten(leaves))
    return [jnp.zeros_like(leaves[n]) if g_leaves[n] is None
            else g_leaves[n].astype(leaves[n].dtype) for n in moved]

  t_out = jax.custom_derivatives.linear_call(
      tangent, cotangent, (leaves, out5, lse4), [t_leaves[n] for n in moved])
  return (out5, lse4), tuple(t_out)


_attend.defjvp(_attend_jvp, symbolic_zeros=True)


def _leaf_cotangents(grads, primals) -> list:
  """One cotangent per leaf of ``primals`` from ``grads``, a tree of the same structure in
  which None stands for zeros of a whole subtree (None in the list)."""
  g_leaves, g_tree = jax.tree.flatten(grads, is_leaf=lambda x: x is None)
  out = []
  for g, sub in zip(g_leaves, g_tree.flatten_up_to(primals)):  # type: ignore[attr-defined]
    out.extend([g] if g is not None else [None] * len(jax.tree.leaves(sub)))
  return out


def _attend_bwd(plan, residuals, cotangents):
  """The FlashAttention-2 backward pass: (dq5, dk4, dv4, dex) from the residuals
  (q5, k4, v4, ex, out5, lse4) and the cotangents (dout5, dlse4); None in dex is zero."""
  q5, k4, v4, ex, out5, lse4 = residuals
  dout5, dlse4 = cotangents
  # Square blocks: each key block's sweep over query blocks then cuts out small blocks of q and
  # dout, and the block logits stay as small as the forward pass's key blocks.
  plan = dataclasses.replace(plan, bq=min(plan.bq, plan.bk)).with_grid(ex.mask)
  dq5, dk4, dv4, dex = _backward(plan, q5, k4, v4, ex, out5, lse4, dout5, dlse4)
  return dq5.astype(q5.dtype), dk4.astype(k4.dtype), dv4.astype(v4.dtype), dex


# ----------------------------------------------------------------------------- given results


def blockwise_attention_backward(q: Array, k: Array, v: Array,
                                 mask: masks_lib.Mask | None, out: Array, lse: Array,
                                 dout: Array, dlse: Array | None = None, *, scale: float,
                                 logits_soft_cap: float | None, block_q: int | None = None,
                                 block_k: int | None = None) -> tuple[Array, Array, Array]:
  """Gradients of :func:`blockwise_attention` on canonical inputs, given its results.

  ``out`` and ``lse`` need not come from these keys: given the results of attention over a
  larger set of keys (this set one of its parts), the gradients are those of the larger
  attention restricted to this part, since ``p = exp(s - lse)`` and ``rowsum(dout * out)`` are
  the larger attention's. Summing them over the parts gives its gradients (ring attention).

  Args:
    q: query ``[B, T, N, H]``.
    k: key ``[B, S, K, H]``, same dtype as ``q``.
    v: value ``[B, S, K, H]``, same dtype as ``q``.
    mask: None or a :class:`attnjax.masks.Mask` in canonical form (batch dims flattened).
    out: output ``[B, T, N, H]`` of the attention whose gradients are wanted.
    lse: its float32 log-sum-exp ``[B, N, T]`` (-inf for a query with no visible key).
    dout: cotangent of ``out``, ``[B, T, N, H]``.
    dlse: None or the float32 cotangent of ``lse``, ``[B, N, T]``.
    scale: Python float multiplying q.k.
    logits_soft_cap: None or c > 0, as in :func:`blockwise_attention`.
    block_q: as in :func:`blockwise_attention` (the backward pass uses square blocks of
      ``min(block_q, block_k)``).
    block_k: as in :func:`blockwise_attention`.

  Returns:
    ``(dq, dk, dv)`` float32, shaped like ``q``, ``k`` and ``v``.
  """
  B, T, N, H = q.shape
  S, K = k.shape[1], k.shape[2]
  if 0 in (B, T, N, S):
    return (jnp.zeros(q.shape, jnp.float32), jnp.zeros(k.shape, jnp.float32),
            jnp.zeros(v.shape, jnp.float32))
  default_q, default_k = default_block_sizes(B * N, T, S)
  bk = min(block_k or default_k, _next_pow2(S))
  bq = min(block_q or default_q, _next_pow2(T), bk)
  q_scale, scale = (float(scale), 1.0) if q.dtype == jnp.float32 else (1.0, float(scale))
  plan = _Plan(scale=scale, q_scale=q_scale,
               soft_cap=None if logits_soft_cap is None else float(logits_soft_cap),
               T=T, S=S, G=N // K, bq=bq, bk=bk, lanes=_default_lanes()).with_grid(mask)
  pad_t, pad_s = plan.nq * bq - T, plan.nk * bk - S

  def q5(x):  # [B, T, N, H] -> [B, Tp, K, G, H]
    return _pad_axis(x, 1, pad_t).reshape(B, -1, K, plan.G, H)

  def lse4(x, fill):  # [B, N, T] -> [B, K, G, Tp]; padded queries are empty
    return jnp.pad(x, ((0, 0), (0, 0), (0, pad_t)), constant_values=fill).reshape(B, K, plan.G, -1)

  dlse4 = lse4(jnp.zeros_like(lse) if dlse is None else dlse, 0.0)
  dq5, dk4, dv4, _ = _backward(plan, q5(q), _pad_axis(k, 1, pad_s), _pad_axis(v, 1, pad_s),
                               _Extras(bias=None, mask=mask), q5(out), lse4(lse, -jnp.inf),
                               q5(dout), dlse4)
  return dq5.reshape(B, -1, N, H)[:, :T], dk4[:, :S], dv4[:, :S]
