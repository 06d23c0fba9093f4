"""Flax Linen modules over the attnjax core.

The modules only create parameters and variables and call the pure functions of
:mod:`attnjax.multihead` and :mod:`attnjax.positional`. ``MultiHeadAttention`` holds the
parameters of ``flax.linen.MultiHeadDotProductAttention`` under the same names and shapes
(``query``/``key``/``value`` kernels ``[D, N, H]`` and biases ``[N, H]``, ``out`` kernel
``[N, H, D]`` and bias ``[D]``, and with ``normalize_qk`` the ``query_ln``/``key_ln``
``scale`` ``[H]``), so its weights port both ways unchanged. It takes Flax's options under
Flax's names (``normalize_qk``, ``out_kernel_init``, ``out_bias_init``, ``precision``,
``attention_fn``; ``inputs_k``, ``inputs_v`` and ``dropout_rng`` at call time), so it can
stand in for Flax's module.

Sharding: the parameters carry the logical axis names of
:data:`attnjax.multihead.PARAM_AXES` (:func:`with_logical_axes`), and the output is
constrained to :data:`attnjax.multihead.ACTIVATION_AXES`. Under a rules table
(``nn.logical_axis_rules``) ``init`` returns the parameters boxed as
``flax.linen.LogicallyPartitioned`` (``nn.get_partition_spec`` and
``nn.logical_to_mesh_sharding`` read them; ``nn.unbox`` gives the arrays; ``apply`` takes
either), and under a mesh as well (``jax.set_mesh``) the output is constrained; without
rules and mesh the parameters and outputs are exactly Flax's.

Shapes: inputs ``[..., T, D]``; attention weights ``[..., N, T, S]``; rotary inputs
``[..., L, N, H]``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import Array
from jax.typing import ArrayLike

from attnjax import attention, masks, multihead, positional

Dtype = Any


def with_logical_axes(init: multihead.Initializer,
                      names: tuple[str | None, ...]) -> multihead.Initializer:
  """``init`` annotated with logical axis ``names`` while logical axis rules are set.

  Under ``nn.logical_axis_rules(...)`` the parameter is created boxed, as by
  ``nn.with_logical_partitioning(init, names)``, so that ``nn.get_partition_spec`` reads its
  axes; without rules it is a plain array, as Flax's own modules create it.

  Args:
    init: an initialiser ``init(rng, shape, dtype)``.
    names: a logical axis name (or None) per dim of the parameter.

  Returns:
    The annotated initialiser.
  """
  boxed = nn.with_logical_partitioning(init, names)

  def annotated(*args, **kwargs):
    return (boxed if nn.get_logical_axis_rules() else init)(*args, **kwargs)
  return annotated


class _Projection(nn.Module):
  """Holds one projection's ``kernel`` and ``bias`` and returns them as a dict."""
  kernel_shape: tuple[int, ...]
  bias_shape: tuple[int, ...]
  num_input_axes: int
  use_bias: bool
  kernel_init: multihead.Initializer
  bias_init: multihead.Initializer
  param_dtype: Dtype
  axes: dict[str, tuple[str, ...]]  # Logical axes of "kernel" and "bias".

  @nn.compact
  def __call__(self) -> dict[str, Array]:
    def kernel_init(rng, shape, dtype):
      return multihead.init_kernel(self.kernel_init, rng, shape, self.num_input_axes, dtype)

    def bias_init(rng, shape, dtype):
      return multihead.init_bias(self.bias_init, rng, shape, dtype)

    p = {"kernel": self.param(
        "kernel", with_logical_axes(kernel_init, self.axes["kernel"]),
        self.kernel_shape, self.param_dtype)}
    if self.use_bias:
      p["bias"] = self.param(
          "bias", with_logical_axes(bias_init, self.axes["bias"]), self.bias_shape,
          self.param_dtype)
    return p


class _LayerNormScale(nn.Module):
  """Holds the ``scale [features]`` of a LayerNorm without bias (Flax's initial ones)."""
  features: int
  param_dtype: Dtype

  @nn.compact
  def __call__(self) -> dict[str, Array]:
    init = with_logical_axes(nn.initializers.ones,
                                        multihead.PARAM_AXES["query_ln"]["scale"])
    return {"scale": self.param("scale", init, (self.features,), self.param_dtype)}


