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

Up to 64 block pairs run as a Python-unrolled loop with static block ranges and masks applied
only to the blocks that need them. Unrolled, each block is cut from the caller's [B, T, N, H]
layout and its matmul operands are transposed on their own, so no transposed copy of q, k, v
or the gradients is ever held, and on CPU the outer blocks are dealt to two chains that XLA
runs side by side (a small batched matmul runs on one core). Longer sequences run as ``lax``
loops with the same block body over arrays transposed heads-first once. On CPU, small
temporaries matter twice: XLA allocates a program's temporary buffer on every call, and above
glibc's mmap threshold (32 MB) every page of it is a fresh page fault.

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

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array, lax

from attnjax import masks as masks_lib

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
                        block_k: int | None = None) -> tuple[Array, Array]:
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

  Returns:
    ``(out, lse)``: out ``[B, T, N, H]`` in q's dtype, and the float32 log-sum-exp of the
    visible logits ``[B, N, T]``, -inf for a query with no visible key.
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
    return jnp.zeros(q.shape, q.dtype), jnp.full((B, N, T), -jnp.inf, jnp.float32)
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
  pad_t, pad_s = plan.nq * bq - T, plan.nk * bk - S

  # The caller's layout, padded to whole blocks: q [B, Tp, K, G, H], k and v [B, Sp, K, H].
  # Blocks are cut along the length axis (see _Layout).
  q5 = _pad_axis(q, 1, pad_t).reshape(B, -1, K, plan.G, H)
  k4, v4 = _pad_axis(k, 1, pad_s), _pad_axis(v, 1, pad_s)
  extras = _Extras(bias=None if bias is None else _to_5d(bias, K, pad_t, pad_s, 0.0),
                   mask=mask)

  out5, lse4 = _attend(plan, q5, k4, v4, extras)
  return out5.reshape(B, -1, N, H)[:, :T], lse4.reshape(B, N, -1)[:, :, :T]


def _pad_axis(x: Array, axis: int, pad: int) -> Array:
  if not pad:
    return x
  return jnp.pad(x, [(0, pad if a == axis else 0) for a in range(x.ndim)])


def _default_lanes() -> int:
  """Chains of blocks to run side by side: two on CPU, where a small batched matmul runs on one
  core (more chains only cost memory on the 2-core machines this was tuned on), else one."""
  return 2 if jax.default_backend() == "cpu" else 1


def _next_pow2(n: int) -> int:
  return 1 << max(0, n - 1).bit_length()


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class _Extras:
  """Optional per-logit inputs: bias [B|1, K|1, G|1, Tp|1, Sp|1] (padded) and the mask."""
  bias: Array | None
  mask: masks_lib.Mask | None


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


def _hulls(grid):
  """[lo, hi) per row of the True entries of a bool grid (NumPy or JAX), (0, 0) if none."""
  xp = np if isinstance(grid, np.ndarray) else jnp
  n, any_ = grid.shape[1], grid.any(1)
  lo = xp.where(any_, grid.argmax(1), 0)
  hi = xp.where(any_, n - grid[:, ::-1].argmax(1), 0)
  return lo, hi


def _pick(hulls, i):
  lo, hi = hulls
  if isinstance(i, int):
    return int(lo[i]), int(hi[i])
  return jnp.asarray(lo, jnp.int32)[i], jnp.asarray(hi, jnp.int32)[i]


def _min(a, b):
  return min(a, b) if isinstance(a, int) and isinstance(b, int) else jnp.minimum(a, b)


def _max(a, b):
  return max(a, b) if isinstance(a, int) and isinstance(b, int) else jnp.maximum(a, b)


def _block(x: Array, axis: int, index, size: int) -> Array:
  """Block ``index`` of ``size`` along ``axis``, or all of ``x`` if that dim broadcasts (is 1)."""
  if x.shape[axis] == 1:
    return x
  if isinstance(index, int):
    return lax.slice_in_dim(x, index * size, (index + 1) * size, axis=axis)
  return lax.dynamic_slice_in_dim(x, index * size, size, axis=axis)


