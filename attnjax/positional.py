"""Position encodings: sinusoidal (absolute), rotary (RoPE) and randomized position ids.

Shapes: positions ``[..., L]``; encodings ``[..., L, D]``; rotary inputs ``[..., L, N, H]``
(L positions, N heads, H head dim).

References:
  Vaswani et al. 2017, "Attention Is All You Need", section 3.5.
  Su et al. 2021, "RoFormer: Enhanced Transformer with Rotary Position Embedding".
  Ruoss et al. 2023, "Randomized Positional Encodings Boost Length Generalization of
  Transformers", ACL 2023.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array
from jax.typing import ArrayLike, DTypeLike

SINUSOIDAL_LAYOUTS = ("interleaved", "concat")
ROTARY_LAYOUTS = ("half", "interleaved")


def sinusoidal_position_encoding(
    positions_or_length: int | ArrayLike,
    dim: int,
    *,
    max_timescale: float = 10_000.0,
    layout: str = "interleaved",
    dtype: DTypeLike = jnp.float32,
) -> Array:
  """Fixed sinusoidal position encodings.

  ``"interleaved"`` is the paper's layout: ``PE[p, 2i] = sin(p / max_timescale^(2i/dim))`` and
  ``PE[p, 2i+1] = cos(p / max_timescale^(2i/dim))``. ``"concat"`` is the tensor2tensor / Flax
  examples layout: all ``dim/2`` sines, then all cosines, with timescales spaced
  geometrically from 1 to ``max_timescale`` over ``dim/2 - 1`` steps, i.e. frequency i is
  ``max_timescale^(-i / (dim/2 - 1))``.

  Args:
    positions_or_length: an int L for positions ``0..L-1``, or an int or float array of
      positions ``[..., L]`` (for packed sequences, decoding offsets, randomized positions).
    dim: encoding width D, even.
    max_timescale: longest wavelength, over ``2 pi``.
    layout: ``"interleaved"`` or ``"concat"``.
    dtype: output dtype.

  Returns:
    ``[L, dim]`` for an int, ``[..., L, dim]`` for positions ``[..., L]``.

  Raises:
    ValueError: for an odd or non-positive ``dim``, an unknown layout, scalar positions or a
      non-positive ``max_timescale``.
  """
  if not isinstance(dim, (int, np.integer)) or dim <= 0 or dim % 2:
    raise ValueError(f"dim must be a positive even int, got {dim!r}")
  dim = int(dim)
  if layout not in SINUSOIDAL_LAYOUTS:
    raise ValueError(f"layout must be one of {SINUSOIDAL_LAYOUTS}, got {layout!r}")
  _check_max_timescale(max_timescale)
  positions = _positions("positions_or_length", positions_or_length)
  half = dim // 2
  i = jnp.arange(half, dtype=jnp.float32)
  if layout == "interleaved":
    inv_timescales = max_timescale ** (-2.0 * i / dim)
  else:
    inv_timescales = max_timescale ** (-i / max(half - 1, 1))
  angles = positions[..., None] * _lead(inv_timescales, positions.ndim)  # [..., L, D/2]
  if layout == "interleaved":
    pe = jnp.stack([jnp.sin(angles), jnp.cos(angles)], axis=-1).reshape(*angles.shape[:-1], dim)
  else:
    pe = jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)
  return pe.astype(dtype)


def apply_rotary(
    x: ArrayLike,
    positions: ArrayLike,
    *,
    max_timescale: float = 10_000.0,
    layout: str = "half",
) -> Array:
  """Rotary position embedding: rotates feature pairs of ``x`` by position-dependent angles.

  Pair i (of H/2) turns by ``positions * max_timescale^(-2i/H)``, ``(a, b) -> (a cos - b sin,
  a sin + b cos)``. Applied to queries and keys, it makes their dot product depend on the
  positions only through their difference. ``"half"`` pairs ``x[..., i]`` with
  ``x[..., i + H/2]`` (GPT-NeoX, Hugging Face, Flax's Gemma); ``"interleaved"`` pairs
  ``x[..., 2i]`` with ``x[..., 2i+1]`` (the original RoFormer code).

  Args:
    x: ``[..., L, N, H]`` with H even.
    positions: int or float ``[..., L]``, broadcastable to ``x.shape[:-2]``.
    max_timescale: base of the frequencies (``theta`` = 10000 in the paper).
    layout: ``"half"`` or ``"interleaved"``.

  Returns:
    ``[..., L, N, H]`` in the dtype of ``x`` (computed in float32).

  Raises:
    TypeError: for an ``x`` that is not floating point.
    ValueError: for an odd head dim, an unknown layout, positions that do not match ``x``, or
      a non-positive ``max_timescale``.
  """
  x = jnp.asarray(x)
  if x.ndim < 3:
    raise ValueError(f"x must have shape [..., length, heads, head_dim], got {x.shape}")
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f"x must be floating point (the rotation would be truncated), got dtype "
                    f"{x.dtype}")
  _check_max_timescale(max_timescale)
  H = x.shape[-1]
  if H % 2:
    raise ValueError(f"apply_rotary needs an even head dim, got x of shape {x.shape}")
  if layout not in ROTARY_LAYOUTS:
    raise ValueError(f"layout must be one of {ROTARY_LAYOUTS}, got {layout!r}")
  positions = _positions("positions", positions)
  if positions.ndim > x.ndim - 2 or positions.shape[-1] != x.shape[-3] or any(
      p not in (1, d) for p, d in zip(positions.shape[::-1], x.shape[-3::-1])):
    raise ValueError(f"positions of shape {positions.shape} must broadcast to x.shape[:-2] = "
                     f"{x.shape[:-2]} (x of shape {x.shape})")
  inv_timescales = max_timescale ** (-2.0 * jnp.arange(H // 2, dtype=jnp.float32) / H)
  positions = _lead(positions, x.ndim - 2 - positions.ndim)  # Same rank as x.shape[:-2].
  angles = positions[..., None, None] * _lead(inv_timescales, x.ndim - 1)  # [..., L, 1, H/2]
  sin, cos = jnp.sin(angles), jnp.cos(angles)
  xf = x.astype(jnp.float32)
  if layout == "half":
    a, b = xf[..., : H // 2], xf[..., H // 2 :]
    out = jnp.concatenate([a * cos - b * sin, a * sin + b * cos], axis=-1)
  else:
    a, b = xf[..., 0::2], xf[..., 1::2]
    out = jnp.stack([a * cos - b * sin, a * sin + b * cos], axis=-1).reshape(xf.shape)
  return out.astype(x.dtype)


def rotary_heads(max_timescale: float = 10_000.0, layout: str = "half"):
  """Rotary embeddings as a ``process_heads`` hook of :func:`attnjax.multi_head_attention`.

  Args:
    max_timescale: the RoPE base.
    layout: ``"half"`` or ``"interleaved"``, as in :func:`apply_rotary`.

  Returns:
    ``fn(query, key, query_positions, key_positions) -> (query, key)`` that rotates each
    query and key head by its position.
  """
  _check_max_timescale(max_timescale)

  def process_heads(query, key, query_positions, key_positions):
    rotate = functools.partial(apply_rotary, max_timescale=max_timescale, layout=layout)
    return rotate(query, query_positions), rotate(key, key_positions)
  return process_heads


def randomized_positions(
    key: Array,
    batch: int,
    length: int,
    max_position: int,
    *,
    lengths: ArrayLike | None = None,
) -> Array:
  """Randomized position ids: per sequence, a sorted sample of distinct positions.

  Row b is a uniformly drawn subset of ``length`` distinct positions of ``[0, max_position)``
  in increasing order, to use in place of ``0..length-1`` with any encoding that reads
  position ids (sinusoidal, learned, rotary). Trained on such ids, a model has seen every
  position up to ``max_position`` while its sequences stay short, and only the order of
  the positions carries information. One draw serves a whole sequence (its input and its
  output, every step of decoding).

  With ``lengths``, row b draws only ``lengths[b]`` positions (a uniform subset of that
  size, sorted) and its entries from ``lengths[b]`` on, padding, hold ``max_position - 1``:
  every row stays non-decreasing and within range.

  Args:
    key: a ``jax.random.key``.
    batch: number of rows B.
    length: positions per row L, at most ``max_position``.
    max_position: the exclusive upper bound of the positions (the paper's L).
    lengths: optional int ``[B]``: the number of real tokens of each row, at most L.

  Returns:
    int32 ``[B, L]``.

  Raises:
    ValueError: for a negative ``length``, ``length > max_position``, or ``lengths`` not
      of shape ``[B]``.

  References:
    Ruoss et al. 2023, "Randomized Positional Encodings Boost Length Generalization of
    Transformers", ACL 2023, section 3.
  """
  for name, value in (("batch", batch), ("length", length), ("max_position", max_position)):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
      raise ValueError(f"{name} must be a non-negative int, got {value!r}")
  if length > max_position:
    raise ValueError(f"length={length} distinct positions do not fit below "
                     f"max_position={max_position}")
  # The first L entries of a random permutation of [0, max_position): a uniform subset
  # (and the first n of them a uniform subset of size n).
  scores_BP = jax.random.uniform(key, (batch, max_position))
  subset_BL = jax.lax.top_k(scores_BP, length)[1].astype(jnp.int32)
  if lengths is None:
    return jnp.sort(subset_BL, axis=-1)
  lengths = jnp.asarray(lengths)
  if lengths.shape != (batch,):
    raise ValueError(f"lengths must have shape [batch] = ({batch},), got {lengths.shape}")
  real_BL = jnp.arange(length, dtype=jnp.int32)[None, :] < lengths[:, None]
  return jnp.sort(jnp.where(real_BL, subset_BL, max_position - 1), axis=-1)


def _lead(x: Array, n: int) -> Array:
  """``x`` with ``n`` leading dims of size 1: explicit rank promotion."""
  return x.reshape((1,) * n + x.shape)


def _check_max_timescale(max_timescale: float) -> None:
  if not isinstance(max_timescale, jax.core.Tracer) and not max_timescale > 0:
    raise ValueError(f"max_timescale must be positive, got {max_timescale!r}")


def _positions(name: str, positions: int | ArrayLike) -> Array:
  """Positions as a float32 array [..., L]; an int L means 0..L-1."""
  if isinstance(positions, (int, np.integer)):
    if positions < 0:
      raise ValueError(f"{name} must be a non-negative length or an array, got {positions}")
    return jnp.arange(int(positions), dtype=jnp.float32)
  positions = jnp.asarray(positions)
  if positions.ndim < 1:
    raise ValueError(f"{name} must be an int length or an array [..., L], got shape "
                     f"{positions.shape}")
  if not (jnp.issubdtype(positions.dtype, jnp.integer)
          or jnp.issubdtype(positions.dtype, jnp.floating)):
    raise TypeError(f"{name} must be int or float, got dtype {positions.dtype}")
  return positions.astype(jnp.float32)
