"""Flax NNX modules over the attnjax core.

The same modules as :mod:`attnjax.linen`, holding the same parameters under the same names
(``query``, ``key``, ``value``, ``out``, each with ``kernel`` and ``bias``, and with
``normalize_qk`` ``query_ln`` and ``key_ln`` with ``scale``) and giving the same outputs.
``MultiHeadAttention`` takes the options of ``flax.nnx.MultiHeadAttention`` under Flax's
names (``normalize_qk``, ``out_kernel_init``, ``out_bias_init``, ``precision``,
``attention_fn``, ``keep_rngs``; ``inputs_k`` and ``inputs_v`` at call time), and its
parameters port to and from Flax's with ``nnx.update``. The attention weights are recorded
with ``sow_weights=True`` as an ``nnx.Intermediate`` named ``attention_weights`` (collect
them with ``nnx.capture``, e.g. ``nnx.capture(forward, nnx.Intermediate)``); decoding keeps
``nnx.Cache`` variables.

Shapes: inputs ``[..., T, D]``; attention weights ``[..., N, T, S]``; rotary inputs
``[..., L, N, H]``.

Sharding: the parameters carry the logical axis names of
:data:`attnjax.multihead.PARAM_AXES` as their ``out_sharding`` metadata, so
``nnx.get_partition_spec(nnx.state(module))`` under a rules table (``nn.logical_axis_rules``)
gives their specs; under a mesh context (``jax.set_mesh``) and rules both, they are sharded
as they are created (Flax's eager sharding), and without them nothing changes. The output
is constrained to :data:`attnjax.multihead.ACTIVATION_AXES`, as in :mod:`attnjax.linen`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx
from jax import Array
from jax.typing import ArrayLike

from attnjax import attention, linen, masks, multihead, positional

Dtype = Any


def _param(value: Array, axes: tuple[str, ...]) -> nnx.Param:
  """An ``nnx.Param`` with logical axes ``out_sharding=axes``; sharded as it is created
  (Flax's eager sharding) only under both a mesh and logical axis rules, which map them."""
  eager = (nnx.using_eager_sharding() and not jax.sharding.get_abstract_mesh().empty
           and bool(nn.get_logical_axis_rules()))
  return nnx.Param(value, out_sharding=axes, eager_sharding=eager)


class _Projection(nnx.Module):
  """One projection's ``kernel`` and ``bias``."""

  def __init__(self, kernel_shape, bias_shape, num_input_axes, use_bias, kernel_init,
               bias_init, param_dtype, axes, rngs: nnx.Rngs):
    self.kernel = _param(multihead.init_kernel(
        kernel_init, rngs.params(), kernel_shape, num_input_axes, param_dtype), axes["kernel"])
    self.bias = nnx.data(
        _param(multihead.init_bias(bias_init, rngs.params(), bias_shape, param_dtype),
               axes["bias"])
        if use_bias else None)

  def as_dict(self) -> dict[str, Array]:
    p = {"kernel": self.kernel[...]}
    if self.bias is not None:
      p["bias"] = self.bias[...]
    return p


class _LayerNormScale(nnx.Module):
  """The ``scale [features]`` of a LayerNorm without bias (Flax's initial ones)."""

  def __init__(self, features: int, param_dtype: Dtype, rngs: nnx.Rngs):
    rngs.params()  # Drawn and unused, as by Flax's LayerNorm: later parameters match Flax's.
    self.scale = _param(jnp.ones((features,), param_dtype),
                        multihead.PARAM_AXES["query_ln"]["scale"])

  def as_dict(self) -> dict[str, Array]:
    return {"scale": self.scale[...]}


class MultiHeadAttention(nnx.Module):
  """Multi-head, grouped-query or multi-query attention; self- or cross-attention.

  Args:
    in_features: width D of the query inputs.
    num_heads: query heads N.
    num_kv_heads: key/value heads K, a divisor of N; defaults to N.
    head_dim: H; defaults to ``in_features // num_heads``.
    kv_features: width of the key/value inputs; defaults to ``in_features``.
    out_features: output width; defaults to ``in_features``.
    use_bias, dropout_rate, deterministic, dtype, param_dtype, kernel_init, bias_init: as in
      :class:`attnjax.linen.MultiHeadAttention`.
    logits_soft_cap, rotary, rotary_max_timescale, decode, implementation: as in
      :class:`attnjax.linen.MultiHeadAttention`.
    out_kernel_init, out_bias_init, normalize_qk, precision, attention_fn: as in
      :class:`attnjax.linen.MultiHeadAttention`.
    sinks, score_mod, process_heads: as in :class:`attnjax.linen.MultiHeadAttention` (the
      sinks are an ``nnx.Param`` ``sinks [N]``).
    rngs: ``nnx.Rngs`` for the parameters and, with dropout, the ``"dropout"`` stream.
    keep_rngs: with dropout, keep a fork of the ``"dropout"`` stream for calls that pass no
      ``rngs`` (Flax's); with ``keep_rngs=False`` a call with dropout needs ``rngs``.

  For decoding, set ``decode=True`` and call :meth:`init_cache` first.

  Raises:
    ValueError: at construction, if ``num_kv_heads`` does not divide ``num_heads`` or
      ``dropout_rate`` is not in [0, 1).
  """

  def __init__(
      self,
      in_features: int,
      num_heads: int,
      *,
      num_kv_heads: int | None = None,
      head_dim: int | None = None,
      kv_features: int | None = None,
      out_features: int | None = None,
      use_bias: bool = True,
      dropout_rate: float = 0.0,
      deterministic: bool | None = None,
      dtype: Dtype | None = None,
      param_dtype: Dtype = jnp.float32,
      kernel_init: multihead.Initializer = multihead.default_kernel_init,
      bias_init: multihead.Initializer = multihead.default_bias_init,
      logits_soft_cap: float | None = None,
      rotary: bool = False,
      rotary_max_timescale: float = 10_000.0,
      decode: bool = False,
      implementation: attention.Implementation | None = None,
      out_kernel_init: multihead.Initializer | None = None,
      out_bias_init: multihead.Initializer | None = None,
      normalize_qk: bool = False,
      precision: jax.lax.PrecisionLike = None,
      attention_fn: multihead.AttentionFn = attention.dot_product_attention,
      rngs: nnx.Rngs,
      keep_rngs: bool = True,
      sinks: bool = False,
      score_mod: Callable | None = None,
      process_heads: multihead.ProcessHeads | None = None,
  ):
    self.num_heads = num_heads
    self.num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
    linen._check_options(num_heads, self.num_kv_heads, dropout_rate)
    self.head_dim = linen._head_dim(head_dim, in_features, num_heads)
    self.dropout_rate = dropout_rate
    self.deterministic = deterministic
    self.dtype = dtype
    self.param_dtype = param_dtype
    self.logits_soft_cap = logits_soft_cap
    self.rotary = rotary
    self.rotary_max_timescale = rotary_max_timescale
    self.decode = decode
    self.implementation = implementation
    self.precision = precision
    self.attention_fn = attention_fn
    # A modifier that holds arrays (a pytree such as score_mods.ALiBi) is data, whose arrays
    # go through nnx transforms with the module; a plain function is static.
    holds_arrays = any(isinstance(x, jax.Array) for x in jax.tree.leaves(score_mod))
    self.score_mod = nnx.data(score_mod) if holds_arrays else nnx.static(score_mod)
    self.process_heads = nnx.static(process_heads)
    shapes = multihead.projection_shapes(
        in_features, kv_features or in_features, out_features or in_features, num_heads,
        self.num_kv_heads, self.head_dim)
    self.query_ln: _LayerNormScale | None = nnx.data(None)
    self.key_ln: _LayerNormScale | None = nnx.data(None)
    # In Flax's order, so that the same rngs give Flax's initial parameters.
    for name, (kernel_shape, bias_shape, n_in) in shapes.items():
      if name == "out" and normalize_qk:
        self.query_ln = _LayerNormScale(self.head_dim, param_dtype, rngs)
        self.key_ln = _LayerNormScale(self.head_dim, param_dtype, rngs)
      initializers = multihead.projection_initializers(name, kernel_init, bias_init,
                                                       out_kernel_init, out_bias_init)
      setattr(self, name, _Projection(kernel_shape, bias_shape, n_in, use_bias, *initializers,
                                      param_dtype, multihead.PARAM_AXES[name], rngs))
    self.sinks = (_param(jnp.zeros((num_heads,), param_dtype),
                         multihead.PARAM_AXES[multihead.SINKS_NAME]) if sinks
                  else nnx.data(None))
    self.rngs = (rngs["dropout"].fork() if keep_rngs and dropout_rate > 0.0
                 else nnx.data(None))
    self.cached_key: nnx.Cache | None = nnx.data(None)
    self.cached_value: nnx.Cache | None = nnx.data(None)
    self.cache_index: nnx.Cache | None = nnx.data(None)

  def init_cache(self, input_shape: tuple[int, ...], dtype: Dtype | None = None) -> None:
    """Allocates an empty cache for inputs of ``input_shape = [..., M, D]`` (M positions).

    The cache dtype defaults to the module's ``dtype``, else ``param_dtype``.
    """
    dtype = dtype or self.dtype or self.param_dtype
    cache = multihead.init_kv_cache(tuple(input_shape[:-2]), input_shape[-2],
                                    self.num_kv_heads, self.head_dim, dtype)
    self.cached_key = nnx.Cache(cache["key"])
    self.cached_value = nnx.Cache(cache["value"])
    self.cache_index = nnx.Cache(cache["index"])

  def set_view(self, deterministic: bool | None = None, decode: bool | None = None) -> None:
    """Used by ``nnx.view``, ``Module.train()`` and ``Module.eval()``."""
    if deterministic is not None:
      self.deterministic = deterministic
    if decode is not None:
      self.decode = decode

  def params_dict(self) -> multihead.Params:
    """The parameters as the pytree of :func:`attnjax.multi_head_attention`."""
    names = ("query", "key", "value", "out") + multihead.QK_NORM_NAMES
    params = {name: getattr(self, name).as_dict() for name in names
              if getattr(self, name) is not None}
    if self.sinks is not None:
      params[multihead.SINKS_NAME] = self.sinks[...]
    return params

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
      rngs: nnx.Rngs | nnx.RngStream | None = None,
      sow_weights: bool = False,
      score_mod: Callable | None = None,
  ) -> Array:
    """Attends from ``inputs_q [..., T, D]`` to ``inputs_k [..., S, Dkv]`` (default: itself).

    Args:
      inputs_q: ``[..., T, D]``.
      inputs_k: ``[..., S, Dkv]``; defaults to ``inputs_q`` (self-attention), as in Flax.
      inputs_v: ``[..., S, Dkv]``; defaults to ``inputs_k``.
      inputs_kv: the older spelling of ``inputs_k`` and ``inputs_v`` both.
      mask, bias, is_causal, q_segment_ids, kv_segment_ids: as in
        :func:`attnjax.multi_head_attention`.
      local_window_size, query_positions, key_positions: as in
        :func:`attnjax.multi_head_attention`.
      deterministic: disables dropout; overrides the module's ``deterministic``.
      rngs: ``nnx.Rngs`` (its ``"dropout"`` stream) or an ``nnx.RngStream`` for dropout;
        defaults to the stream kept at construction (see ``keep_rngs``).
      sow_weights: record the attention weights ``[..., N, T, S]`` as an
        ``nnx.Intermediate`` named ``attention_weights``.
      score_mod: a score modifier for this call, in place of the module's.

    Returns:
      ``[..., T, out_features]``.

    Raises:
      ValueError: with dropout, if ``deterministic`` is set nowhere, or if no ``rngs`` are
        given and none were kept; with ``decode=True``, before :meth:`init_cache` or with
        key/value inputs.
    """
    dropout_rng = None
    if self.dropout_rate > 0.0:
      deterministic = self.deterministic if deterministic is None else deterministic
      if deterministic is None:
        raise ValueError("dropout_rate > 0: pass deterministic=True/False at construction, "
                         "at call time, or through module.train() / module.eval()")
      if not deterministic:
        stream = rngs["dropout"] if isinstance(rngs, nnx.Rngs) else rngs or self.rngs
        if stream is None:
          raise ValueError("dropout needs rngs at call time: the module was built with "
                           "keep_rngs=False")
        dropout_rng = stream()

    cache = None
    self_attention = inputs_k is None and inputs_v is None and inputs_kv is None
    if self.decode:
      if not self_attention:
        raise ValueError("decode=True is for self-attention: call without inputs_k, inputs_v "
                         "or inputs_kv")
      if self.cached_key is None or self.cached_value is None or self.cache_index is None:
        raise ValueError("decode=True needs a cache: call init_cache(input_shape) first")
      cache = {"key": self.cached_key[...], "value": self.cached_value[...],
               "index": self.cache_index[...]}

    x_q, x_k, x_v = multihead.resolve_inputs(inputs_q, inputs_k, inputs_v, inputs_kv)
    kv = (None, None) if self_attention else (x_k, x_v)
    out, weights, cache = linen._attend(
        self, self.params_dict(), x_q, *kv, cache=cache, dropout_rng=dropout_rng,
        sow_weights=sow_weights, mask=mask, bias=bias, is_causal=is_causal,
        local_window_size=local_window_size, q_segment_ids=q_segment_ids,
        kv_segment_ids=kv_segment_ids, query_positions=query_positions,
        key_positions=key_positions, score_mod=score_mod)
    if cache is not None:
      assert self.cached_key is not None and self.cached_value is not None
      assert self.cache_index is not None
      self.cached_key[...] = cache["key"]
      self.cached_value[...] = cache["value"]
      self.cache_index[...] = cache["index"]
    if sow_weights:
      self.sow(nnx.Intermediate, "attention_weights", weights)
    return nn.with_logical_constraint(out, multihead.activation_axes(out.ndim))