@dataclasses.dataclass(frozen=True)
class _Layout:
  """How blocks are cut from q-like [B, Tp, K, G, H] and k-like [B, Sp, K, H] arrays and how
  gradients are gathered. Unrolled, each block is cut from the caller's layout and transposed
  on its own, so nothing is transposed whole; in lax loops (long sequences) the arrays are
  transposed heads-first once and blocks are contiguous slices."""
  plan: _Plan
  whole: bool  # Transpose whole arrays once (lax loops).

  def queries(self, x: Array, scale: float = 1.0, finite: bool = False, valid: bool = False):
    """i -> query block i of x, heads first [B, K, G, bq, H], times scale; with non-finite
    entries zeroed if ``finite``, or rows holding one all NaN if ``valid``."""
    def scaled(x):
      x = _finite(x) if finite else x
      if valid:
        x = jnp.where(jnp.all(jnp.isfinite(x), axis=-1, keepdims=True), x, jnp.nan)
      return x if scale == 1.0 else x * jnp.asarray(scale, x.dtype)
    if self.whole:
      x = scaled(jnp.moveaxis(x, 1, 3))
      return lambda i: _block(x, 3, i, self.plan.bq)
    return lambda i: scaled(jnp.moveaxis(_block(x, 1, i, self.plan.bq), 1, 3))

  def keys(self, x: Array, finite: bool = False, valid: Array | None = None):
    """j -> key block j of x, heads first [B, K, bk, H], with non-finite entries zeroed if
    ``finite``, and NaN where ``valid`` (bool [B, Sp, K]) is False."""
    def cut(x, valid):  # x [B, K, bk, H], valid [B, bk, K]
      x = _finite(x) if finite else x
      return x if valid is None else jnp.where(jnp.swapaxes(valid, 1, 2)[..., None], x, jnp.nan)
    if self.whole:
      x = cut(jnp.swapaxes(x, 1, 2), valid)
      return lambda j: _block(x, 2, j, self.plan.bk)
    return lambda j: cut(jnp.swapaxes(_block(x, 1, j, self.plan.bk), 1, 2),
                         None if valid is None else _block(valid, 1, j, self.plan.bk))

  def grad(self, shape, size: int):
    """For the gradient of a q-like or k-like array of ``shape`` (length on axis 1, blocks of
    ``size``): float32 zeros to gather it in, an adder of blocks with the length on axis 3
    ([B, K, G, bq, H] for queries, transposed [B, K, H, bk] for keys), and the conversion back
    to ``shape``."""
    if self.whole:
      zeros = jnp.zeros(shape, jnp.float32)
      return (jnp.moveaxis(zeros, 1, 3),
              lambda acc, n, blk: _add_block(acc, blk, 3, n, size),
              lambda acc: jnp.moveaxis(acc, 3, 1))
    return (jnp.zeros(shape, jnp.float32),
            lambda acc, n, blk: _add_block(acc, jnp.moveaxis(blk, 3, 1), 1, n, size),
            lambda acc: acc)


def _finite(x: Array) -> Array:
  """x with non-finite entries replaced by zeros (fused into the copy that cuts a block)."""
  return jnp.where(jnp.isfinite(x), x, jnp.zeros((), x.dtype))


def _slice_blocks(plan: _Plan, ex: _Extras, i, j) -> _Extras:
  """The rows of query block i and columns of key block j of the per-logit inputs."""
  def rows_cols(x):
    return None if x is None else _block(_block(x, 3, i, plan.bq), 4, j, plan.bk)
  return _Extras(bias=rows_cols(ex.bias), mask=ex.mask)