class MultiHeadAttention(nn.Module):
  """Multi-head, grouped-query or multi-query attention; self- or cross-attention.

  With ``decode=True`` the module keeps a key/value cache in the ``"cache"`` collection
  (``cached_key``, ``cached_value`` ``[..., M, K, H]`` and ``cache_index``): ``init`` with a
  full-length input sizes the cache to M positions; then each call with a chunk of T tokens
  writes its keys and values at ``cache_index``, attends causally to the cache and advances
  the index (apply with ``mutable=["cache"]``).

  Attributes:
    num_heads: query heads N.
    num_kv_heads: key/value heads K, a divisor of N; defaults to N.
    head_dim: H; defaults to the input width over ``num_heads``.
    out_features: output width; defaults to the query input width.
    use_bias: whether the projections have biases.
    dropout_rate: dropout on the attention weights (needs the ``"dropout"`` rng).
    deterministic: disables dropout; may also be given at call time.
    dtype: computation dtype; defaults to the promotion of inputs and parameters.
    param_dtype: parameter dtype.
    kernel_init: initialiser of the kernels, as Flax's ``DenseGeneral``.
    bias_init: initialiser of the biases.
    logits_soft_cap: soft cap of the logits, ``cap * tanh(logits / cap)``.
    rotary: apply rotary position embeddings to queries and keys.
    rotary_max_timescale: RoPE base.
    decode: autoregressive decoding with a key/value cache (self-attention only).
    implementation: passed to :func:`attnjax.dot_product_attention`.
    out_kernel_init, out_bias_init: initialisers of the output projection; default to
      ``kernel_init`` and ``bias_init`` (Flax's).
    normalize_qk: QK normalisation (Flax's): a LayerNorm without bias, parameters
      ``query_ln`` and ``key_ln`` with ``scale [H]``, over each projected query and key head.
    precision: ``jax.lax.Precision`` of the projections and of ``attention_fn`` (Flax's).
    attention_fn: replaces :func:`attnjax.dot_product_attention` (Flax's ``attention_fn``);
      the arguments it gets are those described in :func:`attnjax.multi_head_attention`.
    sinks: learnable attention sinks: a parameter ``sinks [N]`` (zeros at init), one logit
      per query head that joins each softmax denominator.
    score_mod: a score modifier (see :func:`attnjax.dot_product_attention`), e.g. from
      :mod:`attnjax.score_mods`; one with learnable arrays is better built in the caller's
      module from its own parameters and passed at call time.
    process_heads: position handling of the projected heads, as in
      :func:`attnjax.multi_head_attention` (``rotary=True`` is one such hook).
  """
  num_heads: int
  num_kv_heads: int | None = None
  head_dim: int | None = None
  out_features: int | None = None
  use_bias: bool = True
  dropout_rate: float = 0.0
  deterministic: bool | None = None
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32
  kernel_init: multihead.Initializer = multihead.default_kernel_init
  bias_init: multihead.Initializer = multihead.default_bias_init
  logits_soft_cap: float | None = None
  rotary: bool = False
  rotary_max_timescale: float = 10_000.0
  decode: bool = False
  implementation: attention.Implementation | None = None
  out_kernel_init: multihead.Initializer | None = None
  out_bias_init: multihead.Initializer | None = None
  normalize_qk: bool = False
  precision: jax.lax.PrecisionLike = None
  attention_fn: multihead.AttentionFn = attention.dot_product_attention
  sinks: bool = False
  score_mod: Callable | None = None
  process_heads: multihead.ProcessHeads | None = None

  @nn.compact
  def __call__(
      self,
      inputs_q: ArrayLike,
      inputs_k: ArrayLike | None = None,
      inputs_v: ArrayLike | None = None,
      *,
      inputs_kv: ArrayLike | None = None,
      mask: ArrayLike | masks.Mask | None = None,
      bias: ArrayLike | None = None,
      is_causal: bool = False,
      q_segment_ids: ArrayLike | None = None,
      kv_segment_ids: ArrayLike | None = None,
      local_window_size: int | tuple[int, int] | None = None,
      query_positions: ArrayLike | None = None,
      key_positions: ArrayLike | None = None,
      deterministic: bool | None = None,
      dropout_rng: Array | None = None,
      sow_weights: bool = False,
      score_mod: Callable | None = None,
  ) -> Array:
    """Attends from ``inputs_q [..., T, D]`` to ``inputs_k [..., S, Dkv]`` (default: itself).

    Args:
      inputs_q: ``[..., T, D]``.
      inputs_k: ``[..., S, Dkv]``; defaults to ``inputs_q`` (self-attention), as in Flax.
      inputs_v: ``[..., S, Dv]``; defaults to ``inputs_k``.
      inputs_kv: the older spelling of ``inputs_k`` and ``inputs_v`` both.
      mask, bias, is_causal, q_segment_ids, kv_segment_ids: as in
        :func:`attnjax.multi_head_attention`.
      local_window_size, query_positions, key_positions: as in
        :func:`attnjax.multi_head_attention`.
      deterministic: disables dropout; merged with the module's ``deterministic``.
      dropout_rng: a ``jax.random.key`` for dropout; defaults to the ``"dropout"`` rng.
      sow_weights: sow the attention weights ``[..., N, T, S]`` into the
        ``"intermediates"`` collection as ``"attention_weights"``.
      score_mod: a score modifier for this call, in place of the module's.

    Returns:
      ``[..., T, out_features]``.

    Raises:
      ValueError: for inputs that do not fit the parameters or each other (see
        :func:`attnjax.multi_head_attention`), key/value inputs with ``decode=True``, if
        ``num_kv_heads`` does not divide ``num_heads`` or ``dropout_rate`` is not in [0, 1).
    """
    x_q, x_k, x_v = multihead.resolve_inputs(inputs_q, inputs_k, inputs_v, inputs_kv)
    N = self.num_heads
    K = N if self.num_kv_heads is None else self.num_kv_heads
    _check_options(N, K, self.dropout_rate)
    H = _head_dim(self.head_dim, x_q.shape[-1], N)
    shapes = multihead.projection_shapes(
        x_q.shape[-1], x_k.shape[-1], self.out_features or x_q.shape[-1], N, K, H,
        v_features=x_v.shape[-1])
    params: dict[str, Any] = {
        name: _Projection(kernel_shape, bias_shape, n_in, self.use_bias,
                          *multihead.projection_initializers(
                              name, self.kernel_init, self.bias_init, self.out_kernel_init,
                              self.out_bias_init),
                          self.param_dtype, multihead.PARAM_AXES[name], name=name)()
        for name, (kernel_shape, bias_shape, n_in) in shapes.items()
    }
    if self.normalize_qk:
      for name in multihead.QK_NORM_NAMES:
        params[name] = _LayerNormScale(H, self.param_dtype, name=name)()
    if self.sinks:
      params[multihead.SINKS_NAME] = self.param(
          multihead.SINKS_NAME, with_logical_axes(
              nn.initializers.zeros, multihead.PARAM_AXES[multihead.SINKS_NAME]),
          (N,), self.param_dtype)
    if self.dropout_rate > 0.0 and not nn.merge_param("deterministic", self.deterministic,
                                                      deterministic):
      if dropout_rng is None:
        dropout_rng = self.make_rng("dropout")
    else:
      dropout_rng = None

    cache = None
    self_attention = inputs_k is None and inputs_v is None and inputs_kv is None
    if self.decode:
      if not self_attention:
        raise ValueError("decode=True is for self-attention: call without inputs_k, inputs_v "
                         "or inputs_kv")
      initialized = self.has_variable("cache", "cached_key")
      dtype = self.dtype or jnp.result_type(x_q, self.param_dtype)
      fresh = multihead.init_kv_cache(x_q.shape[:-2], x_q.shape[-2], K, H, dtype)
      cached_key = self.variable("cache", "cached_key", lambda: fresh["key"])
      cached_value = self.variable("cache", "cached_value", lambda: fresh["value"])
      cache_index = self.variable("cache", "cache_index", lambda: fresh["index"])
      if initialized:
        cache = {"key": cached_key.value, "value": cached_value.value,
                 "index": cache_index.value}

    kv = (None, None) if self_attention else (x_k, x_v)
    out, weights, cache = _attend(
        self, params, x_q, *kv, cache=cache, dropout_rng=dropout_rng,
        sow_weights=sow_weights, mask=mask, bias=bias, is_causal=is_causal,
        local_window_size=local_window_size, q_segment_ids=q_segment_ids,
        kv_segment_ids=kv_segment_ids, query_positions=query_positions,
        key_positions=key_positions, score_mod=score_mod)
    if cache is not None:
      cached_key.value, cached_value.value = cache["key"], cache["value"]
      cache_index.value = cache["index"]
    if sow_weights:
      self.sow("intermediates", "attention_weights", weights)
    return nn.with_logical_constraint(out, multihead.activation_axes(out.ndim))


