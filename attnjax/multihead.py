"""Multi-head attention as a pure function of an explicit parameter pytree.

For bare JAX, Haiku or Equinox code; the Flax modules in ``attnjax.linen`` and
``attnjax.nnx`` hold the same parameters and call these functions. The parameter names and
shapes are those of ``flax.linen.MultiHeadDotProductAttention``, so weights port both ways
as they are::

  {"query": {"kernel": [D, N, H], "bias": [N, H]},
   "key":   {"kernel": [Dkv, K, H], "bias": [K, H]},
   "value": {"kernel": [Dkv, K, H], "bias": [K, H]},
   "out":   {"kernel": [N, H, Dout], "bias": [Dout]}}

Shape letters: T query length, S key/value length, D/Dkv/Dout feature widths, N query heads,
K key/value heads (K = N for multi-head attention), H head dim, M cache length.

References:
  Vaswani et al. 2017, "Attention Is All You Need", section 3.2.2.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array
from jax.typing import ArrayLike, DTypeLike

from attnjax import attention, masks, positional

Params = dict[str, dict[str, Array]]
Initializer = Callable[..., Array]
# Variance scaling over the fan-in and fan-out of the flattened kernel, as flax's DenseGeneral.
default_kernel_init = jax.nn.initializers.lecun_normal()
default_bias_init = jax.nn.initializers.zeros


def init_multi_head_attention(
    rng: Array,
    in_features: int,
    num_heads: int,
    head_dim: int,
    *,
    num_kv_heads: int | None = None,
    kv_features: int | None = None,
    out_features: int | None = None,
    use_bias: bool = True,
    kernel_init: Initializer = default_kernel_init,
    bias_init: Initializer = default_bias_init,
    dtype: DTypeLike = jnp.float32,
) -> Params:
  """Initial parameters for :func:`multi_head_attention`.

  Kernels are initialised like Flax's ``DenseGeneral``: ``kernel_init`` gets the flattened
  2-D shape ``(fan_in, fan_out)`` and the result is reshaped.

  Args:
    rng: a ``jax.random.key``.
    in_features: width D of the queries' inputs.
    num_heads: query heads N.
    head_dim: H.
    num_kv_heads: key/value heads K (a divisor of N); defaults to N.
    kv_features: width of the keys' and values' inputs; defaults to ``in_features``.
    out_features: output width; defaults to ``in_features``.
    use_bias: whether the projections have biases.
    kernel_init, bias_init: initialisers ``(rng, shape, dtype) -> array``.
    dtype: parameter dtype.

  Returns:
    The parameter pytree described in the module docstring.
  """
  num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
  _check_heads(num_heads, num_kv_heads)
  kv_features = in_features if kv_features is None else kv_features
  out_features = in_features if out_features is None else out_features
  shapes = projection_shapes(in_features, kv_features, out_features, num_heads, num_kv_heads,
                             head_dim)
  params = {}
  for rng_i, (name, (kernel_shape, bias_shape, n_in)) in zip(
      jax.random.split(rng, len(shapes)), shapes.items()):
    params[name] = {"kernel": init_kernel(kernel_init, rng_i, kernel_shape, n_in, dtype)}
    if use_bias:
      params[name]["bias"] = bias_init(rng_i, bias_shape, dtype)
  return params


def _check_heads(num_heads: int, num_kv_heads: int) -> None:
  """Raises a ValueError unless ``num_kv_heads`` is positive and divides ``num_heads > 0``."""
  if not num_heads > 0 or not num_kv_heads > 0 or num_heads % num_kv_heads:
    raise ValueError(f"num_heads must be a positive multiple of num_kv_heads > 0, got "
                     f"num_heads={num_heads} and num_kv_heads={num_kv_heads}")


def projection_shapes(in_features, kv_features, out_features, num_heads, num_kv_heads, head_dim):
  """{name: (kernel shape, bias shape, number of input axes of the kernel)}."""
  N, K, H = num_heads, num_kv_heads, head_dim
  return {
      "query": ((in_features, N, H), (N, H), 1),
      "key": ((kv_features, K, H), (K, H), 1),
      "value": ((kv_features, K, H), (K, H), 1),
      "out": ((N, H, out_features), (out_features,), 2),
  }


def init_kernel(init: Initializer, rng: Array, shape: tuple[int, ...], n_in: int,
                dtype: DTypeLike) -> Array:
  """Initialises a kernel of ``shape`` whose first ``n_in`` axes are inputs, as DenseGeneral."""
  flat = (math.prod(shape[:n_in]), math.prod(shape[n_in:]))
  return init(rng, flat, dtype).reshape(shape)


def init_kv_cache(batch_shape: tuple[int, ...], max_length: int, num_kv_heads: int,
                  head_dim: int, dtype: DTypeLike = jnp.float32) -> dict[str, Array]:
  """An empty key/value cache for autoregressive decoding with :func:`multi_head_attention`.

  Returns:
    ``{"key": [..., M, K, H], "value": [..., M, K, H], "index": int32 scalar}``; ``index`` is
    the number of positions filled.

  Raises:
    ValueError: for a negative ``max_length``, ``num_kv_heads`` or ``head_dim``.
  """
  for name, n in (("max_length", max_length), ("num_kv_heads", num_kv_heads),
                  ("head_dim", head_dim)):
    if not jax.export.is_symbolic_dim(n) and (not isinstance(n, (int, np.integer)) or n < 0):
      raise ValueError(f"{name} must be a non-negative int, got {n!r}")
  shape = tuple(batch_shape) + (max_length, num_kv_heads, head_dim)
  return {"key": jnp.zeros(shape, dtype), "value": jnp.zeros(shape, dtype),
          "index": jnp.zeros((), jnp.int32)}


def multi_head_attention(
    params: Params,
    inputs_q: ArrayLike,
    inputs_kv: ArrayLike | None = None,
    *,
    num_heads: int | None = None,
    num_kv_heads: int | None = None,
    mask: ArrayLike | None = None,
    bias: ArrayLike | None = None,
    is_causal: bool = False,
    local_window_size: int | tuple[int, int] | None = None,
    q_segment_ids: ArrayLike | None = None,
    kv_segment_ids: ArrayLike | None = None,
    logits_soft_cap: float | None = None,
    rotary: bool = False,
    rotary_max_timescale: float = 10_000.0,
    query_positions: ArrayLike | None = None,
    key_positions: ArrayLike | None = None,
    cache: dict[str, Array] | None = None,
    dropout_rate: float = 0.0,
    dropout_rng: Array | None = None,
    return_weights: bool = False,
    dtype: DTypeLike | None = None,
    implementation: str | None = None,
) -> Any:
  """Multi-head (or grouped-query) attention with learned projections.

  Projects ``inputs_q`` to queries and ``inputs_kv`` to keys and values, optionally applies
  rotary position embeddings to queries and keys, runs
  :func:`attnjax.dot_product_attention` and projects the concatenated heads to the output.

  Args:
    params: the pytree of :func:`init_multi_head_attention` (or a Flax module's params).
    inputs_q: ``[..., T, D]``.
    inputs_kv: ``[..., S, Dkv]``; ``None`` means self-attention (``inputs_q``).
    num_heads, num_kv_heads: optional checks of N and K; both are read from ``params``.
    mask, bias, is_causal, local_window_size, q_segment_ids, kv_segment_ids,
    logits_soft_cap, dropout_rate, dropout_rng, implementation: as in
      :func:`attnjax.dot_product_attention`.
    rotary: apply rotary position embeddings ("half" layout) to queries and keys.
    rotary_max_timescale: RoPE base.
    query_positions: ``[..., T]`` positions for RoPE, ``arange(T)`` by default (offset by
      the cache index when decoding).
    key_positions: ``[..., S]`` positions for RoPE, ``arange(S)`` by default (with a cache,
      new keys take the positions of the new queries).
    cache: a cache from :func:`init_kv_cache` for autoregressive self-attention: the T new
      keys and values are written at ``cache["index"]`` and each query attends causally to
      the cache up to its own position (``is_causal`` is implied, segment ids are not
      supported). The cache must have room for the T new positions: this is checked when
      the index is concrete; under ``jit`` a write past the end is clamped, not detected.
    return_weights: also return the attention weights ``[..., N, T, S]`` (``S = M`` with a
      cache).
    dtype: computation dtype; defaults to the promotion of inputs and params.

  Returns:
    ``out [..., T, Dout]``, or ``(out, weights)`` with ``return_weights``; with a cache, the
    pair ``(that, new_cache)``.
  """
  q_kernel = params["query"]["kernel"]
  N, H = q_kernel.shape[-2:]
  K = params["key"]["kernel"].shape[-2]
  for name, given, actual in (("num_heads", num_heads, N), ("num_kv_heads", num_kv_heads, K)):
    if given is not None and given != actual:
      raise ValueError(f"{name}={given} does not match the parameters, which have {actual} "
                       f"(query kernel {q_kernel.shape}, key kernel "
                       f"{params['key']['kernel'].shape})")
  x_q = jnp.asarray(inputs_q)
  self_attention = inputs_kv is None
  x_kv = x_q if self_attention else jnp.asarray(inputs_kv)
  if dtype is None:
    dtype = jnp.result_type(x_q, x_kv, q_kernel)
  for name, x, kernel in (("inputs_q", x_q, q_kernel),
                          ("inputs_kv", x_kv, params["key"]["kernel"])):
    if x.ndim < 2 or x.shape[-1] != kernel.shape[0]:
      raise ValueError(f"{name} must have shape [..., length, {kernel.shape[0]}] to match the "
                       f"kernel of shape {kernel.shape}, got {x.shape}")

  query = _project(params["query"], x_q, dtype)
  key = _project(params["key"], x_kv, dtype)
  value = _project(params["value"], x_kv, dtype)

  if cache is not None:
    if not self_attention:
      raise ValueError("a key/value cache is for self-attention: pass inputs_kv=None")
    if q_segment_ids is not None or kv_segment_ids is not None:
      raise ValueError("segment ids are not supported with a key/value cache")
    index = cache["index"]
    T, M = x_q.shape[-2], cache["key"].shape[-3]
    if not isinstance(index, jax.core.Tracer) and int(index) + T > M:
      raise ValueError(f"the key/value cache holds {M} positions: {int(index)} are filled and "
                       f"{T} more do not fit")
    if query_positions is None:
      query_positions = index + jnp.arange(T)
    if rotary:
      key = positional.apply_rotary(key, query_positions, max_timescale=rotary_max_timescale)
    cache = {
        "key": _write(cache["key"], key, index),
        "value": _write(cache["value"], value, index),
        "index": index + T,
    }
    key, value = cache["key"].astype(dtype), cache["value"].astype(dtype)
    q_pos, k_pos = index + jnp.arange(T), jnp.arange(M)
    visible = k_pos[None, :] <= q_pos[:, None]
    if local_window_size is not None:
      left, _ = masks.canonical_window(local_window_size)
      visible &= k_pos[None, :] >= q_pos[:, None] - left
    mask = masks.combine_masks(mask, visible)
    is_causal, local_window_size = False, None
  elif rotary:
    S = x_kv.shape[-2]
    key_positions = jnp.arange(S) if key_positions is None else key_positions
    key = positional.apply_rotary(key, key_positions, max_timescale=rotary_max_timescale)
  if rotary:
    if query_positions is None:
      query_positions = jnp.arange(x_q.shape[-2])
    query = positional.apply_rotary(query, query_positions, max_timescale=rotary_max_timescale)

  result = attention.dot_product_attention(
      query, key, value, bias, mask, is_causal=is_causal, local_window_size=local_window_size,
      q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids,
      logits_soft_cap=logits_soft_cap, dropout_rate=dropout_rate, dropout_rng=dropout_rng,
      return_weights=return_weights, implementation=implementation)
  heads, weights = result if return_weights else (result, None)

  out_params = params["out"]
  out = jnp.einsum("...tnh,nhd->...td", heads, out_params["kernel"].astype(dtype))
  if "bias" in out_params:
    out = out + jnp.broadcast_to(out_params["bias"].astype(dtype), out.shape)
  result = (out, weights) if return_weights else out
  return (result, cache) if cache is not None else result


def _project(p: dict[str, Array], x: Array, dtype: DTypeLike) -> Array:
  """x [..., L, D] -> [..., L, heads, H]."""
  y = jnp.einsum("...ld,dnh->...lnh", x.astype(dtype), p["kernel"].astype(dtype))
  if "bias" in p:
    y = y + jnp.broadcast_to(p["bias"].astype(dtype), y.shape)
  return y


def _write(cached: Array, new: Array, index: Array) -> Array:
  """Writes ``new [..., T, K, H]`` into ``cached [..., M, K, H]`` at position ``index``."""
  if new.shape[:-3] != cached.shape[:-3] or new.shape[-2:] != cached.shape[-2:]:
    raise ValueError(f"inputs of shape {new.shape} (projected) do not fit a cache of shape "
                     f"{cached.shape}")
  # Every start index in the cache index's dtype (Python zeros would be int64 under x64).
  index = jnp.asarray(index)
  zero = jnp.zeros((), index.dtype)
  start = (zero,) * (cached.ndim - 3) + (index, zero, zero)
  return jax.lax.dynamic_update_slice(cached, new.astype(cached.dtype), start)