def _scores(plan: _Plan, q_blk: Array, k_blk: Array, ex_blk: _Extras, i, j):
  """Hidden-masked float32 logits of block (i, j) [B, K, G, bq, bk], and tanh if soft-capped."""
  s = jnp.einsum("bkgqh,bksh->bkgqs", q_blk, k_blk, preferred_element_type=jnp.float32)
  if plan.scale != 1.0:
    s = s * plan.scale
  if ex_blk.bias is not None:
    s = s + ex_blk.bias
  tanh = None
  if plan.soft_cap is not None:
    tanh = jnp.tanh(s / plan.soft_cap)
    s = plan.soft_cap * tanh
  if plan.needs_mask(i, j):
    s = jnp.where(_visible(plan, ex_blk.mask, s.shape, i, j), s, _HIDDEN)
  return s, tanh


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


def _token(*xs: Array) -> Array:
  """A float32 zero computed from each of ``xs``: a data dependency on all of them at the cost
  of tiny reductions (non-finite values count as zero, so a NaN or inf in one row cannot leak
  into others)."""
  def zero(x):
    first = lax.slice(jnp.ravel(x), (0,), (1,))
    return jnp.sum(jnp.where(jnp.isfinite(first), first, 0).astype(jnp.float32) * 0)
  return sum(zero(x) for x in xs)


