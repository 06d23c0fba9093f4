"""Boolean attention masks.

Every mask here is a bool array with True meaning "this query may attend to this key",
broadcastable to the logits' shape ``[..., N, T, S]`` (N heads, T queries, S keys).
Masks of different origin combine with logical AND (:func:`combine_masks`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array
from jax.typing import ArrayLike


def causal_mask(q_len: int, kv_len: int | None = None, *, offset: ArrayLike = 0) -> Array:
  """Causal mask: key j is visible to query i iff ``j <= i + offset``.

  With ``offset=0`` this is the top-left aligned lower triangle (``tril(ones(T, S))``), the
  convention of ``jax.nn.dot_product_attention`` and PyTorch. For decoding with a cache, pass
  the position of the first query as ``offset`` (it may be a traced integer).

  Args:
    q_len: number of queries T.
    kv_len: number of keys S; defaults to ``q_len``.
    offset: position of query 0 relative to key 0.

  Returns:
    bool ``[T, S]``.
  """
  kv_len = q_len if kv_len is None else kv_len
  _check_length("q_len", q_len)
  _check_length("kv_len", kv_len)
  q_pos = jnp.arange(q_len)[:, None] + offset
  return jnp.arange(kv_len)[None, :] <= q_pos


def sliding_window_mask(q_len: int, kv_len: int, window: int | tuple[int, int]) -> Array:
  """Local attention: key j is visible to query i iff ``i - left <= j <= i + right``.

  Args:
    q_len: number of queries T.
    kv_len: number of keys S.
    window: ``(left, right)`` non-negative ints, or one int ``w`` meaning ``(w, w)``.

  Returns:
    bool ``[T, S]``.

  Raises:
    ValueError: if the window is negative or not one or two ints.
  """
  _check_length("q_len", q_len)
  _check_length("kv_len", kv_len)
  left, right = canonical_window(window, "window")
  diff = jnp.arange(kv_len)[None, :] - jnp.arange(q_len)[:, None]
  # Sides longer than the sequence hide nothing; cutting them keeps int32 from overflowing.
  left, right = min(left, max(q_len, 1)), min(right, max(kv_len, 1))
  return (diff >= -left) & (diff <= right)


def padding_mask(q_valid: ArrayLike, kv_valid: ArrayLike) -> Array:
  """Mask from per-token validity: query i sees key j iff both are valid.

  Args:
    q_valid: bool ``[..., T]``, True for real (non-padding) queries.
    kv_valid: bool ``[..., S]``, True for real keys.

  Returns:
    bool ``[..., 1, T, S]`` (the 1 broadcasts over heads).
  """
  q_valid = _as_bool("q_valid", q_valid)
  kv_valid = _as_bool("kv_valid", kv_valid)
  _check_batch("q_valid", q_valid, "kv_valid", kv_valid)
  return q_valid[..., None, :, None] & kv_valid[..., None, None, :]


def lengths_mask(q_lengths: ArrayLike, kv_lengths: ArrayLike, q_len: int, kv_len: int) -> Array:
  """Padding mask from sequence lengths: positions ``>= length`` are padding.

  Args:
    q_lengths: int ``[...]``, number of real queries per sequence.
    kv_lengths: int ``[...]``, number of real keys per sequence.
    q_len: padded query length T.
    kv_len: padded key length S.

  Returns:
    bool ``[..., 1, T, S]``.

  Raises:
    TypeError: for lengths that are not integers.
    ValueError: for a negative length (checked when the lengths are concrete, not traced),
      or a negative ``q_len`` or ``kv_len``.
  """
  _check_length("q_len", q_len)
  _check_length("kv_len", kv_len)
  q_lengths, kv_lengths = jnp.asarray(q_lengths), jnp.asarray(kv_lengths)
  for name, x in (("q_lengths", q_lengths), ("kv_lengths", kv_lengths)):
    if not jnp.issubdtype(x.dtype, jnp.integer):
      raise TypeError(f"{name} must be integers, got dtype {x.dtype}")
    if not isinstance(x, jax.core.Tracer) and np.any(np.asarray(x) < 0):
      raise ValueError(f"{name} must be non-negative, got {np.asarray(x).tolist()}")
  q_valid = jnp.broadcast_to(jnp.arange(q_len), q_lengths.shape + (q_len,)) < q_lengths[..., None]
  kv_valid = (jnp.broadcast_to(jnp.arange(kv_len), kv_lengths.shape + (kv_len,))
              < kv_lengths[..., None])
  return padding_mask(q_valid, kv_valid)


def segment_mask(q_segment_ids: ArrayLike, kv_segment_ids: ArrayLike) -> Array:
  """Mask for packed sequences: query i sees key j iff their segment ids are equal.

  Args:
    q_segment_ids: int ``[..., T]``.
    kv_segment_ids: int ``[..., S]``.

  Returns:
    bool ``[..., 1, T, S]``.
  """
  q_ids, kv_ids = jnp.asarray(q_segment_ids), jnp.asarray(kv_segment_ids)
  for name, x in (("q_segment_ids", q_ids), ("kv_segment_ids", kv_ids)):
    if not jnp.issubdtype(x.dtype, jnp.integer):
      raise TypeError(f"{name} must be integers, got dtype {x.dtype}")
    if x.ndim < 1:
      raise ValueError(f"{name} must have shape [..., length], got shape {x.shape}")
  _check_batch("q_segment_ids", q_ids, "kv_segment_ids", kv_ids)
  return q_ids[..., None, :, None] == kv_ids[..., None, None, :]


def combine_masks(*masks: ArrayLike | None) -> Array | None:
  """Logical AND of masks with broadcasting; ``None`` entries are skipped.

  Returns:
    The combined bool mask, or ``None`` if every entry is ``None``.

  Raises:
    TypeError: if a mask is not bool.
    ValueError: if the masks do not broadcast together.
  """
  given = [_as_bool(f"masks[{i}]", m) for i, m in enumerate(masks) if m is not None]
  if not given:
    return None
  try:
    shape = jnp.broadcast_shapes(*(m.shape for m in given))
  except ValueError:
    shapes = ", ".join(str(m.shape) for m in given)
    raise ValueError(f"combine_masks: masks do not broadcast together, got shapes "
                     f"{shapes}") from None
  # Broadcast explicitly, so that masks of different ranks combine under strict rank promotion.
  return functools.reduce(jnp.logical_and, [jnp.broadcast_to(m, shape) for m in given])


def canonical_window(window: int | tuple[int, int],
                     name: str = "local_window_size") -> tuple[int, int]:
  """``window`` as a ``(left, right)`` pair of non-negative Python ints.

  Concrete integer scalars (NumPy or JAX) are accepted; traced ones are refused.

  Args:
    window: one int ``w`` meaning ``(w, w)``, or a ``(left, right)`` pair.
    name: the caller's name for ``window``, used in error messages.

  Raises:
    ValueError: if ``window`` is traced, negative or not one or two ints.
  """
  if isinstance(window, jax.core.Tracer) or (
      isinstance(window, (tuple, list)) and any(isinstance(w, jax.core.Tracer) for w in window)):
    raise ValueError(f"{name} must be static (Python ints), got a traced value "
                     f"{window!r}; pass it outside jit or as a static argument")

  def as_int(w):  # A concrete integer array scalar as an int; anything else as it is.
    integer_scalar = (isinstance(w, (np.ndarray, jax.Array)) and w.ndim == 0
                      and jnp.issubdtype(w.dtype, jnp.integer))
    return int(w) if integer_scalar else w

  scalar = isinstance(window, (int, float, np.number)) or getattr(window, "ndim", None) == 0
  try:
    pair = (window, window) if scalar else tuple(window)  # type: ignore[arg-type]
  except TypeError:  # Not iterable.
    pair = ()
  pair = tuple(as_int(w) for w in pair)
  if len(pair) != 2 or not all(isinstance(w, (int, np.integer)) for w in pair):
    raise ValueError(f"{name} must be an int or a (left, right) pair of ints, got {window!r}")
  if min(pair) < 0:
    raise ValueError(f"{name} must be non-negative, got {window!r}")
  return int(pair[0]), int(pair[1])


def clamp_window(window: tuple[int, int] | None, q_len: int, kv_len: int,
                 is_causal: bool = False) -> tuple[int, int] | None:
  """``window`` with each side cut to what the lengths can use, or None if it hides nothing.

  A side at least as long as the sequence means "unbounded": ``left >= q_len - 1`` and
  ``right >= kv_len - 1`` hide no key (nor does ``right`` under causality), so users may pass
  ``2**31 - 1`` or ``sys.maxsize`` without overflowing int32 position arithmetic.
  """
  if window is None or not all(isinstance(n, (int, np.integer)) for n in (q_len, kv_len)):
    return window  # (Symbolic lengths: no cut.)
  left = min(window[0], max(q_len - 1, 0))
  right = min(window[1], max(kv_len - 1, 0))
  if left >= q_len - 1 and (right >= kv_len - 1 or is_causal):
    return None
  return left, right


def _as_bool(name: str, mask: ArrayLike) -> Array:
  mask = jnp.asarray(mask)
  if mask.dtype != jnp.bool_:
    raise TypeError(f"{name} must be a bool array (True = attend), got dtype {mask.dtype}")
  return mask


def _check_length(name: str, n: int) -> None:
  if jax.export.is_symbolic_dim(n):  # A length left symbolic by shape-polymorphic export.
    return
  if not isinstance(n, (int, np.integer)) or n < 0:
    raise ValueError(f"{name} must be a non-negative int, got {n!r}")


def _check_batch(name_a: str, a: Array, name_b: str, b: Array) -> None:
  if a.shape[:-1] != b.shape[:-1]:
    raise ValueError(
        f"{name_a} and {name_b} must have the same leading (batch) dims, "
        f"got shapes {a.shape} and {b.shape}")


# ----------------------------------------------------------------------------- mask objects
#
# A mask object is a rule over (batch, head, query index, key index) and what that rule says
# about a block of the (query block, key block) grid: empty (no key visible), full (every key
# visible) or partial. The dense path evaluates the rule on the whole grid; the blockwise path
# skips empty blocks and evaluates the rule only in partial ones; decoding with a cache
# evaluates it at the cache's positions. Each rule is written once, here.


class Mask:
  """Base class of the mask objects: ``mask(batch, head, q_idx, kv_idx) -> bool``.

  The arguments are int32 arrays that broadcast to ``[B, N, Tb, Sb]``: ``batch [B, 1, 1, 1]``,
  ``head [1, N, 1, 1]``, ``q_idx [1, 1, Tb, 1]``, ``kv_idx [1, 1, 1, Sb]`` (absolute query and
  key positions); the result is bool, True = attend, broadcastable to the same shape. Masks
  combine with ``&`` (both), ``|`` (either) and ``~`` (the complement).
  """

  def __call__(self, batch: Array, head: Array, q_idx: Array, kv_idx: Array) -> Array:
    raise NotImplementedError

  def block_grid(self, q_len: int, kv_len: int, block_q: int, block_k: int,
                 static_only: bool = False):
    """``(empty, full)``: bool ``[nq, nk]`` over the grid of blocks, or None where unknown.

    Static masks give NumPy arrays (known at trace time); masks of data give JAX arrays,
    computed at run time without forming a ``[T, S]`` array (None with ``static_only``). A
    block at the end counts only its queries below ``q_len`` and keys below ``kv_len``.
    """
    return None, None

  def canonical(self, batch_shape: tuple[int, ...], num_heads: int, q_len: int,
                kv_len: int) -> Mask:
    """This mask with its arrays checked against the problem and their batch dims flattened
    into one (the layout :func:`attnjax.dot_product_attention` works in)."""
    return self

  def __and__(self, other: Mask) -> Mask:
    return And(self, as_mask(other))

  def __rand__(self, other: Mask) -> Mask:
    return And(as_mask(other), self)

  def __or__(self, other: Mask) -> Mask:
    return Or(self, as_mask(other))

  def __ror__(self, other: Mask) -> Mask:
    return Or(as_mask(other), self)

  def __invert__(self) -> Mask:
    return Not(self)


def _dataclass(cls=None, *, meta=()):
  """A dataclass registered as a pytree: ``meta`` fields static, the others leaves."""
  def wrap(cls):
    fields = [f.name for f in dataclasses.fields(cls)]
    return jax.tree_util.register_dataclass(
        cls, data_fields=[f for f in fields if f not in meta], meta_fields=list(meta))
  return wrap if cls is None else wrap(cls)


def _block_ranges(length: int, block: int):
  """First and last index of each block, cut to ``length`` (NumPy int64 [n])."""
  n = -(-length // block)
  first = np.arange(n) * block
  return first, np.minimum(first + block, length) - 1


@_dataclass(meta=("offset",))
@dataclasses.dataclass(frozen=True)
class Causal(Mask):
  """Key j is visible to query i iff ``j <= i + offset`` (top-left aligned for offset 0)."""
  offset: int = 0

  def __call__(self, batch, head, q_idx, kv_idx):
    return kv_idx <= q_idx + self.offset

  def block_grid(self, q_len, kv_len, block_q, block_k, static_only=False):
    q0, q1 = _block_ranges(q_len, block_q)
    k0, k1 = _block_ranges(kv_len, block_k)
    off = self.offset
    return k0[None, :] > q1[:, None] + off, k1[None, :] <= q0[:, None] + off


@_dataclass(meta=("left", "right"))
@dataclasses.dataclass(frozen=True)
class LocalWindow(Mask):
  """Key j is visible to query i iff ``i - left <= j <= i + right``."""
  left: int
  right: int

  def __post_init__(self):
    if not all(isinstance(w, (int, np.integer)) and w >= 0 for w in (self.left, self.right)):
      raise ValueError(f"LocalWindow(left, right) needs non-negative ints, got "
                       f"({self.left!r}, {self.right!r})")

  def __call__(self, batch, head, q_idx, kv_idx):
    diff = kv_idx - q_idx
    return (diff >= -self.left) & (diff <= self.right)

  def canonical(self, batch_shape, num_heads, q_len, kv_len):
    # Sides longer than the sequence hide nothing; cutting them keeps int32 from overflowing.
    if not all(isinstance(n, (int, np.integer)) for n in (q_len, kv_len)):
      return self  # Symbolic lengths (shape-polymorphic export): no cut.
    return LocalWindow(min(self.left, max(q_len, 1)), min(self.right, max(kv_len, 1)))

  def block_grid(self, q_len, kv_len, block_q, block_k, static_only=False):
    q0, q1 = _block_ranges(q_len, block_q)
    k0, k1 = _block_ranges(kv_len, block_k)
    empty = (k1[None, :] < q0[:, None] - self.left) | (k0[None, :] > q1[:, None] + self.right)
    full = (k0[None, :] >= q1[:, None] - self.left) & (k1[None, :] <= q0[:, None] + self.right)
    return empty, full


@_dataclass(meta=("size",))
@dataclasses.dataclass(frozen=True)
class Chunked(Mask):
  """Key j is visible to query i iff ``i // size == j // size`` (block-diagonal chunks, as in
  Llama 4's chunked attention; ``Chunked(n) & Causal()`` for causal chunks)."""
  size: int

  def __post_init__(self):
    if not isinstance(self.size, (int, np.integer)) or self.size < 1:
      raise ValueError(f"Chunked(size) needs a positive int size, got {self.size!r}")

  def __call__(self, batch, head, q_idx, kv_idx):
    return q_idx // self.size == kv_idx // self.size

  def block_grid(self, q_len, kv_len, block_q, block_k, static_only=False):
    q0, q1 = (x // self.size for x in _block_ranges(q_len, block_q))
    k0, k1 = (x // self.size for x in _block_ranges(kv_len, block_k))
    empty = (k1[None, :] < q0[:, None]) | (k0[None, :] > q1[:, None])
    full = (q0 == q1)[:, None] & (k0 == k1)[None, :] & (q0[:, None] == k0[None, :])
    return empty, full


class _DataMask(Mask):
  """A mask of per-sequence arrays whose leading dims are the batch dims."""

  def _arrays(self) -> dict[str, tuple[Array, str]]:
    """{field: (array, what its trailing dims must be: "", "T" or "S")}."""
    raise NotImplementedError

  def canonical(self, batch_shape, num_heads, q_len, kv_len):
    changes = {}
    for name, (x, tail) in self._arrays().items():
      x = jnp.asarray(x)
      if not jnp.issubdtype(x.dtype, jnp.integer):
        raise TypeError(f"{type(self).__name__}.{name} must be integers, got dtype {x.dtype}")
      want = tuple(batch_shape) + {"": (), "T": (q_len,), "S": (kv_len,)}[tail]
      if x.shape != want:
        raise ValueError(f"{type(self).__name__}.{name} must have shape {want} (batch dims"
                         f"{' + length' if tail else ''}), got {x.shape}")
      flat = (math.prod(batch_shape),) + x.shape[len(batch_shape):]  # not -1: B may be 0
      changes[name] = x.reshape(flat).astype(jnp.int32)
    return dataclasses.replace(self, **changes)


def _block_min_max(x: Array, block: int) -> tuple[Array, Array]:
  """Per-block min and max of ``x [B, L]`` along L: ``[B, nblocks]`` each."""
  B, L = x.shape
  n = -(-L // block)
  pad = n * block - L
  lo = jnp.pad(x, ((0, 0), (0, pad)), constant_values=jnp.iinfo(jnp.int32).max)
  hi = jnp.pad(x, ((0, 0), (0, pad)), constant_values=jnp.iinfo(jnp.int32).min)
  return lo.reshape(B, n, block).min(-1), hi.reshape(B, n, block).max(-1)


def _take(x: Array, idx: Array) -> Array:
  """``x [B, L]`` at positions ``idx`` (broadcastable [1, 1, Lb, 1] or [1, 1, 1, Lb]) as an
  array that broadcasts against them: ``[B, 1, Lb, 1]`` or ``[B, 1, 1, Lb]``."""
  flat = jnp.take(x, idx.reshape(-1), axis=1, mode="clip")
  return flat.reshape((x.shape[0],) + idx.shape[1:])


@_dataclass
@dataclasses.dataclass(frozen=True)
class Segments(_DataMask):
  """Packed sequences: key j is visible to query i iff their segment ids are equal.

  ``q_segment_ids [..., T]`` and ``kv_segment_ids [..., S]`` are ints and may be traced; the
  blockwise path classifies blocks at run time from each block's min and max id, so the
  blocks between documents are skipped under ``jit``.
  """
  q_segment_ids: Array
  kv_segment_ids: Array

  def _arrays(self):
    return {"q_segment_ids": (self.q_segment_ids, "T"),
            "kv_segment_ids": (self.kv_segment_ids, "S")}

  def __call__(self, batch, head, q_idx, kv_idx):
    return _take(self.q_segment_ids, q_idx) == _take(self.kv_segment_ids, kv_idx)

  def block_grid(self, q_len, kv_len, block_q, block_k, static_only=False):
    if static_only:
      return None, None
    q_lo, q_hi = _block_min_max(self.q_segment_ids, block_q)  # [B, nq]
    k_lo, k_hi = _block_min_max(self.kv_segment_ids, block_k)  # [B, nk]
    empty = (q_hi[:, :, None] < k_lo[:, None, :]) | (k_hi[:, None, :] < q_lo[:, :, None])
    full = ((q_lo == q_hi)[:, :, None] & (k_lo == k_hi)[:, None, :]
            & (q_lo[:, :, None] == k_lo[:, None, :]))
    return empty.all(0), full.all(0)


@_dataclass
@dataclasses.dataclass(frozen=True)
class Lengths(_DataMask):
  """Padding from lengths: key j is visible to query i iff ``i < q_lengths[b]`` and
  ``j < kv_lengths[b]``. ``q_lengths`` and ``kv_lengths`` are int ``[...]`` (batch dims) and
  may be traced; blocks of padding are skipped at run time."""
  q_lengths: Array
  kv_lengths: Array

  def _arrays(self):
    return {"q_lengths": (self.q_lengths, ""), "kv_lengths": (self.kv_lengths, "")}

  def __call__(self, batch, head, q_idx, kv_idx):
    q_len = self.q_lengths.reshape(self.q_lengths.shape + (1, 1, 1))
    kv_len = self.kv_lengths.reshape(self.kv_lengths.shape + (1, 1, 1))
    return (q_idx < q_len) & (kv_idx < kv_len)

  def block_grid(self, q_len, kv_len, block_q, block_k, static_only=False):
    if static_only:
      return None, None
    q0, q1 = _block_ranges(q_len, block_q)
    k0, k1 = _block_ranges(kv_len, block_k)
    ql, kl = self.q_lengths[:, None, None], self.kv_lengths[:, None, None]
    empty = (q0[None, :, None] >= ql) | (k0[None, None, :] >= kl)
    full = (q1[None, :, None] < ql) & (k1[None, None, :] < kl)
    return empty.all(0), full.all(0)


@_dataclass
@dataclasses.dataclass(frozen=True)
class PrefixLM(_DataMask):
  """Prefix language model: key j is visible to query i iff ``j <= i`` or
  ``j < prefix_lengths[b]`` (bidirectional over the prefix, causal after it). The lengths
  (int ``[...]``, batch dims) may be traced."""
  prefix_lengths: Array

  def _arrays(self):
    return {"prefix_lengths": (self.prefix_lengths, "")}

  def __call__(self, batch, head, q_idx, kv_idx):
    prefix = self.prefix_lengths.reshape(self.prefix_lengths.shape + (1, 1, 1))
    return (kv_idx <= q_idx) | (kv_idx < prefix)

  def block_grid(self, q_len, kv_len, block_q, block_k, static_only=False):
    causal_empty, causal_full = Causal().block_grid(q_len, kv_len, block_q, block_k)
    if static_only:  # Visible wherever causal is, at least.
      return None, causal_full
    _, k1 = _block_ranges(kv_len, block_k)
    k0 = np.arange(len(k1)) * block_k
    prefix = self.prefix_lengths[:, None, None]
    empty = causal_empty[None] & (k0[None, None, :] >= prefix)
    full = causal_full[None] | (k1[None, None, :] < prefix)
    return empty.all(0), full.all(0)


@_dataclass(meta=("fn", "batch_heads"))
@dataclasses.dataclass(frozen=True)
class MaskFn(Mask):
  """Any rule ``fn(batch, head, q_idx, kv_idx) -> bool`` on broadcastable int32 arrays (see
  :class:`Mask`). Its blocks are classified by evaluating ``fn`` one row of blocks at a time
  (never on the whole ``[T, S]`` at once): at trace time when ``fn`` depends on the indices
  alone, so that empty blocks are skipped statically, else at run time."""
  fn: Callable[[Array, Array, Array, Array], Array]
  batch_heads: tuple[int, int] | None = None  # (B, N), set by canonical()

  def __call__(self, batch, head, q_idx, kv_idx):
    out = jnp.asarray(self.fn(batch, head, q_idx, kv_idx))
    if out.dtype != jnp.bool_:
      raise TypeError(f"MaskFn: fn must return bool (True = attend), got dtype {out.dtype}")
    shape = np.broadcast_shapes(batch.shape, head.shape, q_idx.shape, kv_idx.shape)
    try:
      np.broadcast_shapes(out.shape, shape)
    except ValueError:
      raise ValueError(f"MaskFn: fn must return a mask that broadcasts to {shape}, got shape "
                       f"{out.shape}") from None
    return out

  def canonical(self, batch_shape, num_heads, q_len, kv_len):
    return MaskFn(self.fn, (math.prod(batch_shape), num_heads))

  def block_grid(self, q_len, kv_len, block_q, block_k, static_only=False):
    B, N = self.batch_heads or (1, 1)
    nk = -(-kv_len // block_k)
    batch = jnp.arange(B, dtype=jnp.int32).reshape(B, 1, 1, 1)
    head = jnp.arange(N, dtype=jnp.int32).reshape(1, N, 1, 1)
    kv_idx = jnp.arange(nk * block_k, dtype=jnp.int32).reshape(1, 1, 1, -1)

    def row(i):  # (empty, full) [nk] of query block i
      q_idx = (i * block_q + jnp.arange(block_q, dtype=jnp.int32)).reshape(1, 1, -1, 1)
      valid = (q_idx < q_len) & (kv_idx < kv_len)
      m = jnp.broadcast_to(self(batch, head, q_idx, kv_idx), (B, N, block_q, nk * block_k))
      m = m.reshape(B, N, block_q, nk, block_k)
      v = valid.reshape(1, 1, block_q, nk, block_k)
      return ~jnp.any(m & v, (0, 1, 2, 4)), jnp.all(m | ~v, (0, 1, 2, 4))

    nq = -(-q_len // block_q)
    with jax.ensure_compile_time_eval():
      rows = [row(i) for i in range(nq)] if nq <= 64 else None
      if rows is not None and not any(isinstance(x, jax.core.Tracer) for r in rows for x in r):
        return np.stack([r[0] for r in rows]), np.stack([r[1] for r in rows])
    if static_only:
      return None, None
    return jax.lax.map(row, jnp.arange(nq))


@_dataclass
@dataclasses.dataclass(frozen=True)
class _ArrayMask(Mask):
  """A bool array ``[B|1, N|1, T|1, S|1]`` (True = attend) as a mask object."""
  mask: Array

  def __call__(self, batch, head, q_idx, kv_idx):
    m = self.mask
    if m.shape[2] > 1:
      m = jnp.take(m, q_idx.reshape(-1), axis=2, mode="clip")
    if m.shape[3] > 1:
      m = jnp.take(m, kv_idx.reshape(-1), axis=3, mode="clip")
    return m

  def canonical(self, batch_shape, num_heads, q_len, kv_len):
    return _ArrayMask(flatten_batch("mask", self.mask,
                                    tuple(batch_shape) + (num_heads, q_len, kv_len),
                                    len(batch_shape)))

  def block_grid(self, q_len, kv_len, block_q, block_k, static_only=False):
    if static_only:
      return None, None
    m = self.mask
    nq, nk = -(-q_len // block_q), -(-kv_len // block_k)
    m = jnp.broadcast_to(m, m.shape[:2] + (q_len, kv_len))
    pads = ((0, 0), (0, 0), (0, nq * block_q - q_len), (0, nk * block_k - kv_len))
    def blocks(fill):
      return jnp.pad(m, pads, constant_values=fill).reshape(
          m.shape[:2] + (nq, block_q, nk, block_k))
    return ~jnp.any(blocks(False), (0, 1, 3, 5)), jnp.all(blocks(True), (0, 1, 3, 5))


@_dataclass
@dataclasses.dataclass(frozen=True)
class And(Mask):
  """Visible where both masks are."""
  a: Mask
  b: Mask

  def __call__(self, batch, head, q_idx, kv_idx):
    return self.a(batch, head, q_idx, kv_idx) & self.b(batch, head, q_idx, kv_idx)

  def canonical(self, *args):
    return And(self.a.canonical(*args), self.b.canonical(*args))

  def block_grid(self, *args, **kwargs):
    (ea, fa), (eb, fb) = self.a.block_grid(*args, **kwargs), self.b.block_grid(*args, **kwargs)
    return _combine(ea, eb, "or"), _combine(fa, fb, "and")


@_dataclass
@dataclasses.dataclass(frozen=True)
class Or(Mask):
  """Visible where either mask is."""
  a: Mask
  b: Mask

  def __call__(self, batch, head, q_idx, kv_idx):
    return self.a(batch, head, q_idx, kv_idx) | self.b(batch, head, q_idx, kv_idx)

  def canonical(self, *args):
    return Or(self.a.canonical(*args), self.b.canonical(*args))

  def block_grid(self, *args, **kwargs):
    (ea, fa), (eb, fb) = self.a.block_grid(*args, **kwargs), self.b.block_grid(*args, **kwargs)
    return _combine(ea, eb, "and"), _combine(fa, fb, "or")


@_dataclass
@dataclasses.dataclass(frozen=True)
class Not(Mask):
  """Visible where the mask is not (full and empty blocks swap)."""
  a: Mask

  def __call__(self, batch, head, q_idx, kv_idx):
    return jnp.logical_not(self.a(batch, head, q_idx, kv_idx))

  def canonical(self, *args):
    return Not(self.a.canonical(*args))

  def block_grid(self, *args, **kwargs):
    empty, full = self.a.block_grid(*args, **kwargs)
    return full, empty


def _combine(x, y, op: str):
  """AND or OR of two block grids, where None means unknown: x AND unknown is unknown, x OR
  unknown is x (a block known to be empty, or full, by one side stays so)."""
  if x is None or y is None:
    return None if op == "and" else (x if y is None else y)
  return (x & y) if op == "and" else (x | y)


def as_mask(mask: Mask | ArrayLike) -> Mask:
  """``mask`` as a :class:`Mask`: mask objects pass through, bool arrays are wrapped."""
  if isinstance(mask, Mask):
    return mask
  return _ArrayMask(_as_bool("mask", mask))


def from_arguments(mask: Mask | ArrayLike | None, is_causal: bool,
                   window: tuple[int, int] | None, q_segment_ids: ArrayLike | None,
                   kv_segment_ids: ArrayLike | None, batch_shape: tuple[int, ...],
                   num_heads: int, q_len: int, kv_len: int) -> Mask | None:
  """The AND of ``mask`` (an object or a bool array) and the masking keyword arguments of
  :func:`attnjax.dot_product_attention`, as one canonical mask object (None if none)."""
  parts = []
  if mask is not None:
    parts.append(as_mask(mask))
  if is_causal:
    parts.append(Causal())
  if window is not None:
    left, right = canonical_window(window)
    parts.append(LocalWindow(left, right))
  if q_segment_ids is not None:
    parts.append(Segments(jnp.asarray(q_segment_ids), jnp.asarray(kv_segment_ids)))
  if not parts:
    return None
  args = (tuple(batch_shape), num_heads, q_len, kv_len)
  return functools.reduce(lambda a, b: And(a, b), (p.canonical(*args) for p in parts))


def static_block_grid(mask: Mask | None, q_len: int, kv_len: int, block_q: int,
                      block_k: int) -> tuple[np.ndarray, np.ndarray]:
  """``(empty, full)`` NumPy bool ``[nq, nk]``: the blocks that ``mask`` hides entirely, and
  those it shows entirely, as far as is known at trace time."""
  nq, nk = -(-q_len // block_q), -(-kv_len // block_k)
  if mask is None:
    return np.zeros((nq, nk), bool), np.ones((nq, nk), bool)
  empty, full = mask.block_grid(q_len, kv_len, block_q, block_k, static_only=True)
  empty = np.zeros((nq, nk), bool) if empty is None else np.array(empty, bool)
  full = np.zeros((nq, nk), bool) if full is None else np.array(full, bool)
  return empty, full


def runtime_block_empty(mask: Mask | None, q_len: int, kv_len: int, block_q: int,
                        block_k: int) -> Array | None:
  """Bool ``[nq, nk]`` of the blocks that ``mask`` hides entirely, computed at run time from
  its data (segment ids, lengths, arrays), or None when the static grid says it all."""
  if mask is None:
    return None
  empty, _ = mask.block_grid(q_len, kv_len, block_q, block_k)
  if empty is None or isinstance(empty, np.ndarray):
    return None
  return empty


def flatten_batch(name: str, x: ArrayLike, logits_shape: tuple[int, ...], n_batch: int) -> Array:
  """Checks that ``x`` broadcasts to the logits and returns it as rank 4 [B|1, N|1, T|1, S|1]."""
  x = jnp.asarray(x)
  try:
    broadcasts = jnp.broadcast_shapes(x.shape, logits_shape) == logits_shape
  except ValueError:
    broadcasts = False
  if not broadcasts:
    raise ValueError(f"{name} of shape {x.shape} does not broadcast to the logits' shape "
                     f"[..., N, T, S] = {logits_shape}")
  x = x.reshape((1,) * (len(logits_shape) - x.ndim) + x.shape)
  lead, tail = x.shape[:n_batch], x.shape[n_batch:]
  if all(d == 1 for d in lead):
    return x.reshape((1,) + tail)
  x = jnp.broadcast_to(x, logits_shape[:n_batch] + tail)
  return x.reshape((math.prod(logits_shape[:n_batch]),) + tail)