class SinusoidalPositionEmbedding(nn.Module):
  """Adds fixed sinusoidal position encodings to ``inputs [..., L, D]``.

  Attributes:
    max_timescale: longest wavelength over 2 pi.
    layout: ``"interleaved"`` (the paper) or ``"concat"`` (tensor2tensor, Flax examples).
  """
  max_timescale: float = 10_000.0
  layout: str = "interleaved"

  def __call__(self, inputs: ArrayLike, positions: ArrayLike | None = None) -> Array:
    """Returns ``inputs + PE(positions)``; positions ``[..., L]`` default to ``0..L-1``."""
    inputs = jnp.asarray(inputs)
    positions = inputs.shape[-2] if positions is None else positions
    pe = positional.sinusoidal_position_encoding(
        positions, inputs.shape[-1], max_timescale=self.max_timescale, layout=self.layout)
    return jnp.add(*jnp.broadcast_arrays(inputs, pe.astype(inputs.dtype)))


class RotaryPositionEmbedding(nn.Module):
  """Rotary position embedding of ``x [..., L, N, H]`` (see :func:`attnjax.apply_rotary`).

  Attributes:
    max_timescale: RoPE base.
    layout: ``"half"`` or ``"interleaved"``.
  """
  max_timescale: float = 10_000.0
  layout: str = "half"

  def __call__(self, x: ArrayLike, positions: ArrayLike | None = None) -> Array:
    """Rotates ``x``; positions ``[..., L]`` default to ``0..L-1``."""
    x = jnp.asarray(x)
    positions = jnp.arange(x.shape[-3]) if positions is None else positions
    return positional.apply_rotary(x, positions, max_timescale=self.max_timescale,
                                   layout=self.layout)


