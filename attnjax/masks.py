"""Boolean attention masks.

Every mask here is a bool array with True meaning "this query may attend to this key",
broadcastable to the logits' shape ``[..., N, T, S]`` (N heads, T queries, S keys).
Masks of different origin combine with logical AND (:func:`combine_masks`).
"""

from __future__ import annotations

import functools

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
  left, right = canonical_window(window)
  diff = jnp.arange(kv_len)[None, :] - jnp.arange(q_len)[:, None]
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
  masks = [_as_bool(f"masks[{i}]", m) for i, m in enumerate(masks) if m is not None]
  if not masks:
    return None
  try:
    shape = jnp.broadcast_shapes(*(m.shape for m in masks))
  except ValueError:
    shapes = ", ".join(str(m.shape) for m in masks)
    raise ValueError(f"combine_masks: masks do not broadcast together, got shapes "
                     f"{shapes}") from None
  # Broadcast explicitly, so that masks of different ranks combine under strict rank promotion.
  return functools.reduce(jnp.logical_and, [jnp.broadcast_to(m, shape) for m in masks])


def canonical_window(window: int | tuple[int, int]) -> tuple[int, int]:
  """``window`` as a ``(left, right)`` pair of non-negative Python ints.

  Concrete integer scalars (NumPy or JAX) are accepted; traced ones are refused.
  """
  if isinstance(window, jax.core.Tracer) or (
      isinstance(window, (tuple, list)) and any(isinstance(w, jax.core.Tracer) for w in window)):
    raise ValueError(f"local_window_size must be static (Python ints), got a traced value "
                     f"{window!r}; pass it outside jit or as a static argument")

  def as_int(w):  # A concrete integer array scalar as an int; anything else as it is.
    integer_scalar = (isinstance(w, (np.ndarray, jax.Array)) and w.ndim == 0
                      and jnp.issubdtype(w.dtype, jnp.integer))
    return int(w) if integer_scalar else w

  scalar = isinstance(window, (int, float, np.number)) or getattr(window, "ndim", None) == 0
  pair = (window, window) if scalar else tuple(window)
  pair = tuple(as_int(w) for w in pair)
  if len(pair) != 2 or not all(isinstance(w, (int, np.integer)) for w in pair):
    raise ValueError(f"local_window_size must be an int or a (left, right) pair of ints, "
                     f"got {window!r}")
  if min(pair) < 0:
    raise ValueError(f"local_window_size must be non-negative, got {window!r}")
  return int(pair[0]), int(pair[1])


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