def _after(token: Array | None, blocks, unrolled: bool):
  """``blocks`` made to depend on ``token`` (from :func:`_token`) when unrolled. XLA:CPU
  schedules independent ops breadth-first (every block's logits at once, which can fill
  memory); a data dependency of a matmul operand on the previous step makes it work on one
  block at a time. Optimisation barriers do not survive its pipeline."""
  if not unrolled or token is None:
    return blocks
  return jax.tree.map(
      lambda x: x + token.astype(x.dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, blocks)


def _lanes(work: list[int], lanes: int) -> list[list[int]]:
  """Outer blocks dealt to lanes: greedily, most work first, each to the least-loaded lane."""
  load = [0] * lanes
  blocks: list[list[int]] = [[] for _ in range(lanes)]
  for o in sorted(range(len(work)), key=lambda o: -work[o]):
    lane = load.index(min(load))
    blocks[lane].append(o)
    load[lane] += work[o]
  return [sorted(b) for b in blocks if b]


def _sweep(plan: _Plan, n_outer: int, inner_blocks, init, step, shared, finish=None,
           start=None, transpose: bool = False, runtime_empty: Array | None = None):
  """Runs ``for o: c = init(o); for n in inner_blocks(o): c, shared = step(o, n, c, shared)``,
  skipping the blocks (o, n) that the plan's static grid, or ``runtime_empty`` (bool
  [nq, nk], traced), says are empty (``transpose``: o indexes key blocks, n query blocks).

  The carry's last element is a :func:`_token` of the step's last results, which the next step
  (and the next outer block in the same lane) waits for; the first outer blocks wait for the
  token ``start``, if given.

  Returns ``(shared, results)``: ``shared`` holds full-size results that ``step`` updates block
  by block in place, and ``results`` joins ``finish(o, c)`` of every outer block along axis 3
  (None without ``finish``). Small plans are unrolled in Python with static block indices; the
  outer blocks are dealt to ``plan.lanes`` chains, balanced by their number of inner blocks,
  that XLA:CPU runs side by side on its threads. The lanes' steps are emitted in turn, so their
  in-place updates of ``shared`` interleave rather than wait for one another. Larger plans run
  as lax loops.
  """
  finish = finish or (lambda o, carry: ())
  if runtime_empty is not None and transpose:
    runtime_empty = runtime_empty.T

  def guarded(o, n, carry, shared):  # step, or nothing where the data hide the whole block
    if runtime_empty is None:
      return step(o, n, carry, shared)
    return lax.cond(runtime_empty[o, n], lambda c, sh: (c, sh),
                    lambda c, sh: step(o, n, c, sh), carry, shared)

  if plan.unrolled():
    def inner(o):
      return [n for n in range(*inner_blocks(o))
              if not (plan.empty[n][o] if transpose else plan.empty[o][n])]
    work = [len(inner(o)) for o in range(n_outer)]
    state, results = {"shared": shared}, [None] * n_outer

    def lane(blocks):
      previous = start
      for o in blocks:
        carry = _after(previous, init(o), True)
        for n in inner(o):
          carry, state["shared"] = guarded(o, n, carry, state["shared"])
          yield
        results[o], previous = finish(o, carry), carry[-1]

    lanes = [lane(blocks) for blocks in _lanes(work, min(plan.lanes, n_outer))]
    while lanes:
      lanes = [it for it in lanes if next(it, StopIteration) is not StopIteration]
    return state["shared"], jax.tree.map(lambda *xs: jnp.concatenate(xs, axis=3), *results)

  hull = None if runtime_empty is None else _hulls(jnp.logical_not(runtime_empty))

  def outer(shared, o):
    lo, hi = inner_blocks(o)
    if hull is not None:  # Only the blocks between the first and last the data show.
      lo = jnp.maximum(lo, hull[0][o])
      hi = jnp.maximum(lo, jnp.minimum(hi, hull[1][o]))
    carry, shared = lax.fori_loop(lo, hi, lambda n, c: guarded(o, n, *c), (init(o), shared))
    return shared, finish(o, carry)

  shared, results = lax.scan(outer, shared, jnp.arange(n_outer))
  join = lambda x: jnp.moveaxis(x, 0, 3).reshape(x.shape[1:4] + (-1,) + x.shape[5:])  # noqa: E731
  return shared, jax.tree.map(join, results)


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

  def init(i):
    return (q_block(i), jnp.full((B, K, G, plan.bq), _MAX_START, jnp.float32),
            jnp.zeros((B, K, G, plan.bq), jnp.float32),
            jnp.zeros((B, K, G, plan.bq, H), jnp.float32), jnp.zeros((), jnp.float32))

  def step(i, j, carry, shared):
    q_blk, m, row_sum, acc, token = carry
    k_blk, v_blk = _after(token, (k_block(j), v_block(j)), unrolled)
    s, _ = _scores(plan, q_blk, k_blk, _slice_blocks(plan, ex, i, j), i, j)
    m_new = jnp.maximum(m, jnp.max(s, axis=-1))
    p = jnp.exp(s - m_new[..., None])
    alpha = jnp.exp(m - m_new)
    row_sum = row_sum * alpha + jnp.sum(p, axis=-1)
    pv = jnp.einsum("bkgqs,bksh->bkgqh", p.astype(v_blk.dtype), v_blk,
                    preferred_element_type=jnp.float32)
    acc = acc * alpha[..., None] + pv
    return (q_blk, m_new, row_sum, acc, _token(m_new, row_sum, acc)), shared

  def finish(i, carry):  # The block's output [B, K, G, bq, H] and lse [B, K, G, bq].
    _, m, row_sum, acc, _ = carry
    inv_sum = jnp.where(row_sum > 0, 1 / row_sum, 0.0)
    return (acc * inv_sum[..., None]).astype(q5.dtype), m + jnp.log(row_sum)

  empty = masks_lib.runtime_block_empty(ex.mask, plan.T, plan.S, plan.bq, plan.bk)
  _, (out, lse4) = _sweep(plan, plan.nq, plan.kv_blocks, init, step, None, finish,
                          runtime_empty=empty)
  return jnp.moveaxis(out, 3, 1), lse4


# ----------------------------------------------------------------------------- backward


def _backward(plan: _Plan, q5, k4, v4, ex: _Extras, out5, lse4, dout5, dlse4):
  """Float32 gradients (dq5, dk4, dv4, dbias5 or None) in one sweep, key blocks outside
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

  def step(j, i, carry, shared):
    dq, dk, dv, dbias5 = shared
    k_blk, v_blk, token = carry
    q_blk, do_blk = _after(token, (q_block(i), do_block(i)), unrolled)
    lse_blk, delta_blk = _block(lse_safe, 3, i, plan.bq), _block(delta, 3, i, plan.bq)
    s, tanh = _scores(plan, q_blk, k_blk, _slice_blocks(plan, ex, i, j), i, j)
    p = jnp.exp(s - lse_blk[..., None])
    dp = jnp.einsum("bkgqh,bksh->bkgqs", do_blk, v_blk, preferred_element_type=jnp.float32)
    ds = p * (dp - delta_blk[..., None])
    if tanh is not None:
      ds = ds * (1 - tanh * tanh)
    if dbias5 is not None:
      axes = tuple(a for a in range(5) if dbias5.shape[a] == 1)
      dbias5 = _add_bias_block(dbias5, jnp.sum(ds, axis=axes, keepdims=True), i, j, plan)
    ds = ds.astype(q_blk.dtype)
    dq_blk = jnp.einsum("bkgqs,bksh->bkgqh", ds, k_blk, preferred_element_type=jnp.float32)
    dk_t = jnp.einsum("bkgqh,bkgqs->bkhs", q_blk, ds, preferred_element_type=jnp.float32)
    dv_t = jnp.einsum("bkgqh,bkgqs->bkhs", do_blk, p.astype(do_blk.dtype),
                      preferred_element_type=jnp.float32)
    # q_blk carries q_scale, so dk needs only the logit scale; dq needs both.
    dq = add_dq(dq, i, dq_blk * (plan.scale * plan.q_scale))
    dk = add_dk(dk, j, dk_t * plan.scale)
    dv = add_dv(dv, j, dv_t)
    return (k_blk, v_blk, _token(dq_blk, dk_t, dv_t)), (dq, dk, dv, dbias5)

  shared = (dq, dk, dv, None if ex.bias is None else jnp.zeros(ex.bias.shape, jnp.float32))
  # The first key blocks wait for delta, so that XLA does not cut them out at the very start.
  dq, dk, dv, dbias5 = _sweep(plan, plan.nk, plan.q_blocks, init, step, shared,
                              transpose=True, runtime_empty=masks_lib.runtime_block_empty(
                                  ex.mask, plan.T, plan.S, plan.bq, plan.bk),
                              start=_token(delta))[0]
  return dq_done(dq), dk_done(dk), dv_done(dv), dbias5


def _add_block(x: Array, update: Array, axis: int, index, size: int) -> Array:
  """x with ``update`` added to block ``index`` of ``size`` along ``axis``, in place."""
  current = lax.dynamic_slice_in_dim(x, index * size, size, axis=axis)
  return lax.dynamic_update_slice_in_dim(x, current + update, index * size, axis=axis)


def _add_bias_block(dbias5: Array, dbias: Array, i, j, plan: _Plan) -> Array:
  """dbias5 with one block's bias gradient added at block (i, j) of its full-size dims."""
  starts = [0, 0, 0, i * plan.bq if dbias5.shape[3] > 1 else 0,
            j * plan.bk if dbias5.shape[4] > 1 else 0]
  current = lax.dynamic_slice(dbias5, starts, dbias.shape)
  return lax.dynamic_update_slice(dbias5, current + dbias, starts)


# ----------------------------------------------------------------------------- custom vjp


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attend(plan: _Plan, q5, k4, v4, ex: _Extras):
  return _forward(plan, q5, k4, v4, ex)


def _attend_fwd(plan, q5, k4, v4, ex):
  out5, lse4 = _forward(plan, q5, k4, v4, ex)
  return (out5, lse4), (q5, k4, v4, ex, out5, lse4)


def _attend_bwd(plan, residuals, cotangents):
  q5, k4, v4, ex, out5, lse4 = residuals
  dout5, dlse4 = cotangents
  # Square blocks: each key block's sweep over query blocks then cuts out small blocks of q and
  # dout, and the block logits stay as small as the forward pass's key blocks.
  plan = dataclasses.replace(plan, bq=min(plan.bq, plan.bk)).with_grid(ex.mask)
  dq5, dk4, dv4, dbias5 = _backward(plan, q5, k4, v4, ex, out5, lse4, dout5, dlse4)
  dex = _Extras(bias=dbias5, mask=None)
  return dq5.astype(q5.dtype), dk4.astype(k4.dtype), dv4.astype(v4.dtype), dex


_attend.defvjp(_attend_fwd, _attend_bwd)


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
