"""Scaled dot-product attention: self, cross, multi-head, grouped-query.

Shape letters: B batch (in the public API any number of leading dims, none included),
T query length, S key/value length, N query heads, K key/value heads, G = N // K query
heads per key/value head, H head dim.

  query  [..., T, N, H]      key, value  [..., S, K, H]
  logits, weights, mask, bias  [..., N, T, S]     log-sum-exp  [..., N, T]

A bool mask is True where the query may attend. Query head n reads key/value head n // G.
Logits and softmax are float32 whatever the input dtype; the output has the input dtype.
A query row with no visible key returns zeros, and its gradients are zeros. A non-finite
entry in a query, key or value vector makes exactly the rows that see it NaN (output, lse and
weights) and reaches nothing else, values or gradients.

References:
  Vaswani et al. 2017, "Attention Is All You Need".
  Ainslie et al. 2023, "GQA: Training Generalized Multi-Query Transformer Models".
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any, Literal, NamedTuple, get_args

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array
from jax.typing import ArrayLike

from attnjax import blockwise, kernels
from attnjax import masks as masks_lib

# The attention implementations: "xla" is the dense reference, "blockwise" the tiled one; the
# others are accelerator kernels (attnjax.kernels).
Implementation = Literal["xla", "blockwise", "cudnn", "pallas_gpu", "splash"]
IMPLEMENTATIONS: tuple[Implementation, ...] = get_args(Implementation)

# A large finite negative for masked logits: exp() of it is 0, and unlike -inf it never makes
# NaN when a whole row is masked.
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)


class _Canonical(NamedTuple):
  """Validated inputs with the leading batch dims flattened into one dim B >= 1."""
  q: Array  # [B, T, N, H]
  k: Array  # [B, S, K, H]
  v: Array  # [B, S, K, H]
  bias: Array | None  # float32 [B|1, N|1, T|1, S|1]
  mask: masks_lib.Mask | None  # every masking argument, ANDed, in canonical form
  batch_shape: tuple[int, ...]
  scale: Any
  logits_soft_cap: float | None
  score_mod: Callable | None = None  # fn(score, batch, head, q_idx, kv_idx) -> score
  sinks: Array | None = None  # float32 [N]


def dot_product_attention(
    query: ArrayLike,
    key: ArrayLike,
    value: ArrayLike,
    bias: ArrayLike | None = None,
    mask: ArrayLike | masks_lib.Mask | None = None,
    *,
    is_causal: bool = False,
    scale: float | None = None,
    local_window_size: int | tuple[int, int] | None = None,
    q_segment_ids: ArrayLike | None = None,
    kv_segment_ids: ArrayLike | None = None,
    logits_soft_cap: float | None = None,
    dropout_rate: float = 0.0,
    dropout_rng: Array | None = None,
    return_weights: bool = False,
    return_lse: bool = False,
    implementation: Implementation | None = None,
    block_sizes: tuple[int, int] | None = None,
    precision: jax.lax.PrecisionLike = None,
    score_mod: Callable | None = None,
    sinks: ArrayLike | None = None,
) -> Array | tuple[Array, ...]:
  """Scaled dot-product attention, ``softmax(scale * q k^T + bias) v`` over visible keys.

  The logits are ``scale * q.k``, modified by ``score_mod`` if given, plus ``bias``, then
  soft-capped (``c * tanh(x / c)``) if ``logits_soft_cap`` is given; then every mask applies
  (``mask``, ``is_causal``, ``local_window_size`` and segment ids combine with AND) and the
  softmax runs over the visible keys and, if given, the head's sink.

  Args:
    query: ``[..., T, N, H]``.
    key: ``[..., S, K, H]`` with N a multiple of K (K = N: multi-head; K = 1: multi-query).
    value: ``[..., S, K, H]``.
    bias: float, broadcastable to ``[..., N, T, S]``, added to the logits.
    mask: a mask object (:mod:`attnjax.masks`: ``Causal``, ``LocalWindow``, ``Chunked``,
      ``PrefixLM``, ``Segments``, ``Lengths``, ``MaskFn`` and their ``&``, ``|``, ``~``) or a
      bool array broadcastable to ``[..., N, T, S]``, True = attend.
    is_causal: key j is visible to query i iff ``j <= i`` (top-left aligned when T != S; for
      decoding with an offset pass ``masks.causal_mask(T, S, offset=...)`` as ``mask``).
    scale: logit scale, ``1 / sqrt(H)`` by default.
    local_window_size: ``w`` or ``(left, right)``: key j is visible to query i iff
      ``i - left <= j <= i + right`` (an int ``w`` means ``(w, w)``). A side at least as
      long as the sequence (``2**31 - 1``, ``sys.maxsize``) means unbounded.
    q_segment_ids: int ``[..., T]``; with ``kv_segment_ids``, keys are visible only to
      queries of the same segment (packed sequences).
    kv_segment_ids: int ``[..., S]``.
    logits_soft_cap: if given, logits become ``cap * tanh(logits / cap)`` (Gemma 2);
      ``inf`` means no cap.
    dropout_rate: probability of dropping an attention weight; kept weights are scaled by
      ``1 / (1 - dropout_rate)``.
    dropout_rng: a ``jax.random.key``, required when ``dropout_rate > 0``.
    return_weights: also return the attention weights (before dropout).
    return_lse: also return the log-sum-exp of the visible logits, ``-inf`` for a row with
      no visible key, NaN for one that sees a non-finite input (see :func:`merge_attention`).
      It carries a gradient (which :func:`merge_attention` needs), unlike the residual of
      ``jax.nn.dot_product_attention(..., return_residual=True)``, which is stop-gradiented.
    implementation: ``"xla"`` is the dense reference; ``"blockwise"`` is tiled with an online
      softmax and a recomputing backward pass (memory linear in length; no dropout, no
      ``return_weights``, a static ``scale``); ``None`` picks the fastest implementation that
      supports the arguments: ``"xla"`` when weights, dropout or a traced scale are asked for;
      on CPU ``"xla"`` below 128 keys, else ``"blockwise"``; on GPU ``"cudnn"`` where it
      applies, then ``"pallas_gpu"``; on TPU ``"splash"`` where it applies; then on GPU and
      TPU ``"xla"`` while its logits fit in memory, else ``"blockwise"``. ``"cudnn"``,
      ``"pallas_gpu"`` and ``"splash"`` are the kernels of :mod:`attnjax.kernels`, each
      taking a subset of the arguments (others are a ``ValueError``); off their hardware the
      two Pallas ones run in interpret mode (slow, for testing).
      Under shape-polymorphic ``jax.export``, ``"xla"`` and ``"blockwise"`` take symbolic
      batch dims (the kernels need static shapes); symbolic lengths T or S need ``"xla"``
      (which ``None`` then picks).
    block_sizes: ``(block_q, block_k)`` for ``"blockwise"``'s forward pass (its backward pass
      uses ``min(block_q, block_k)`` queries per block); defaults from
      :func:`attnjax.blockwise.default_block_sizes`, where a symbolic batch size counts as 1.
    precision: ``jax.lax.Precision`` of the two einsums (``q.k`` and ``weights.v``), as in
      ``jax.lax.dot_general``; honoured by ``"xla"`` only, so ``None`` picks ``"xla"`` when
      it is given.
    score_mod: ``fn(score, batch, head, q_idx, kv_idx) -> score`` (FlexAttention's
      signature), elementwise on the float32 scaled logits before the bias and the masks. It
      is called with broadcastable arrays of one rank: score ``[B, N, T, S]`` (on the
      blockwise path a block of it), int32 indices batch ``[B, 1, 1, 1]`` (the flattened
      batch index), head ``[1, N, 1, 1]`` (the query head), q_idx ``[1, 1, T, 1]`` and kv_idx
      ``[1, 1, 1, S]`` (absolute positions), and must return an array of the score's shape
      and dtype. Arrays it closes over or holds as pytree leaves get gradients on every
      implementation (the blockwise path sums them block by block, never forming
      ``[N, T, S]``). Ready-made ones are in :mod:`attnjax.score_mods`.
    sinks: float ``[N]``, a per-head logit that joins every row's softmax denominator
      without a value (attention sinks, as in gpt-oss): the weights of a row then sum to
      ``1 - exp(sink - lse)``, and ``lse`` includes the sink (a row with no visible key gets
      zeros and ``lse = sink``). Differentiable.

  Returns:
    ``out [..., T, N, H]`` in the input dtype; with ``return_weights`` and/or ``return_lse``
    the tuple ``(out, weights [..., N, T, S], lse [..., N, T])`` holding those asked for
    (weights and lse are float32).

  Raises:
    ValueError, TypeError: at trace time, for inputs of the wrong rank, shape or dtype, naming
      the argument and what it got; ValueError for a traced ``is_causal``,
      ``local_window_size``, ``logits_soft_cap`` or ``dropout_rate`` (they must be static).
  """
  c = _canonicalize(query, key, value, bias, mask, is_causal, scale, local_window_size,
                    q_segment_ids, kv_segment_ids, logits_soft_cap, score_mod, sinks)
  _check_static("dropout_rate", dropout_rate, "float")
  if not 0.0 <= dropout_rate < 1.0:
    raise ValueError(f"dropout_rate must be in [0, 1), got {dropout_rate!r}")
  if dropout_rate > 0.0 and dropout_rng is None:
    raise ValueError("dropout_rate > 0 needs a dropout_rng (a jax.random.key), got None")
  if implementation is None:
    implementation = ("xla" if precision is not None
                      else _choose_implementation(c, dropout_rate, return_weights, return_lse))
  elif implementation not in IMPLEMENTATIONS:
    raise ValueError(f"implementation must be None or one of {IMPLEMENTATIONS}, "
                     f"got {implementation!r}")

  if implementation == "xla":
    out, weights, lse = _dense(c, dropout_rate, dropout_rng, precision)
  elif implementation in kernels.KERNELS:
    out, lse = kernels.attention(c, implementation, return_lse=return_lse,
                                 dropout_rate=dropout_rate, return_weights=return_weights,
                                 precision=precision, sinks=c.sinks, score_mod=c.score_mod)
    weights = None
  else:
    if precision is not None:
      raise ValueError(f"precision={precision!r} needs implementation='xla'")
    if return_weights:
      raise ValueError("return_weights=True needs implementation='xla' (the blockwise path "
                       "never forms the [N, T, S] weights); use attention_weights() instead")
    if dropout_rate > 0.0:
      raise ValueError(f"dropout_rate={dropout_rate} is not supported by "
                       f"implementation={implementation!r}; use implementation='xla'")
    if isinstance(c.scale, jax.core.Tracer):
      raise ValueError("implementation='blockwise' needs a static scale (a Python float), "
                       "got a traced value; use implementation='xla'")
    block_q, block_k = (None, None) if block_sizes is None else block_sizes
    out, lse = blockwise.blockwise_attention(
        c.q, c.k, c.v, c.bias, c.mask, scale=c.scale, is_causal=False, window=None,
        q_segment_ids=None, kv_segment_ids=None, logits_soft_cap=c.logits_soft_cap,
        block_q=block_q, block_k=block_k, score_mod=c.score_mod, sinks=c.sinks)
    weights = None

  batch = c.batch_shape
  out = out.reshape(batch + out.shape[1:])
  extras = []
  if return_weights:
    extras.append(weights.reshape(batch + weights.shape[1:]))
  if return_lse:
    extras.append(lse.reshape(batch + lse.shape[1:]))
  return (out, *extras) if extras else out


def attention_weights(
    query: ArrayLike,
    key: ArrayLike,
    bias: ArrayLike | None = None,
    mask: ArrayLike | masks_lib.Mask | None = None,
    *,
    is_causal: bool = False,
    scale: float | None = None,
    local_window_size: int | tuple[int, int] | None = None,
    q_segment_ids: ArrayLike | None = None,
    kv_segment_ids: ArrayLike | None = None,
    logits_soft_cap: float | None = None,
    score_mod: Callable | None = None,
    sinks: ArrayLike | None = None,
) -> Array:
  """Attention probabilities, the "saliency map" of each query over the keys.

  Takes the masking arguments of :func:`dot_product_attention` (and its ``score_mod`` and
  ``sinks``) and computes the same weights.

  Args:
    query: ``[..., T, N, H]``.
    key: ``[..., S, K, H]``.

  Returns:
    float32 ``[..., N, T, S]``; each row sums to 1 over its visible keys (less the sink's
    share with ``sinks``), or is all zeros when no key is visible.
  """
  key = jnp.asarray(key)
  c = _canonicalize(query, key, key, bias, mask, is_causal, scale, local_window_size,
                    q_segment_ids, kv_segment_ids, logits_soft_cap, score_mod, sinks)
  probs, _, bad = _probabilities(c)
  probs = _poison(probs, bad[..., None])
  return probs.reshape(c.batch_shape + probs.shape[1:])


def merge_attention(outputs: Sequence[ArrayLike], lses: Sequence[ArrayLike]) -> tuple[Array, Array]:
  """Merges attention results over disjoint sets of keys into attention over their union.

  Each part i is ``out_i = softmax(logits_i) v_i`` with log-sum-exp ``lse_i`` (from
  ``dot_product_attention(..., return_lse=True)``); the union is the lse-weighted average
  ``sum_i exp(lse_i - lse) out_i`` with ``lse = logsumexp_i lse_i``. This is the reduction of
  split-KV decoding and of sequence-parallel (ring) attention.

  Args:
    outputs: sequence of ``[..., T, N, H]``.
    lses: sequence of float ``[..., N, T]``, ``-inf`` where a part has no visible key.

  Returns:
    ``(out [..., T, N, H], lse [..., N, T])``; rows with no visible key in any part are zeros
    with lse ``-inf``.

  References:
    Milakov & Gimelshein 2018, "Online normalizer calculation for softmax"; Dao 2023,
    "FlashAttention-2" (Flash-Decoding).
  """
  if len(outputs) != len(lses) or not outputs:
    raise ValueError(f"merge_attention needs as many outputs as lses (at least one), "
                     f"got {len(outputs)} and {len(lses)}")
  outs = [jnp.asarray(o) for o in outputs]
  lse_list = [jnp.asarray(x, jnp.float32) for x in lses]
  for i, (o, x) in enumerate(zip(outs, lse_list)):
    if o.shape != outs[0].shape:
      raise ValueError(f"outputs[{i}] has shape {o.shape}, outputs[0] has {outs[0].shape}")
    if o.ndim < 3 or x.shape != o.shape[:-3] + (o.shape[-2], o.shape[-3]):
      raise ValueError(f"lses[{i}] must have shape [..., N, T] = "
                       f"{o.shape[:-3] + (o.shape[-2], o.shape[-3])} for outputs[{i}] of shape "
                       f"{o.shape}, got {x.shape}")
  lse_P = jnp.stack(lse_list)  # [P, ..., N, T]
  max_lse = jnp.max(lse_P, axis=0, keepdims=True)
  max_lse = jnp.where(jnp.isfinite(max_lse), max_lse, 0.0)
  w_P = jnp.exp(lse_P - max_lse)  # exp(-inf) = 0 for empty parts
  total = jnp.sum(w_P, axis=0, keepdims=True)
  nonempty = total > 0
  lse = jnp.where(nonempty, max_lse + jnp.log(jnp.where(nonempty, total, 1.0)), -jnp.inf)[0]
  w_P = w_P / jnp.where(nonempty, total, 1.0)
  w_P = jnp.swapaxes(w_P, -1, -2)[..., None]  # [P, ..., T, N, 1]
  out = jnp.sum(w_P * jnp.stack(outs).astype(jnp.float32), axis=0)
  return out.astype(outs[0].dtype), lse


def _choose_implementation(c: _Canonical, dropout_rate: float, return_weights: bool,
                           return_lse: bool = False, backend: str | None = None,
                           memory_bytes: int | None = None) -> Implementation:
  """The fastest implementation that supports these arguments on ``backend`` (by default
  ``jax.default_backend()``).

  Measured on CPU: the blockwise path is faster forward and backward from 128 keys on (2x at
  B32 N4 T128 H64 forward+backward), and up to 1.8x slower forward+backward at 64 keys. On GPU
  and TPU nothing was measured: a kernel that applies (``kernels.choose``), else, as
  ``jax.nn.dot_product_attention`` does, dense ``"xla"``, as long as four float32 copies of
  its logits take at most half of ``memory_bytes`` (the device's memory), else
  ``"blockwise"``.
  """
  if return_weights or dropout_rate > 0.0 or isinstance(c.scale, jax.core.Tracer):
    return "xla"
  if any(jax.export.is_symbolic_dim(n) for n in (c.q.shape[1], c.k.shape[1])):
    return "xla"  # Blocks are planned for static lengths.
  backend = backend or jax.default_backend()
  if backend == "cpu":
    return "blockwise" if c.k.shape[1] >= 128 else "xla"
  kernel = kernels.choose(c, backend, return_lse=return_lse, sinks=c.sinks,
                          score_mod=c.score_mod)
  if kernel is not None:
    return kernel
  B, T, N, _ = c.q.shape
  B = 1 if jax.export.is_symbolic_dim(B) else B  # (As in default_block_sizes.)
  if memory_bytes is None:
    memory_bytes = _device_memory(backend)
  return "xla" if 4 * 4 * B * N * T * c.k.shape[1] <= memory_bytes // 2 else "blockwise"


def _device_memory(backend: str) -> int:
  """Bytes of memory of the first device of ``backend`` (16 GiB if it does not say)."""
  try:
    stats = jax.local_devices(backend=backend)[0].memory_stats() or {}
  except RuntimeError:  # No such backend here.
    stats = {}
  return int(stats.get("bytes_limit", 16 << 30))


def _dense(c: _Canonical, dropout_rate: float, dropout_rng: Array | None,
           precision: jax.lax.PrecisionLike = None):
  """Dense attention on canonical inputs: (out [B,T,N,H], weights [B,N,T,S], lse [B,N,T])."""
  probs, lse, bad = _probabilities(c, precision)
  B, T, N, H = c.q.shape
  S, K = c.k.shape[1], c.k.shape[2]
  p = probs
  if dropout_rate > 0.0:
    assert dropout_rng is not None  # Checked by dot_product_attention.
    keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, p.shape)
    p = jnp.where(keep, p / (1.0 - dropout_rate), 0.0)
  p_BKGTS = p.reshape(B, K, N // K, T, S)
  out = jnp.einsum("bkgts,bskh->btkgh", p_BKGTS, _finite(c.v).astype(jnp.float32),
                   precision=precision)
  out = jnp.where(jnp.swapaxes(bad, 1, 2)[..., None], jnp.nan, out.reshape(B, T, N, H))
  return out.astype(c.q.dtype), _poison(probs, bad[..., None]), _poison(lse, bad)


def _poison(x: Array, bad: Array) -> Array:
  return jnp.where(bad, jnp.nan, x)


def _finite(x: Array) -> Array:
  """x with non-finite entries replaced by zeros."""
  return jnp.where(jnp.isfinite(x), x, jnp.zeros((), x.dtype))


def _probabilities(c: _Canonical, precision: jax.lax.PrecisionLike = None):
  """Softmax weights [B,N,T,S], log-sum-exp [B,N,T] and which rows saw a non-finite input
  [B,N,T] (bool; their weights and lse are zeros and -inf here, for the caller to poison).

  A visible logit is NaN when its query, key or value vector holds a non-finite entry, and
  NaN or +inf when the bias (or an overflowing q.k) is; such a row is marked. The matmuls
  run on inputs with non-finite entries zeroed, so that a hidden one cannot reach other rows
  (or their gradients) through 0 * NaN, and a row that sees one is handled as empty and
  marked."""
  B, T, N, H = c.q.shape
  S, K = c.k.shape[1], c.k.shape[2]
  q_BTKGH = _finite(c.q).reshape(B, T, K, N // K, H)
  logits = jnp.einsum("btkgh,bskh->bkgts", q_BTKGH, _finite(c.k),
                      preferred_element_type=jnp.float32, precision=precision)
  finite_q = jnp.all(jnp.isfinite(c.q), axis=-1).reshape(B, T, K, N // K)  # [B, T, K, G]
  finite_kv = jnp.all(jnp.isfinite(c.k) & jnp.isfinite(c.v), axis=-1)  # [B, S, K]
  finite = (jnp.moveaxis(finite_q, 1, 3)[..., None]
            & jnp.swapaxes(finite_kv, 1, 2)[:, :, None, None, :])
  logits = jnp.where(finite, logits, jnp.nan).reshape(B, N, T, S) * c.scale
  if c.score_mod is not None:
    logits = c.score_mod(logits, *_indices(B, N, T, S))
  if c.bias is not None:
    logits = logits + c.bias
  if c.logits_soft_cap is not None:
    logits = c.logits_soft_cap * jnp.tanh(logits / c.logits_soft_cap)
  visible = _visibility(c)
  if visible is not None:
    logits = jnp.where(visible, logits, MASK_VALUE)
  if c.bias is not None:  # A -inf bias hides a key like a mask does.
    logits = jnp.where(jnp.isnan(logits), logits, jnp.maximum(logits, MASK_VALUE))
  bad = jnp.any(jnp.isnan(logits) | (logits == jnp.inf), axis=-1)
  logits = jnp.where(bad[..., None], MASK_VALUE, logits)
  # A row whose logits are all masked ones sees no key: its weights are 0, its lse -inf.
  # (jax.nn.softmax keeps only its output for the backward pass.)
  empty = jnp.all(logits <= MASK_VALUE / 2, axis=-1)
  if c.sinks is None:
    probs = jnp.where(empty[..., None], 0.0, jax.nn.softmax(logits, axis=-1))
    lse = jnp.where(empty, -jnp.inf, jax.nn.logsumexp(logits, axis=-1))
    return probs, lse, bad
  # The sink joins the denominator: lse = log(exp(sink) + sum_j exp(logit_j)).
  sinks = jnp.broadcast_to(c.sinks[:, None], (B, N, T))
  lse = jnp.where(empty, sinks, jnp.logaddexp(jax.nn.logsumexp(logits, axis=-1), sinks))
  safe = jnp.where(empty | jnp.isneginf(lse), 0.0, lse)
  probs = jnp.where(empty[..., None], 0.0, jnp.exp(logits - safe[..., None]))
  return probs, lse, bad


def _indices(B: int, N: int, T: int, S: int) -> tuple[Array, ...]:
  """Broadcastable int32 (batch, head, q_idx, kv_idx) index arrays of a [B, N, T, S] grid."""
  index = functools.partial(jnp.arange, dtype=jnp.int32)
  return (index(B).reshape(B, 1, 1, 1), index(N).reshape(1, N, 1, 1),
          index(T).reshape(1, 1, T, 1), index(S).reshape(1, 1, 1, S))


def _visibility(c: _Canonical) -> Array | None:
  """The AND of every mask in ``c``, bool broadcastable to [B, N, T, S], or None."""
  if c.mask is None:
    return None
  B, T, N, _ = c.q.shape
  visible = c.mask(*_indices(B, N, T, c.k.shape[1]))
  return visible.reshape((1,) * (4 - visible.ndim) + visible.shape)


def _canonicalize(query, key, value, bias, mask, is_causal, scale, local_window_size,
                  q_segment_ids, kv_segment_ids, logits_soft_cap, score_mod=None,
                  sinks=None) -> _Canonical:
  """Validates the arguments at trace time and flattens the batch dims."""
  q, k, v = jnp.asarray(query), jnp.asarray(key), jnp.asarray(value)
  for name, x in (("query", q), ("key", k), ("value", v)):
    if x.ndim < 3:
      raise ValueError(f"{name} must have shape [..., length, heads, head_dim] (rank >= 3), "
                       f"got shape {x.shape}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise TypeError(f"{name} must be floating point, got dtype {x.dtype}")
  if not q.dtype == k.dtype == v.dtype:
    raise TypeError(f"query, key and value must share a dtype, got {q.dtype}, {k.dtype} and "
                    f"{v.dtype}")
  if not q.ndim == k.ndim == v.ndim or q.shape[:-3] != k.shape[:-3]:
    raise ValueError(f"query, key and value must have the same batch dims, got shapes "
                     f"query {q.shape}, key {k.shape}, value {v.shape}")
  if k.shape != v.shape:
    raise ValueError(f"key and value must have the same shape [..., S, K, H], got key "
                     f"{k.shape} and value {v.shape}")
  batch = tuple(q.shape[:-3])
  T, N, H = q.shape[-3:]
  S, K, H_k = k.shape[-3:]
  if H_k != H:
    raise ValueError(f"query and key must have the same head dim, got query {q.shape} "
                     f"(H={H}) and key {k.shape} (H={H_k})")
  if K == 0 or N % K:
    raise ValueError(f"the number of query heads must be a multiple of the number of key/value "
                     f"heads, got query {q.shape} (N={N}) and key {k.shape} (K={K})")
  logits_shape = batch + (N, T, S)

  if bias is not None:
    bias = jnp.asarray(bias)
    if not jnp.issubdtype(bias.dtype, jnp.floating):
      raise TypeError(f"bias must be floating point, got dtype {bias.dtype}")
    bias = masks_lib.flatten_batch("bias", bias.astype(jnp.float32), logits_shape, len(batch))
  if mask is not None and not isinstance(mask, masks_lib.Mask):
    mask = jnp.asarray(mask)
    if mask.dtype != jnp.bool_:
      raise TypeError(f"mask must be a mask object or a bool array (True = attend), got dtype "
                      f"{mask.dtype}; pass additive float masks as bias")

  if (q_segment_ids is None) != (kv_segment_ids is None):
    raise ValueError("q_segment_ids and kv_segment_ids must be given together, got "
                     f"q_segment_ids={'None' if q_segment_ids is None else 'array'} and "
                     f"kv_segment_ids={'None' if kv_segment_ids is None else 'array'}")
  if q_segment_ids is not None:
    _segment_ids("q_segment_ids", q_segment_ids, batch + (T,))
    _segment_ids("kv_segment_ids", kv_segment_ids, batch + (S,))

  _check_static("is_causal", is_causal, "bool")
  _check_static("logits_soft_cap", logits_soft_cap, "float")
  window = None
  if local_window_size is not None:
    window = masks_lib.clamp_window(masks_lib.canonical_window(local_window_size), T, S,
                                    bool(is_causal))
  mask = masks_lib.from_arguments(mask, bool(is_causal), window, q_segment_ids, kv_segment_ids,
                                  batch, N, T, S)
  if scale is None:
    scale = 1.0 / math.sqrt(H)
  if logits_soft_cap is not None and not logits_soft_cap > 0:
    raise ValueError(f"logits_soft_cap must be positive (or inf for no cap), got "
                     f"{logits_soft_cap!r}")
  if logits_soft_cap is not None and math.isinf(logits_soft_cap):
    logits_soft_cap = None

  B = math.prod(batch)
  if score_mod is not None:
    _check_score_mod(score_mod, B, N, T, S)
  if sinks is not None:
    sinks = jnp.asarray(sinks)
    if not jnp.issubdtype(sinks.dtype, jnp.floating):
      raise TypeError(f"sinks must be floating point, got dtype {sinks.dtype}")
    if sinks.shape != (N,):
      raise ValueError(f"sinks must have shape [num_heads] = ({N},) (one logit per query "
                       f"head), got {sinks.shape}")
    sinks = sinks.astype(jnp.float32)
  return _Canonical(
      q=q.reshape(B, T, N, H), k=k.reshape(B, S, K, H), v=v.reshape(B, S, K, H),
      bias=bias, mask=mask, batch_shape=batch, scale=scale,
      logits_soft_cap=None if logits_soft_cap is None else float(logits_soft_cap),
      score_mod=score_mod, sinks=sinks)


def _check_score_mod(score_mod: Any, B: int, N: int, T: int, S: int) -> None:
  """Checks at trace time that score_mod maps float32 [B, N, T, S] scores to the same."""
  if not callable(score_mod):
    raise TypeError(f"score_mod must be a callable fn(score, batch, head, q_idx, kv_idx), "
                    f"got {type(score_mod).__name__}")
  score = jax.ShapeDtypeStruct((B, N, T, S), jnp.float32)
  indices = [jax.ShapeDtypeStruct(shape, jnp.int32) for shape in
             ((B, 1, 1, 1), (1, N, 1, 1), (1, 1, T, 1), (1, 1, 1, S))]
  out = jax.eval_shape(score_mod, score, *indices)
  if not hasattr(out, "shape") or out.shape != score.shape or out.dtype != score.dtype:
    got = (f"shape {out.shape} and dtype {out.dtype}" if hasattr(out, "shape")
           else type(out).__name__)
    raise ValueError(f"score_mod must return the score's shape {score.shape} and dtype "
                     f"float32 (it is elementwise), got {got}")


def _check_static(name: str, value: Any, kind: str) -> None:
  if isinstance(value, jax.core.Tracer):
    raise ValueError(f"{name} must be static (a Python {kind}), got a traced value {value}; "
                     f"pass it outside jit or as a static argument")
def _segment_ids(name: str, ids: ArrayLike, shape: tuple[int, ...]) -> Array:
  ids = jnp.asarray(ids)
  if not jnp.issubdtype(ids.dtype, jnp.integer):
    raise TypeError(f"{name} must be integers, got dtype {ids.dtype}")
  if ids.shape != shape:
    raise ValueError(f"{name} must have shape [..., length] = {shape}, got {ids.shape}")
  return ids.reshape(math.prod(shape[:-1]), shape[-1]).astype(jnp.int32)