def _attend(module, params, inputs_q, inputs_k, inputs_v, *, cache, dropout_rng, sow_weights,
            score_mod, **options):
  """:func:`attnjax.multi_head_attention` with the options held by a Linen or NNX module
  (a ``score_mod`` given at call time replaces the module's).

  Returns:
    ``(out, weights or None, new cache or None)``.
  """
  result = multihead.multi_head_attention(
      params, inputs_q, inputs_k, inputs_v, logits_soft_cap=module.logits_soft_cap,
      rotary=module.rotary, rotary_max_timescale=module.rotary_max_timescale, cache=cache,
      dropout_rate=module.dropout_rate if dropout_rng is not None else 0.0,
      dropout_rng=dropout_rng, return_weights=sow_weights, dtype=module.dtype,
      precision=module.precision, implementation=module.implementation,
      attention_fn=module.attention_fn, process_heads=module.process_heads,
      score_mod=module.score_mod if score_mod is None else score_mod, **options)
  if cache is not None:
    result, cache = result
  out, weights = result if sow_weights else (result, None)
  return out, weights, cache


def _check_options(num_heads: int, num_kv_heads: int, dropout_rate: float) -> None:
  """Refuses head counts and dropout rates that a Linen or NNX module cannot use."""
  multihead._check_heads(num_heads, num_kv_heads)
  if not 0.0 <= dropout_rate < 1.0:
    raise ValueError(f"dropout_rate must be in [0, 1), got {dropout_rate!r}")


def _head_dim(head_dim: int | None, in_features: int, num_heads: int) -> int:
  if head_dim is not None:
    return head_dim
  if in_features % num_heads:
    raise ValueError(f"head_dim defaults to in_features // num_heads, but in_features="
                     f"{in_features} is not a multiple of num_heads={num_heads}; set head_dim")
  return in_features // num_heads
