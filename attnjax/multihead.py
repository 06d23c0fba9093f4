"""Multi-head attention as a pure function of an explicit parameter pytree.

For bare JAX, Haiku or Equinox code; the Flax modules in ``attnjax.linen`` and
``attnjax.nnx`` hold the same parameters and call these functions. The parameter names and
shapes are those of ``flax.linen.MultiHeadDotProductAttention``, so weights port both ways
as they are::

  {"query":    {"kernel": [D, N, H], "bias": [N, H]},
   "key":      {"kernel": [Dkv, K, H], "bias": [K, H]},
   "value":    {"kernel": [Dv, K, H], "bias": [K, H]},
   "out":      {"kernel": [N, H, Dout], "bias": [Dout]},
   "query_ln": {"scale": [H]},
   "key_ln":   {"scale": [H]},
   "sinks":    [N]}

The biases are there only with ``use_bias``, ``query_ln`` and ``key_ln`` only with QK
normalisation (Flax's ``normalize_qk``: a LayerNorm without bias over the H features of each
projected query and key head), and ``sinks`` only with attention sinks (a learnable logit per
query head that joins each softmax denominator; Flax has none, so it is left out of ported
weights).

Shape letters: T query length, S key/value length, D/Dkv/Dv/Dout feature widths, N query
heads, K key/value heads (K = N for multi-head attention), H head dim, M cache length.

References:
  Vaswani et al. 2017, "Attention Is All You Need", section 3.2.2.
  Dehghani et al. 2023, "Scaling Vision Transformers to 22 Billion Parameters" (QK
  normalisation).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array
from jax.typing import ArrayLike, DTypeLike

from attnjax import attention, masks, positional

Params = dict[str, Any]  # {group: {name: array}}, and "sinks": [N]
Initializer = Callable[..., Array]
# A replacement for attnjax.dot_product_attention; see multi_head_attention's attention_fn.
AttentionFn = Callable[..., Any]
# Variance scaling over the fan-in and fan-out of the flattened kernel, as flax's DenseGeneral.
default_kernel_init = jax.nn.initializers.lecun_normal()
default_bias_init = jax.nn.initializers.zeros
# The parameter groups of QK normalisation, and its epsilon (that of Flax's LayerNorm).
QK_NORM_NAMES = ("query_ln", "key_ln")
LAYER_NORM_EPSILON = 1e-6
# The parameter of learnable attention sinks, a logit per query head [N].
SINKS_NAME = "sinks"
#: Logical axis names of every parameter, in the layout of Params (Flax's logical
#: partitioning: the Linen and NNX modules annotate their parameters with them, and a mesh
#: with a rules table, such as attnjax.toy.sharding.DEFAULT_RULES, maps them to mesh axes).
#: With N and K on one mesh axis, grouped-query heads shard when both are multiples of its
#: size.
PARAM_AXES: dict[str, Any] = {
    "query": {"kernel": ("embed", "heads", "head_dim"), "bias": ("heads", "head_dim")},
    "key": {"kernel": ("embed", "kv_heads", "head_dim"), "bias": ("kv_heads", "head_dim")},
    "value": {"kernel": ("embed", "kv_heads", "head_dim"), "bias": ("kv_heads", "head_dim")},
    "out": {"kernel": ("heads", "head_dim", "embed"), "bias": ("embed",)},
    "query_ln": {"scale": ("head_dim",)},
    "key_ln": {"scale": ("head_dim",)},
    SINKS_NAME: ("heads",),
}
#: Logical axes of the inputs and outputs [batch, length, features] (leading dims unnamed).
ACTIVATION_AXES = ("batch", "length", "embed")


def activation_axes(ndim: int) -> tuple[str | None, ...]:
  """Logical axes of an input or output ``[..., T, D]`` of ``ndim`` dims: the last of
  :data:`ACTIVATION_AXES`, leading dims beyond the batch unnamed."""
  return (None,) * max(ndim - 3, 0) + ACTIVATION_AXES[max(3 - ndim, 0):]


# process_heads(query [..., T, N, H], key [..., S, K, H], query_positions [..., T],
# key_positions [..., S]) -> (query, key): position handling of the projected heads.
ProcessHeads = Callable[[Array, Array, Array, Array], tuple[Array, Array]]


def init_multi_head_attention(
    rng: Array,
    in_features: int,
    num_heads: int,
    head_dim: int,
    *,
    num_kv_heads: int | None = None,
    kv_features: int | None = None,
    v_features: int | None = None,
    out_features: int | None = None,
    use_bias: bool = True,
    normalize_qk: bool = False,
    kernel_init: Initializer = default_kernel_init,
    bias_init: Initializer = default_bias_init,
    out_kernel_init: Initializer | None = None,
    out_bias_init: Initializer | None = None,
    dtype: DTypeLike = jnp.float32,
    sinks: bool = False,
) -> Params:
  """Initial parameters for :func:`multi_head_attention`.

  Kernels and biases are initialised like Flax's ``DenseGeneral``: ``kernel_init`` gets the
  flattened 2-D shape ``(fan_in, fan_out)``, ``bias_init`` the 1-D shape ``(fan_out,)``, and
  the results are reshaped.

  Args:
    rng: a ``jax.random.key``.
    in_features: width D of the queries' inputs.
    num_heads: query heads N.
    head_dim: H.
    num_kv_heads: key/value heads K (a divisor of N); defaults to N.
    kv_features: width of the keys' inputs (and of the values' unless ``v_features`` is
      given); defaults to ``in_features``.
    v_features: width of the values' inputs; defaults to ``kv_features``.
    out_features: output width; defaults to ``in_features``.
    use_bias: whether the projections have biases.
    normalize_qk: add the ``query_ln`` and ``key_ln`` scales (ones) of QK normalisation.
    kernel_init, bias_init: initialisers ``(rng, shape, dtype) -> array``.
    out_kernel_init, out_bias_init: initialisers of the output projection; default to
      ``kernel_init`` and ``bias_init``.
    dtype: parameter dtype.
    sinks: add learnable attention sinks ``sinks [N]``, one logit per query head (zeros).

  Returns:
    The parameter pytree described in the module docstring.
  """
  num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
  _check_heads(num_heads, num_kv_heads)
  kv_features = in_features if kv_features is None else kv_features
  out_features = in_features if out_features is None else out_features
  shapes = projection_shapes(in_features, kv_features, out_features, num_heads, num_kv_heads,
                             head_dim, v_features=v_features)
  params: Params = {}
  for rng_i, (name, (kernel_shape, bias_shape, n_in)) in zip(
      jax.random.split(rng, len(shapes)), shapes.items()):
    k_init, b_init = projection_initializers(name, kernel_init, bias_init, out_kernel_init,
                                             out_bias_init)
    params[name] = {"kernel": init_kernel(k_init, rng_i, kernel_shape, n_in, dtype)}
    if use_bias:
      params[name]["bias"] = init_bias(b_init, rng_i, bias_shape, dtype)
  if normalize_qk:
    for name in QK_NORM_NAMES:
      params[name] = {"scale": jnp.ones((head_dim,), dtype)}
  if sinks:
    params[SINKS_NAME] = jnp.zeros((num_heads,), dtype)
  return params


def _check_heads(num_heads: int, num_kv_heads: int) -> None:
  """Raises a ValueError unless ``num_kv_heads`` is positive and divides ``num_heads > 0``."""
  if not num_heads > 0 or not num_kv_heads > 0 or num_heads % num_kv_heads:
    raise ValueError(f"num_heads must be a positive multiple of num_kv_heads > 0, got "
                     f"num_heads={num_heads} and num_kv_heads={num_kv_heads}")


def projection_shapes(in_features, kv_features, out_features, num_heads, num_kv_heads, head_dim,
                      *, v_features=None):
  """{name: (kernel shape, bias shape, number of input axes of the kernel)}."""
  N, K, H = num_heads, num_kv_heads, head_dim
  v_features = kv_features if v_features is None else v_features
  return {
      "query": ((in_features, N, H), (N, H), 1),
      "key": ((kv_features, K, H), (K, H), 1),
      "value": ((v_features, K, H), (K, H), 1),
      "out": ((N, H, out_features), (out_features,), 2),
  }


def projection_initializers(name: str, kernel_init: Initializer, bias_init: Initializer,
                            out_kernel_init: Initializer | None,
                            out_bias_init: Initializer | None) -> tuple[Initializer, Initializer]:
  """The kernel and bias initialisers of projection ``name``, as Flax chooses them."""
  if name == "out":
    return out_kernel_init or kernel_init, out_bias_init or bias_init
  return kernel_init, bias_init


def init_kernel(init: Initializer, rng: Array, shape: tuple[int, ...], n_in: int,
                dtype: DTypeLike) -> Array:
  """Initialises a kernel of ``shape`` whose first ``n_in`` axes are inputs, as DenseGeneral."""
  flat = (math.prod(shape[:n_in]), math.prod(shape[n_in:]))
  return init(rng, flat, dtype).reshape(shape)


def init_bias(init: Initializer, rng: Array, shape: tuple[int, ...], dtype: DTypeLike) -> Array:
  """Initialises a bias of ``shape`` from its flattened 1-D shape, as DenseGeneral."""
  return init(rng, (math.prod(shape),), dtype).reshape(shape)


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


def resolve_inputs(inputs_q: ArrayLike, inputs_k: ArrayLike | None = None,
                   inputs_v: ArrayLike | None = None,
                   inputs_kv: ArrayLike | None = None) -> tuple[Array, Array, Array]:
  """The query, key and value inputs by Flax's rules.

  ``inputs_k`` defaults to ``inputs_q`` (self-attention) and ``inputs_v`` to ``inputs_k``;
  ``inputs_kv`` is the older spelling of ``inputs_k`` and ``inputs_v`` both.

  Returns:
    ``(x_q [..., T, D], x_k [..., S, Dkv], x_v [..., S, Dv])``.

  Raises:
    ValueError: for ``inputs_kv`` with ``inputs_k`` or ``inputs_v``, ``inputs_v`` without
      ``inputs_k``, or keys and values of different batch dims or lengths.
  """
  if inputs_kv is not None:
    if inputs_k is not None or inputs_v is not None:
      raise ValueError("pass inputs_kv or inputs_k and inputs_v, not both: inputs_kv stands "
                       "for inputs_k and inputs_v")
    inputs_k = inputs_kv
  elif inputs_k is None and inputs_v is not None:
    raise ValueError("inputs_v needs inputs_k (inputs_k=None means self-attention); for keys "
                     "and values from one array, pass it as inputs_k")
  x_q = jnp.asarray(inputs_q)
  x_k = x_q if inputs_k is None else jnp.asarray(inputs_k)
  x_v = x_k if inputs_v is None else jnp.asarray(inputs_v)
  if x_k.shape[:-1] != x_v.shape[:-1]:
    raise ValueError(f"inputs_k and inputs_v must have the same batch dims and length "
                     f"[..., S, features], got shapes {x_k.shape} and {x_v.shape}")
  return x_q, x_k, x_v


def multi_head_attention(
    params: Params,
    inputs_q: ArrayLike,
    inputs_k: ArrayLike | None = None,
    inputs_v: ArrayLike | None = None,
    *,
    inputs_kv: ArrayLike | None = None,
    num_heads: int | None = None,
    num_kv_heads: int | None = None,
    mask: ArrayLike | masks.Mask | None = None,
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
    precision: jax.lax.PrecisionLike = None,
    implementation: attention.Implementation | None = None,
    attention_fn: AttentionFn = attention.dot_product_attention,
    score_mod: Callable | None = None,
    process_heads: ProcessHeads | None = None,
) -> Any:
  """Multi-head (or grouped-query) attention with learned projections.

  Projects ``inputs_q`` to queries, ``inputs_k`` to keys and ``inputs_v`` to values,
  normalises queries and keys if ``params`` has ``query_ln`` and ``key_ln``, applies the
  position handling (``process_heads``, or rotary embeddings with ``rotary``) to them, runs
  ``attention_fn`` (by default :func:`attnjax.dot_product_attention`, with the ``sinks`` of
  ``params`` if it has them) and projects the concatenated heads to the output.

  Args:
    params: the pytree of :func:`init_multi_head_attention` (or a Flax module's params).
    inputs_q: ``[..., T, D]``.
    inputs_k: ``[..., S, Dkv]``; ``None`` means self-attention (``inputs_q``).
    inputs_v: ``[..., S, Dv]``; ``None`` means ``inputs_k``.
    inputs_kv: ``[..., S, Dkv]``, keys' and values' inputs at once; the older spelling of
      ``inputs_k`` (with ``inputs_v=None``), not to be combined with them.
    num_heads, num_kv_heads: optional checks of N and K; both are read from ``params``.
    mask, bias, is_causal, local_window_size, q_segment_ids, kv_segment_ids: as in
      :func:`attnjax.dot_product_attention` (``mask`` a mask object or a bool array; with a
      cache, a mask object's rule is read at the cache's absolute positions, while a bool
      array is ``[..., T, M]`` over the cache).
    score_mod: as in :func:`attnjax.dot_product_attention`; with a cache, ``q_idx`` is the
      query's absolute position (the cache index plus its place in the chunk).
    process_heads: position handling, ``fn(query, key, query_positions, key_positions) ->
      (query, key)`` on the projected (and normalised) heads ``[..., T, N, H]`` and
      ``[..., S, K, H]`` with int positions ``[..., T]`` and ``[..., S]`` (defaults below);
      with a cache it sees each chunk's new keys, at their positions, before they are
      written. ``attnjax.positional.rotary_heads`` is the one ``rotary=True`` uses; a new
      position encoding is one such function.
    logits_soft_cap, dropout_rate, dropout_rng, implementation: as in
      :func:`attnjax.dot_product_attention`.
    rotary: apply rotary position embeddings ("half" layout) to queries and keys (sugar
      for ``process_heads=positional.rotary_heads(rotary_max_timescale)``; not both).
    rotary_max_timescale: RoPE base.
    query_positions: ``[..., T]`` positions for ``process_heads``, ``arange(T)`` by default
      (offset by the cache index when decoding).
    key_positions: ``[..., S]`` positions for ``process_heads``, ``arange(S)`` by default
      (with a cache, new keys take the positions of the new queries).
    cache: a cache from :func:`init_kv_cache` for autoregressive self-attention: the T new
      keys and values are written at ``cache["index"]`` and each query attends causally to
      the cache up to its own position (``is_causal`` is implied, segment ids are not
      supported). The cache must have room for the T new positions: this is checked when
      the index is concrete (a ValueError); under ``jit``, where it cannot raise, a call that
      overruns the cache returns all-NaN outputs (and weights), so a decoding loop that runs
      too long cannot go unnoticed.
    return_weights: also return the attention weights ``[..., N, T, S]`` (``S = M`` with a
      cache).
    dtype: computation dtype; defaults to the promotion of inputs and params.
    precision: ``jax.lax.Precision`` of the projections' einsums, also passed to
      ``attention_fn`` (see :func:`attnjax.dot_product_attention`).
    attention_fn: replaces :func:`attnjax.dot_product_attention` (Flax's ``attention_fn``).
      It is called as ``attention_fn(query, key, value, **options)`` with ``query
      [..., T, N, H]`` and ``key``, ``value`` ``[..., S, K, H]`` (normalised, rotated, and
      read from the cache when decoding), and returns ``out [..., T, N, H]``, or ``(out,
      weights [..., N, T, S])`` when ``return_weights=True``. ``options`` are ``bias``,
      ``mask``, ``is_causal``, ``local_window_size``, ``q_segment_ids``,
      ``kv_segment_ids``, ``logits_soft_cap``, ``dropout_rate``, ``dropout_rng``,
      ``return_weights``, ``implementation``, ``precision``, ``score_mod`` and ``sinks``,
      with the meanings of
      :func:`attnjax.dot_product_attention` (with a cache, the causal and window masks are
      folded into ``mask``). A callable with ``**kwargs`` gets them all; otherwise only
      those its signature names, and one it does not name must hold its neutral value
      (``None``, ``False`` or a zero ``dropout_rate``), so that Flax-style functions such
      as ``fn(query, key, value, mask=None, dropout_rng=None, dropout_rate=0.0,
      precision=None)`` work as they are.

  Returns:
    ``out [..., T, Dout]``, or ``(out, weights)`` with ``return_weights``; with a cache, the
    pair ``(that, new_cache)``.

  Raises:
    ValueError: for inputs whose widths do not match the kernels, head counts that do not
      match ``num_heads``/``num_kv_heads``, a misuse of the cache or of the input arguments
      (see :func:`resolve_inputs`).
    TypeError: if ``attention_fn`` does not take an option that is not neutral.
  """
  q_kernel = params["query"]["kernel"]
  N, H = q_kernel.shape[-2:]
  K = params["key"]["kernel"].shape[-2]
  for name, given, actual in (("num_heads", num_heads, N), ("num_kv_heads", num_kv_heads, K)):
    if given is not None and given != actual:
      raise ValueError(f"{name}={given} does not match the parameters, which have {actual} "
                       f"(query kernel {q_kernel.shape}, key kernel "
                       f"{params['key']['kernel'].shape})")
  self_attention = inputs_k is None and inputs_v is None and inputs_kv is None
  x_q, x_k, x_v = resolve_inputs(inputs_q, inputs_k, inputs_v, inputs_kv)
  if dtype is None:
    dtype = jnp.result_type(x_q, x_k, x_v, q_kernel)
  k_name = "inputs_k" if inputs_kv is None else "inputs_kv"
  for name, x, kernel in (("inputs_q", x_q, q_kernel), (k_name, x_k, params["key"]["kernel"]),
                          ("inputs_v", x_v, params["value"]["kernel"])):
    if x.ndim < 2 or x.shape[-1] != kernel.shape[0]:
      raise ValueError(f"{name} must have shape [..., length, {kernel.shape[0]}] to match the "
                       f"kernel of shape {kernel.shape}, got {x.shape}")

  query = _project(params["query"], x_q, dtype, precision)
  key = _project(params["key"], x_k, dtype, precision)
  value = _project(params["value"], x_v, dtype, precision)
  normalize = [name in params for name in QK_NORM_NAMES]
  if any(normalize):
    if not all(normalize):
      raise ValueError(f"QK normalisation needs both {QK_NORM_NAMES} in params, got "
                       f"{sorted(params)}")
    query = _layer_norm(query, params["query_ln"]["scale"], dtype)
    key = _layer_norm(key, params["key_ln"]["scale"], dtype)

  if rotary:
    if process_heads is not None:
      raise ValueError("pass either rotary=True or process_heads, not both")
    process_heads = positional.rotary_heads(rotary_max_timescale)

  if cache is not None:
    if not self_attention:
      raise ValueError("a key/value cache is for self-attention: pass no inputs_k, inputs_v "
                       "or inputs_kv")
    if q_segment_ids is not None or kv_segment_ids is not None:
      raise ValueError("segment ids are not supported with a key/value cache")
    index = cache["index"]
    T, M = x_q.shape[-2], cache["key"].shape[-3]
    if not isinstance(index, jax.core.Tracer) and int(index) + T > M:
      raise ValueError(f"the key/value cache holds {M} positions: {int(index)} are filled and "
                       f"{T} more do not fit")
    overrun = index + T > M  # Traced under jit: the outputs are poisoned below.
    if query_positions is None:
      query_positions = index + jnp.arange(T)
    if process_heads is not None:
      positions = jnp.asarray(query_positions)
      query, key = process_heads(query, key, positions, positions)
    cache = {
        "key": _write(cache["key"], key, index),
        "value": _write(cache["value"], value, index),
        "index": index + T,
    }
    key, value = cache["key"].astype(dtype), cache["value"].astype(dtype)
    mask, score_mod = _at_cache_positions(mask, score_mod, local_window_size, index,
                                          x_q.shape[:-2], N, M)
    if attention_fn is not attention.dot_product_attention:
      mask = _dense_mask(mask, x_q.shape[:-2], N, T, M)  # What Flax-style functions take.
    is_causal, local_window_size = False, None
  elif process_heads is not None:
    if query_positions is None:
      query_positions = jnp.arange(x_q.shape[-2])
    if key_positions is None:
      key_positions = jnp.arange(x_k.shape[-2])
    query, key = process_heads(query, key, jnp.asarray(query_positions),
                               jnp.asarray(key_positions))

  result = call_attention_fn(
      attention_fn, query, key, value, bias=bias, mask=mask, is_causal=is_causal,
      local_window_size=local_window_size, q_segment_ids=q_segment_ids,
      kv_segment_ids=kv_segment_ids, logits_soft_cap=logits_soft_cap,
      dropout_rate=dropout_rate, dropout_rng=dropout_rng, return_weights=return_weights,
      implementation=implementation, precision=precision, score_mod=score_mod,
      sinks=params.get(SINKS_NAME))
  heads, weights = result if return_weights else (result, None)

  out_params = params["out"]
  out = jnp.einsum("...tnh,nhd->...td", heads, out_params["kernel"].astype(dtype),
                   precision=precision)
  if "bias" in out_params:
    out = out + jnp.broadcast_to(out_params["bias"].astype(dtype), out.shape)
  if cache is not None:  # A write past the end was clamped: make the wrong answer NaN.
    out = jnp.where(overrun, jnp.nan, out)
    weights = None if weights is None else jnp.where(overrun, jnp.nan, weights)
  result = (out, weights) if return_weights else out
  return (result, cache) if cache is not None else result


def _at_cache_positions(mask: Any, score_mod: Callable | None,
                        local_window_size: int | tuple[int, int] | None, index: Array,
                        batch_shape: tuple[int, ...], N: int,
                        M: int) -> tuple[masks.Mask, Callable | None]:
  """The mask and score modifier of a chunk of queries that starts at ``index`` in a cache of
  M positions: the causal rule, the window and a mask object are read at the queries'
  absolute positions (a bool array mask is already over the cache), as is ``score_mod``."""
  rule: masks.Mask = masks.Causal()
  if local_window_size is not None:  # The right side is hidden by causality anyway.
    rule = rule & masks.LocalWindow(min(masks.canonical_window(local_window_size)[0], M), 0)
  if isinstance(mask, masks.Mask):
    rule, mask = rule & mask, None
  rule = rule.canonical(batch_shape, N, M, M)  # Positions run over the whole cache.

  def shifted(batch, head, q_idx, kv_idx):
    return rule(batch, head, q_idx + index, kv_idx)
  at_positions: masks.Mask = masks.MaskFn(shifted)
  if mask is not None:
    at_positions = at_positions & masks.as_mask(mask)
  if score_mod is not None:
    mod = score_mod

    def score_mod(score, batch, head, q_idx, kv_idx):
      return mod(score, batch, head, q_idx + index, kv_idx)
  return at_positions, score_mod


def _dense_mask(mask: masks.Mask, batch_shape: tuple[int, ...], N: int, T: int,
                M: int) -> Array:
  """A mask object as a bool array ``[..., N|1, T, M]``, without leading dims of size 1."""
  B = math.prod(batch_shape)
  index = [jnp.arange(n, dtype=jnp.int32).reshape([n if a == axis else 1 for a in range(4)])
           for axis, n in enumerate((B, N, T, M))]
  visible = mask.canonical(batch_shape, N, T, M)(*index)
  visible = visible.reshape((1,) * (4 - visible.ndim) + visible.shape)
  if visible.shape[0] > 1:
    return visible.reshape(tuple(batch_shape) + visible.shape[1:])
  visible = visible[0]
  while visible.ndim > 2 and visible.shape[0] == 1:
    visible = visible[0]
  return visible


def call_attention_fn(attention_fn: AttentionFn, query: Array, key: Array, value: Array,
                      **options: Any) -> Any:
  """``attention_fn(query, key, value, **options)``, with the options its signature takes.

  An option that ``attention_fn`` does not take (and cannot take as ``**kwargs``) is left
  out if it holds its neutral value (``None``, ``False``, a zero ``dropout_rate``).

  Raises:
    TypeError: if ``attention_fn`` does not take an option that is not neutral.
  """
  try:
    parameters = inspect.signature(attention_fn).parameters
  except (TypeError, ValueError):  # No signature to read: pass everything.
    return attention_fn(query, key, value, **options)
  if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
    return attention_fn(query, key, value, **options)
  taken = {}
  for name, value_ in options.items():
    if name in parameters:
      taken[name] = value_
    elif not (value_ is None or value_ is False or (name == "dropout_rate" and value_ == 0)):
      shown = (f"an array of shape {value_.shape}" if hasattr(value_, "shape")
               else repr(value_))
      raise TypeError(f"attention_fn {getattr(attention_fn, '__name__', attention_fn)!r} "
                      f"does not take {name}, which is {shown} here")
  return attention_fn(query, key, value, **taken)


def _project(p: dict[str, Array], x: Array, dtype: DTypeLike,
             precision: jax.lax.PrecisionLike) -> Array:
  """x [..., L, D] -> [..., L, heads, H]."""
  y = jnp.einsum("...ld,dnh->...lnh", x.astype(dtype), p["kernel"].astype(dtype),
                 precision=precision)
  if "bias" in p:
    y = y + jnp.broadcast_to(p["bias"].astype(dtype), y.shape)
  return y


def _layer_norm(x: Array, scale: Array, dtype: DTypeLike) -> Array:
  """LayerNorm without bias over the last axis, as Flax's ``LayerNorm(use_bias=False)``.

  The statistics are float32 or wider (``E[x^2] - E[x]^2``, clipped at 0, as Flax's default
  fast variance); the result is cast to ``dtype``.
  """
  x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  mean = jnp.mean(x, axis=-1, keepdims=True)
  var = jnp.maximum(0.0, jnp.mean(x * x, axis=-1, keepdims=True) - mean * mean)
  inv = jax.lax.rsqrt(var + LAYER_NORM_EPSILON)
  return ((x - mean) * (inv * jnp.broadcast_to(scale, inv.shape[:-1] + scale.shape))).astype(dtype)


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
