"""How the blockwise attention's blocks are cut and run on XLA: loops, chains and layouts.

``attnjax.blockwise`` holds the algorithm (FlashAttention-2 tiling, online softmax, the
recomputing backward pass); this module holds what makes it run well on XLA:CPU without
changing a number it computes:

* :func:`_sweep` runs ``for outer block: for inner block: step`` over the blocks a plan has
  not found empty. Up to ``blockwise._MAX_UNROLLED_PAIRS`` block pairs it is a Python-unrolled
  loop with static block ranges, whose outer blocks are dealt to two chains (lanes) that
  XLA:CPU runs side by side (a small batched matmul runs on one core); longer sequences run
  as ``lax`` loops, with ``lax.cond`` around blocks that a data-dependent mask hides at run
  time.
* :func:`_token` and :func:`_after` chain each step to the previous one with a data
  dependency: XLA:CPU schedules independent ops breadth-first (every block's logits at once,
  which can fill memory), and optimisation barriers do not survive its pipeline.
* :class:`_Layout` cuts blocks: unrolled, from the caller's ``[B, T, N, H]`` layout, each
  block transposed on its own (no transposed copy of q, k, v or the gradients is ever held);
  in lax loops, from arrays transposed heads-first once. On CPU small temporaries matter
  twice: XLA allocates a program's temporary buffer on every call, and above glibc's mmap
  threshold (32 MB) every page of it is a fresh page fault.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array, lax

if TYPE_CHECKING:
  from attnjax.blockwise import _Plan


def _default_lanes() -> int:
  """Chains of blocks to run side by side: two on CPU, where a small batched matmul runs on one
  core (more chains only cost memory on the 2-core machines this was tuned on), else one."""
  return 2 if jax.default_backend() == "cpu" else 1


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


def _sweep(plan: _Plan, n_outer: int, inner_blocks, init, step, shared=None, apply=None,
           finish=None, start=None, transpose: bool = False,
           runtime_empty: Array | None = None):
  """Runs ``for o: c = init(o); for n in inner_blocks(o): c, u = step(o, n, c); shared =
  apply(o, n, shared, u)``, skipping the blocks (o, n) that the plan's static grid, or
  ``runtime_empty`` (bool [nq, nk], traced), says are empty (``transpose``: o indexes key
  blocks, n query blocks). Without ``apply`` the updates ``u`` are dropped.

  Where the data may hide a block, only ``step`` runs under ``lax.cond`` (an empty block
  updates by zeros): full-size arrays passed through a conditional inside a loop are copied
  on every iteration.

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
      carry, update = step(o, n, carry)
    else:
      def skip(c):
        types = jax.eval_shape(lambda c: step(o, n, c), c)
        return jax.tree.map(_like, (c, jax.tree.map(_zeros, types[1])), types)
      carry, update = lax.cond(runtime_empty[o, n], skip, lambda c: step(o, n, c), carry)
    return carry, (shared if apply is None else apply(o, n, shared, update))

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
  # Inside jax.shard_map a loop's carry must enter with the types the step gives it back.
  types = _loop_types(lambda c: guarded(0, 0, *c), (init(0), shared))
  shared = jax.tree.map(_like, shared, types[1])

  def outer(shared, o):
    lo, hi = inner_blocks(o)
    if hull is not None:  # Only the blocks between the first and last the data show.
      lo = jnp.maximum(lo, hull[0][o])
      hi = jnp.maximum(lo, jnp.minimum(hi, hull[1][o]))
    carry = jax.tree.map(_like, init(o), types[0])
    carry, shared = lax.fori_loop(lo, hi, lambda n, c: guarded(o, n, *c), (carry, shared))
    return shared, finish(o, carry)

  shared, results = lax.scan(outer, shared, jnp.arange(n_outer))
  join = lambda x: jnp.moveaxis(x, 0, 3).reshape(x.shape[1:4] + (-1,) + x.shape[5:])  # noqa: E731
  return shared, jax.tree.map(join, results)


def _loop_types(body, carry):
  """The types a loop ``carry = body(carry)`` settles on: under ``jax.shard_map``, the carry
  varies over every mesh axis that anything the body reads varies over."""
  for _ in range(len(jax.tree.leaves(carry)) + 1):
    types = jax.eval_shape(body, carry)
    cast = jax.tree.map(_like, carry, types)
    if all(jax.typeof(a) == jax.typeof(b) for a, b in
           zip(jax.tree.leaves(cast), jax.tree.leaves(carry))):
      return types
    carry = cast
  raise AssertionError("unreachable: each pass adds an axis to some leaf")


def _zeros(struct) -> Array:
  return jnp.zeros(struct.shape, struct.dtype)


def _like(x: Array, struct) -> Array:
  """x, marked as varying over the ``jax.shard_map`` axes that ``struct`` (a result type of
  the step) varies over: both branches of a conditional must return the same types."""
  manual = getattr(struct, "manual_axis_type", None)
  if manual is None:
    return x
  axes = tuple(manual.varying - jax.typeof(x).manual_axis_type.varying)
  return lax.pcast(x, axes, to="varying") if axes else x


def _add_block(x: Array, update: Array, axis: int, index, size: int) -> Array:
  """x with ``update`` added to block ``index`` of ``size`` along ``axis``, in place."""
  current = lax.dynamic_slice_in_dim(x, index * size, size, axis=axis)
  return lax.dynamic_update_slice_in_dim(x, current + update, index * size, axis=axis)