class SinusoidalPositionEmbedding(nnx.Module):
  """Adds fixed sinusoidal position encodings to ``inputs [..., L, D]``."""

  def __init__(self, *, max_timescale: float = 10_000.0, layout: str = "interleaved"):
    self.max_timescale = max_timescale
    self.layout = layout

  def __call__(self, inputs: ArrayLike, positions: ArrayLike | None = None) -> Array:
    """Returns ``inputs + PE(positions)``; positions ``[..., L]`` default to ``0..L-1``."""
    inputs = jnp.asarray(inputs)
    positions = inputs.shape[-2] if positions is None else positions
    pe = positional.sinusoidal_position_encoding(
        positions, inputs.shape[-1], max_timescale=self.max_timescale, layout=self.layout)
    return jnp.add(*jnp.broadcast_arrays(inputs, pe.astype(inputs.dtype)))


class RotaryPositionEmbedding(nnx.Module):
  """Rotary position embedding of ``x [..., L, N, H]`` (see :func:`attnjax.apply_rotary`)."""

  def __init__(self, *, max_timescale: float = 10_000.0, layout: str = "half"):
    self.max_timescale = max_timescale
    self.layout = layout

  def __call__(self, x: ArrayLike, positions: ArrayLike | None = None) -> Array:
    """Rotates ``x``; positions ``[..., L]`` default to ``0..L-1``."""
    x = jnp.asarray(x)
    positions = jnp.arange(x.shape[-3]) if positions is None else positions
    return positional.apply_rotary(x, positions, max_timescale=self.max_timescale,
                                   layout=self.layout)
