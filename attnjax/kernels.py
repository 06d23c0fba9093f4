"""Accelerator kernels behind ``dot_product_attention(..., implementation=...)``.

Shape letters: B batch, T query length, S key/value length, N query heads, K key/value heads,
G = N // K query heads per key/value head, H head dim; Tp, Sp lengths padded to a block.

  q  [B, T, N, H]     k, v  [B, S, K, H]     out  [B, T, N, H]     lse  [B, N, T]

Three kernels that ship with JAX take attnjax's arguments, layout and conventions:

- ``"cudnn"``: cuDNN's fused attention through ``jax.nn.dot_product_attention(...,
  implementation="cudnn")`` (GPU only; float16 or bfloat16).
- ``"pallas_gpu"``: the Pallas (Triton) FlashAttention kernel of
  ``jax.experimental.pallas.ops.gpu.attention``.
- ``"splash"``: Splash attention, the block-sparse Pallas TPU kernel of
  ``jax.experimental.pallas.ops.tpu.splash_attention``. attnjax's static masks become one
  Splash mask object (evaluated block by block, so fully hidden blocks are skipped), segment
  ids and lengths become Splash segment ids.

Each kernel honours a subset of the arguments (:data:`SUPPORT`); any other argument is a
``ValueError`` that names it and the implementations that support it, never a silently
different result. What each kernel keeps of attnjax's conventions: the scale, grouped-query
heads (query head n reads key/value head n // G), float32 softmax statistics, zeros (and zero
gradients) for a query that sees no key with lse ``-inf``, and ``return_lse`` (its lse
carries a gradient on ``"pallas_gpu"`` and ``"splash"``, whose backward passes take it in).
What they do not keep: a non-finite entry in a query, key or value vector may reach rows that
do not see it (as in ``jax.nn`` and the kernels themselves), where ``"xla"`` and
``"blockwise"`` confine it to the rows that see it.

On a machine without the kernel's hardware, ``"pallas_gpu"`` and ``"splash"`` run in Pallas's
interpret mode (for testing: correct but slow), with an :class:`InterpretModeWarning` (shown
once per call site by Python's default warning filter); ``"cudnn"`` needs a GPU.

References:
  Dao 2023, "FlashAttention-2: Faster Attention with Better Parallelism and Work Partitioning".
  Splash attention: ``jax/experimental/pallas/ops/tpu/splash_attention`` in JAX.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from typing import TYPE_CHECKING, Any, Literal, NamedTuple, get_args

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array

from attnjax import masks as masks_lib

if TYPE_CHECKING:
  from attnjax.attention import _Canonical

Kernel = Literal["cudnn", "pallas_gpu", "splash"]
#: The kernels, in the order ``implementation=None`` tries them on their hardware.
KERNELS: tuple[Kernel, ...] = get_args(Kernel)
_HARDWARE = {"cudnn": "gpu", "pallas_gpu": "gpu", "splash": "tpu"}

#: Which implementations support each argument (the pure-JAX ones are listed too, so that an
#: error can name every alternative). Mask kinds are the parts of the AND of every masking
#: argument: "causal" is ``is_causal`` (or ``masks.Causal()``), "causal_offset" a
#: ``masks.Causal(offset)`` with offset != 0, "window" ``local_window_size``, "segments"
#: ``q_segment_ids``/``kv_segment_ids``, "lengths" a ``masks.Lengths``, "static" any other mask
#: object of positions alone (``Chunked``, ``MaskFn``, their ``|`` and ``~``), "data" a bool
#: ``mask`` array or another mask of data (``PrefixLM``, ``|`` or ``~`` of data masks).
SUPPORT: dict[str, tuple[str, ...]] = {
    "causal": ("xla", "blockwise", "cudnn", "pallas_gpu", "splash"),
    "causal_offset": ("xla", "blockwise", "splash"),
    "window": ("xla", "blockwise", "cudnn", "splash"),
    "segments": ("xla", "blockwise", "pallas_gpu", "splash"),
    "lengths": ("xla", "blockwise", "cudnn", "splash"),
    "static": ("xla", "blockwise", "splash"),
    "data": ("xla", "blockwise"),
    "grouped_query": ("xla", "blockwise", "cudnn", "pallas_gpu", "splash"),
    "bias": ("xla", "blockwise"),
    "logits_soft_cap": ("xla", "blockwise", "splash"),
    "sinks": ("xla", "blockwise", "splash"),
    "score_mod": ("xla", "blockwise"),
    "return_lse": ("xla", "blockwise", "pallas_gpu", "splash"),
    "return_weights": ("xla",),
    "dropout_rate": ("xla",),
    "precision": ("xla",),
    "traced_scale": ("xla",),
}

# Logit of a hidden key, as in attnjax.attention and the kernels (exp() of it is 0).
_MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)
_LANES = 128  # Splash's key blocks are multiples of the TPU's 128 lanes.


class InterpretModeWarning(UserWarning):
  """A Pallas kernel runs in interpret mode (for testing; slow) on a machine without its
  hardware. Silence it with ``warnings.filterwarnings("ignore", category=...)``."""


def attention(c: _Canonical, implementation: str, *, return_lse: bool = False,
              dropout_rate: float = 0.0, return_weights: bool = False,
              precision: jax.lax.PrecisionLike = None, sinks: Array | None = None,
              score_mod: Any = None, backend: str | None = None) -> tuple[Array, Array | None]:
  """Runs kernel ``implementation`` on the canonical inputs of ``dot_product_attention``.

  Args:
    c: the validated inputs, batch dims flattened (``attnjax.attention._canonicalize``).
    implementation: one of :data:`KERNELS`.
    return_lse: also compute the log-sum-exp.
    dropout_rate, return_weights, precision, sinks, score_mod: the arguments of
      ``dot_product_attention``; each kernel refuses those it cannot honour.
    backend: the platform to run on; ``jax.default_backend()`` by default.

  Returns:
    ``(out [B, T, N, H], lse [B, N, T] float32 or None)``.

  Raises:
    ValueError: for an argument the kernel does not support (naming the implementations that
      do), or for ``"cudnn"`` without a GPU.
  """
  backend = backend or jax.default_backend()
  reason = unsupported(c, implementation, return_lse=return_lse, dropout_rate=dropout_rate,
                       return_weights=return_weights, precision=precision, sinks=sinks,
                       score_mod=score_mod)
  if reason is not None:
    raise ValueError(reason)
  if implementation == "cudnn":
    if backend != "gpu":
      raise ValueError(f"implementation='cudnn' needs a GPU (cuDNN), but the backend is "
                       f"{backend!r}; use 'xla' or 'blockwise' there")
    return _cudnn(c), None
  interpret = _interpret_mode(implementation, backend)
  if implementation == "pallas_gpu":
    out, lse = _pallas_gpu(c, interpret)
  else:
    out, lse = _splash(c, sinks, interpret)
  return out, (lse if return_lse else None)


def choose(c: _Canonical, backend: str, *, return_lse: bool = False,
           sinks: Array | None = None, score_mod: Any = None) -> Kernel | None:
  """The first kernel for ``backend`` that supports these arguments and shapes, or None.

  On ``"gpu"``: ``"cudnn"`` (float16/bfloat16, head dim a multiple of 8 up to 128), then
  ``"pallas_gpu"``; on ``"tpu"``: ``"splash"`` when both lengths are multiples of 128 (no
  padding); on other backends, none (interpret mode is never chosen).
  """
  for name in KERNELS:
    if _HARDWARE[name] != backend:
      continue
    reason = unsupported(c, name, return_lse=return_lse, sinks=sinks, score_mod=score_mod)
    if reason is None and _fits(c, name):
      return name
  return None


def unsupported(c: _Canonical, implementation: str, *, return_lse: bool = False,
                dropout_rate: float = 0.0, return_weights: bool = False,
                precision: jax.lax.PrecisionLike = None, sinks: Array | None = None,
                score_mod: Any = None) -> str | None:
  """Why kernel ``implementation`` cannot honour these arguments (a message), or None."""
  if implementation not in KERNELS:
    raise ValueError(f"implementation must be one of {KERNELS}, got {implementation!r}")
  asked = [("bias", "bias", c.bias is not None),
           ("logits_soft_cap", "logits_soft_cap", c.logits_soft_cap is not None),
           ("sinks", "sinks", sinks is not None),
           ("score_mod", "score_mod", score_mod is not None),
           ("return_lse", "return_lse=True", return_lse),
           ("return_weights", "return_weights=True", return_weights),
           ("dropout_rate", f"dropout_rate={dropout_rate}", dropout_rate > 0.0),
           ("precision", f"precision={precision!r}", precision is not None),
           ("traced_scale", "a traced scale", isinstance(c.scale, jax.core.Tracer))]
  asked += [(kind, describe, True) for kind, describe in _mask_parts(c.mask)]
  for feature, argument, given in asked:
    if given and implementation not in SUPPORT[feature]:
      return (f"{argument} is not supported by implementation={implementation!r}; "
              f"implementations that support it: {', '.join(SUPPORT[feature])}")
  return _shape_constraint(c, implementation)


# ------------------------------------------------------------------------------ masks


def _conjuncts(mask: masks_lib.Mask | None) -> list[masks_lib.Mask]:
  if mask is None:
    return []
  if isinstance(mask, masks_lib.And):
    return _conjuncts(mask.a) + _conjuncts(mask.b)
  return [mask]


def _is_static(mask: masks_lib.Mask) -> bool:
  """Whether ``mask`` depends on positions alone (no arrays of data)."""
  if isinstance(mask, (masks_lib.And, masks_lib.Or)):
    return _is_static(mask.a) and _is_static(mask.b)
  if isinstance(mask, masks_lib.Not):
    return _is_static(mask.a)
  return isinstance(mask, (masks_lib.Causal, masks_lib.LocalWindow, masks_lib.Chunked,
                           masks_lib.MaskFn))


def _mask_parts(mask: masks_lib.Mask | None) -> list[tuple[str, str]]:
  """(kind, how the caller asked for it) for each part of the AND of the masks."""
  parts = []
  for m in _conjuncts(mask):
    if isinstance(m, masks_lib.Causal):
      parts.append(("causal", "is_causal=True") if m.offset == 0 else
                   ("causal_offset", f"mask=Causal(offset={m.offset})"))
    elif isinstance(m, masks_lib.LocalWindow):
      parts.append(("window", f"local_window_size=({m.left}, {m.right})"))
    elif isinstance(m, masks_lib.Segments):
      parts.append(("segments", "q_segment_ids/kv_segment_ids"))
    elif isinstance(m, masks_lib.Lengths):
      parts.append(("lengths", "mask=Lengths(...)"))
    elif _is_static(m):
      parts.append(("static", f"mask={type(m).__name__}(...)"))
    elif isinstance(m, masks_lib._ArrayMask):  # noqa: SLF001
      parts.append(("data", "a bool mask array (mask=...)"))
    else:
      parts.append(("data", f"mask={type(m).__name__}(...)"))
  return parts


class _Parts(NamedTuple):
  """The parts of a mask that the kernels take apart."""
  causal: int | None  # smallest Causal offset, None if no Causal
  window: tuple[int, int] | None  # tightest (left, right) of the LocalWindows
  static: list[masks_lib.Mask]  # every mask of positions (Causal and windows included)
  segments: list[masks_lib.Segments]
  q_lengths: Array | None  # [B] int32, the smallest of the Lengths
  kv_lengths: Array | None


def _split(mask: masks_lib.Mask | None) -> _Parts:
  """The parts of ``mask``; masks of data other than segment ids and lengths are left out
  (the kernels refuse them first)."""
  causal: int | None = None
  window: tuple[int, int] | None = None
  q_len: Array | None = None
  kv_len: Array | None = None
  static, segments = [], []
  for m in _conjuncts(mask):
    if isinstance(m, masks_lib.Segments):
      segments.append(m)
    elif isinstance(m, masks_lib.Lengths):
      q_len = m.q_lengths if q_len is None else jnp.minimum(q_len, m.q_lengths)
      kv_len = m.kv_lengths if kv_len is None else jnp.minimum(kv_len, m.kv_lengths)
    elif _is_static(m):
      static.append(m)
      if isinstance(m, masks_lib.Causal):
        causal = m.offset if causal is None else min(causal, m.offset)
      elif isinstance(m, masks_lib.LocalWindow):
        window = ((m.left, m.right) if window is None
                  else (min(window[0], m.left), min(window[1], m.right)))
  return _Parts(causal, window, static, segments, q_len, kv_len)


def _shape_constraint(c: _Canonical, implementation: str) -> str | None:
  """What the kernel needs of the shapes, dtypes and masks beyond :data:`SUPPORT`, or None."""
  B, T, N, H = c.q.shape
  S = c.k.shape[1]
  if any(jax.export.is_symbolic_dim(n) for n in c.q.shape + c.k.shape):
    return (f"implementation={implementation!r} needs static shapes, got query {c.q.shape} "
            f"and key {c.k.shape}; use 'xla' or 'blockwise'")
  if 0 in (B, T, S, N, H):
    return (f"implementation={implementation!r} needs non-empty inputs, got query "
            f"{c.q.shape} and key {c.k.shape}; use 'xla' or 'blockwise'")
  parts = _split(c.mask)
  if implementation == "cudnn":
    if c.q.dtype not in (jnp.float16, jnp.bfloat16):
      return (f"implementation='cudnn' needs float16 or bfloat16 inputs, got {c.q.dtype}; "
              f"use 'pallas_gpu', 'xla' or 'blockwise' for {c.q.dtype}")
    if parts.window is not None and parts.window[1] > 0 and parts.causal is None:
      return (f"implementation='cudnn' takes a local window with a right side only under "
              f"is_causal=True, got local_window_size={parts.window} without it; "
              f"implementations that support it: xla, blockwise, splash")
  if implementation == "pallas_gpu":
    if T != S:
      return (f"implementation='pallas_gpu' needs as many queries as keys (its backward pass "
              f"cuts both into the same number of blocks), got T={T}, S={S}")
    if not (T % 128 == 0 or T in (16, 32, 64)):
      return (f"implementation='pallas_gpu' needs a length that is a multiple of 128 or one "
              f"of 16, 32, 64 (its Triton blocks), got T=S={T}")
    for seg in parts.segments:
      if not _same_ids(seg):
        return ("implementation='pallas_gpu' takes one array of segment ids for queries and "
                "keys: pass the same array as q_segment_ids and kv_segment_ids (got two "
                "different ones); implementations that support it: xla, blockwise, splash")
  if implementation == "splash" and len(parts.segments) > 1:
    return ("implementation='splash' takes one set of segment ids, got "
            f"{len(parts.segments)} Segments masks; use 'xla' or 'blockwise'")
  if implementation == "splash" and not all(_of_positions(m) for m in parts.static):
    return ("implementation='splash' evaluates masks of positions at trace time, but a "
            "mask=MaskFn(...) reads traced data; implementations that support it: xla, "
            "blockwise")
  return None


def _of_positions(mask: masks_lib.Mask) -> bool:
  """Whether a mask object can be evaluated at trace time (a MaskFn may read traced data)."""
  try:
    with jax.ensure_compile_time_eval():
      index = jnp.zeros((1, 1), jnp.int32)
      visible = mask(index, index, index, index)
  except jax.errors.ConcretizationTypeError:
    return False
  return not isinstance(visible, jax.core.Tracer)


def _same_ids(seg: masks_lib.Segments) -> bool:
  """Whether the query and key segment ids are one array (or equal concrete arrays)."""
  q, kv = seg.q_segment_ids, seg.kv_segment_ids
  if q is kv:
    return True
  if isinstance(q, jax.core.Tracer) or isinstance(kv, jax.core.Tracer) or q.shape != kv.shape:
    return False
  return bool(np.array_equal(np.asarray(q), np.asarray(kv)))


def _fits(c: _Canonical, implementation: str) -> bool:
  """Whether ``implementation=None`` should pick a supported kernel for these shapes."""
  H = c.q.shape[3]
  if implementation == "cudnn":
    return H % 8 == 0 and H <= 128
  if implementation == "splash":
    return c.q.shape[1] % _LANES == 0 and c.k.shape[1] % _LANES == 0
  return True


def _interpret_mode(implementation: str, backend: str) -> Any:
  """False on the kernel's hardware; else Pallas's interpret mode, with a warning."""
  if _HARDWARE[implementation] == backend:
    return False
  warnings.warn(f"implementation={implementation!r} runs in Pallas interpret mode on "
                f"backend {backend!r} (no {_HARDWARE[implementation].upper()}): for testing "
                f"only, and slow", InterpretModeWarning, stacklevel=4)
  # Plain interpret mode: the TPU-simulating one (pltpu.InterpretParams) does not take the
  # kernel under vmap in jax 0.10.2.
  return True


def _empty_to_zero(out_BTNH: Array, lse_BNT: Array) -> tuple[Array, Array]:
  """Zeros and lse -inf for the rows whose lse says that no key was visible."""
  empty = lse_BNT <= _MASK_VALUE / 2  # NaN (a non-finite input) is not empty.
  out = jnp.where(jnp.swapaxes(empty, 1, 2)[..., None], jnp.zeros((), out_BTNH.dtype), out_BTNH)
  return out, jnp.where(empty, -jnp.inf, lse_BNT)


# ------------------------------------------------------------------------------ cuDNN


def _cudnn(c: _Canonical, jax_nn_implementation: Literal["cudnn", "xla"] = "cudnn") -> Array:
  """cuDNN through ``jax.nn`` (``jax_nn_implementation="xla"`` checks the mapping on CPU)."""
  parts = _split(c.mask)
  B, T, _, _ = c.q.shape
  S = c.k.shape[1]
  window = parts.window
  if window is not None and parts.causal is not None:
    window = (window[0], 0)  # jax.nn's cuDNN path reads the left side only under causality.
  out = jax.nn.dot_product_attention(
      c.q, c.k, c.v, scale=float(c.scale), is_causal=parts.causal is not None,
      query_seq_lengths=parts.q_lengths, key_value_seq_lengths=parts.kv_lengths,
      local_window_size=window, implementation=jax_nn_implementation)
  # A query that sees no key: jax.nn returns the mean of the values there, attnjax zeros.
  # Key i + d is visible to query i for d in [lo, hi], cut to the keys [0, kv_len).
  i = jnp.arange(T, dtype=jnp.int32)[None, :]
  first = jnp.zeros((1, T), jnp.int32) if window is None else jnp.maximum(i - window[0], 0)
  last = jnp.full((1, T), S - 1, jnp.int32)
  if parts.causal is not None:
    last = jnp.minimum(last, i)
  if window is not None:
    last = jnp.minimum(last, i + window[1])
  empty = first > last
  if parts.q_lengths is not None and parts.kv_lengths is not None:
    empty = empty | (first >= parts.kv_lengths[:, None]) | (i >= parts.q_lengths[:, None])
  empty = jnp.broadcast_to(empty, (B, T))
  return jnp.where(empty[:, :, None, None], jnp.zeros((), out.dtype), out)


# ------------------------------------------------------------------------------ Pallas GPU


class _GpuStatic(NamedTuple):
  scale: float
  causal: bool
  interpret: Any


def _pallas_gpu(c: _Canonical, interpret: Any) -> tuple[Array, Array]:
  B, T, N, H = c.q.shape
  K = c.k.shape[2]
  parts = _split(c.mask)
  # The kernel reads key/value head n for query head n: repeat each group's head G times.
  k, v = (jnp.repeat(x, N // K, axis=2) for x in (c.k, c.v))
  segment_ids = parts.segments[0].q_segment_ids if parts.segments else None
  static = _GpuStatic(float(c.scale), parts.causal is not None, interpret)
  out, lse = _pallas_gpu_mha(static, c.q, k, v, segment_ids)
  return _empty_to_zero(out, lse)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _pallas_gpu_mha(static: _GpuStatic, q, k, v, segment_ids):
  return _pallas_gpu_fwd(static, q, k, v, segment_ids)[0]


def _pallas_gpu_fwd(static: _GpuStatic, q, k, v, segment_ids):
  from jax.experimental.pallas.ops.gpu import attention as gpu_attention  # noqa: PLC0415
  out, lse2 = gpu_attention.mha(q, k, v, segment_ids, sm_scale=static.scale,
                                causal=static.causal, interpret=static.interpret,
                                return_residuals=True)
  lse = lse2 * math.log(2)  # The kernel keeps its lse in base 2.
  return (out, lse), (q, k, v, segment_ids, out, lse2)


def _pallas_gpu_bwd(static: _GpuStatic, residuals, cotangents):
  """The kernel's own backward pass, with the lse's cotangent folded into its row term."""
  from jax.experimental import pallas as pl  # noqa: PLC0415
  from jax.experimental.pallas import triton as plgpu  # noqa: PLC0415
  from jax.experimental.pallas.ops.gpu import attention as gpu_attention  # noqa: PLC0415
  q, k, v, segment_ids, out, lse2 = residuals
  dout, dlse = cotangents
  # d(out.dout)/d logit_ij = p_ij (dout.v_j - delta_i) and d lse_i / d logit_ij = p_ij, so
  # the lse's cotangent enters as delta_i = out_i.dout_i - dlse_i.
  delta = jnp.einsum("btnh,btnh->bnt", out.astype(jnp.float32), dout.astype(jnp.float32))
  delta = delta - dlse
  B, T, N, H = q.shape
  blocks = gpu_attention.BlockSizes.get_default()
  block_q, block_k = min(blocks.block_q_dq, T), min(blocks.block_kv_dkv, T)
  Hp = pl.next_power_of_2(H)
  full_q = pl.BlockSpec((None, T, None, Hp), lambda i, j, _: (i, 0, j, 0))
  rows = pl.BlockSpec((None, None, T), lambda i, j, _: (i, j, 0))
  ids = None if segment_ids is None else pl.BlockSpec((None, T), lambda i, j, _: (i, 0))
  dq, dk, dv = pl.pallas_call(
      functools.partial(gpu_attention.mha_backward_kernel, sm_scale=static.scale,
                        causal=static.causal, block_q_dkv=block_q, block_kv_dkv=block_k,
                        block_q_dq=block_q, block_kv_dq=block_k, head_dim=H),
      out_shape=[jax.ShapeDtypeStruct.like(x) for x in (q, k, v)],
      in_specs=[full_q, full_q, full_q, ids, full_q, full_q, rows, rows],
      grid=(B, N, pl.cdiv(T, block_k)),
      out_specs=[pl.BlockSpec((None, b, None, Hp), lambda i, j, kb: (i, kb, j, 0))
                 for b in (block_q, block_k, block_k)],
      name="mha_backward",
      interpret=static.interpret,
      compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=2),
  )(q, k, v, segment_ids, out, dout, lse2, delta)
  return dq, dk, dv, None


_pallas_gpu_mha.defvjp(_pallas_gpu_fwd, _pallas_gpu_bwd)


# ------------------------------------------------------------------------------ Splash


@dataclasses.dataclass(frozen=True)
class _PositionRule:
  """The AND of attnjax masks of positions, and ``kv_idx < kv_len`` (the padding), as a
  function of query and key positions: Splash's ``mask_function``. Hashable (a static
  argument of the kernel), and it runs inside the kernel when ``in_kernel``."""
  masks: tuple[masks_lib.Mask, ...]
  kv_len: int
  head: int

  def __call__(self, q_idx, kv_idx):
    batch, head = np.zeros((1, 1), np.int32), np.full((1, 1), self.head, np.int32)
    visible = kv_idx < self.kv_len
    for m in self.masks:
      visible = visible & m(batch, head, q_idx, kv_idx)
    return visible


def _splash_mask_class():
  """Splash mask classes for attnjax's masks of positions (built on first use, so that
  importing attnjax does not import Pallas)."""
  from jax.experimental.pallas.ops.tpu.splash_attention import (  # noqa: PLC0415
      splash_attention_mask as splash_mask,
  )

  @dataclasses.dataclass(frozen=True, eq=True)
  class RuleMask(splash_mask.Mask):
    """A ``[Tp, Sp]`` mask evaluated block by block from a :class:`_PositionRule`."""
    rule: _PositionRule
    mask_shape: tuple[int, int]

    @property
    def shape(self):
      return self.mask_shape

    def __getitem__(self, idx):
      q_slice, kv_slice = (s.indices(n) for s, n in zip(idx, self.mask_shape))
      q_idx = np.arange(*q_slice, dtype=np.int32)[:, None]
      kv_idx = np.arange(*kv_slice, dtype=np.int32)[None, :]
      with jax.ensure_compile_time_eval():
        visible = self.rule(q_idx, kv_idx)
      return np.broadcast_to(np.asarray(visible, bool), (q_idx.shape[0], kv_idx.shape[1]))

  @dataclasses.dataclass(frozen=True, eq=True)
  class ComputedRuleMask(RuleMask):
    """A :class:`RuleMask` of comparisons only, which Splash evaluates inside the kernel
    (from ``q_sequence`` and ``mask_function``) instead of loading mask blocks."""

    @property
    def q_sequence(self):
      return np.arange(self.mask_shape[0], dtype=np.int32)

    @property
    def mask_function(self):
      return self.rule

  return RuleMask, ComputedRuleMask


def _in_kernel(mask: masks_lib.Mask) -> bool:
  """Whether a mask of positions is comparisons of positions only (safe inside a kernel)."""
  if isinstance(mask, (masks_lib.And, masks_lib.Or)):
    return _in_kernel(mask.a) and _in_kernel(mask.b)
  if isinstance(mask, masks_lib.Not):
    return _in_kernel(mask.a)
  return isinstance(mask, (masks_lib.Causal, masks_lib.LocalWindow))


def _splash_segment_ids(parts: _Parts, B: int, T: int, S: int, Tp: int, Sp: int):
  """Segment ids ``([B, Tp], [B, Sp])`` for the kernel, or None: attnjax's segment ids with
  the queries and keys past their lengths given ids that nothing else has."""
  if not parts.segments and parts.q_lengths is None:
    return None
  if parts.segments:
    seg = parts.segments[0]
    q_ids, kv_ids = seg.q_segment_ids, seg.kv_segment_ids
    # Rank the ids among all of the row's ids (equal ids, equal ranks), so that negative
    # numbers are free for padding whatever the caller's ids are.
    both = jnp.concatenate([q_ids, kv_ids], axis=1)
    ranks = jax.vmap(lambda s, x: jnp.searchsorted(s, x).astype(jnp.int32))(
        jnp.sort(both, axis=1), both)
    q_ids, kv_ids = ranks[:, :T], ranks[:, T:]
  else:
    q_ids, kv_ids = jnp.zeros((B, T), jnp.int32), jnp.zeros((B, S), jnp.int32)
  if parts.q_lengths is not None and parts.kv_lengths is not None:
    q_ids = jnp.where(jnp.arange(T)[None, :] < parts.q_lengths[:, None], q_ids, -1)
    kv_ids = jnp.where(jnp.arange(S)[None, :] < parts.kv_lengths[:, None], kv_ids, -2)
  return (jnp.pad(q_ids, ((0, 0), (0, Tp - T)), constant_values=-1),
          jnp.pad(kv_ids, ((0, 0), (0, Sp - S)), constant_values=-2))


class _SplashStatic(NamedTuple):
  block_sizes: Any  # splash BlockSizes
  mask_function: Any  # a _PositionRule, or None when mask blocks are loaded
  soft_cap: float | None
  interpret: Any


def _splash(c: _Canonical, sinks: Array | None, interpret: Any) -> tuple[Array, Array]:
  from jax.experimental.pallas.ops.tpu import splash_attention as splash  # noqa: PLC0415
  B, T, N, H = c.q.shape
  S = c.k.shape[1]
  Tp, Sp = -(-T // _LANES) * _LANES, -(-S // _LANES) * _LANES
  parts = _split(c.mask)
  RuleMask, ComputedRuleMask = _splash_mask_class()
  per_head = any(_has_fn(m) for m in parts.static)  # A MaskFn may read the head.
  rules = [_PositionRule(tuple(parts.static), S, h) for h in (range(N) if per_head else [0])]
  if all(_in_kernel(m) for m in parts.static) and not per_head:
    head_masks = [ComputedRuleMask(rules[0], (Tp, Sp))] * N
  else:
    head_masks = [RuleMask(rules[h if per_head else 0], (Tp, Sp)) for h in range(N)]
  block_sizes = splash.BlockSizes.get_default()
  kernel = splash.make_splash_mha(
      splash.MultiHeadMask(head_masks), block_sizes=block_sizes, head_shards=1, q_seq_shards=1,
      save_residuals=True, mask_value=_MASK_VALUE, attn_logits_soft_cap=c.logits_soft_cap,
      interpret=interpret)
  static = _SplashStatic(block_sizes, kernel.kwargs["mask_function"], c.logits_soft_cap,
                         interpret)
  infos = (kernel.fwd_mask_info, kernel.dq_mask_info, kernel.dkv_mask_info)

  # Splash takes [heads, length, head_dim] per example and no scale: scale q in float32.
  q = (c.q.astype(jnp.float32) * c.scale).astype(c.q.dtype)
  q_BNTH = jnp.pad(q, ((0, 0), (0, Tp - T), (0, 0), (0, 0))).transpose(0, 2, 1, 3)
  k_BKSH, v_BKSH = (jnp.pad(x, ((0, 0), (0, Sp - S), (0, 0), (0, 0))).transpose(0, 2, 1, 3)
                    for x in (c.k, c.v))
  segment_ids = _splash_segment_ids(parts, B, T, S, Tp, Sp)
  if sinks is not None:
    sinks = jnp.asarray(sinks, jnp.float32)
  out, lse = _splash_mha(static, infos, q_BNTH, k_BKSH, v_BKSH, segment_ids, sinks)
  return _empty_to_zero(out[:, :, :T].transpose(0, 2, 1, 3), lse[:, :, :T])


def _has_fn(mask: masks_lib.Mask) -> bool:
  if isinstance(mask, (masks_lib.And, masks_lib.Or)):
    return _has_fn(mask.a) or _has_fn(mask.b)
  if isinstance(mask, masks_lib.Not):
    return _has_fn(mask.a)
  return isinstance(mask, masks_lib.MaskFn)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _splash_mha(static: _SplashStatic, infos, q, k, v, segment_ids, sinks):
  return _splash_fwd(static, infos, q, k, v, segment_ids, sinks)[0]


def _splash_fwd(static: _SplashStatic, infos, q, k, v, segment_ids, sinks):
  from jax.experimental.pallas.ops.tpu.splash_attention import (  # noqa: PLC0415
      splash_attention_kernel as splash_kernel,
  )
  kernel = splash_kernel.SplashAttentionKernel(
      *infos, block_sizes=static.block_sizes, is_mqa=False, save_residuals=True,
      mask_value=_MASK_VALUE, attn_logits_soft_cap=static.soft_cap,
      residual_checkpoint_name=None, mask_function=static.mask_function,
      interpret=static.interpret)

  def one(q, k, v, ids):  # One example: [N, Tp, H], [K, Sp, H].
    out, (lse,) = kernel(q, k, v, None if ids is None else splash_kernel.SegmentIds(*ids),
                         sinks)
    return out, lse

  out, lse = jax.vmap(one)(q, k, v, segment_ids)
  return (out, lse), (infos, q, k, v, segment_ids, sinks, out, lse)


def _splash_bwd(static: _SplashStatic, residuals, cotangents):
  """Splash's dq and dkv kernels, with the lse's cotangent folded into their row term."""
  from jax.experimental.pallas.ops.tpu.splash_attention import (  # noqa: PLC0415
      splash_attention_kernel as splash_kernel,
  )
  infos, q, k, v, segment_ids, sinks, out, lse = residuals
  dout, dlse = cotangents
  # As in the Pallas GPU backward pass: delta_i = out_i.dout_i - dlse_i.
  delta = jnp.einsum("bnth,bnth->bnt", out.astype(jnp.float32), dout.astype(jnp.float32))
  delta = delta - dlse
  _, dq_info, dkv_info = (_collapse(info) for info in infos)
  bs = static.block_sizes
  common = dict(is_mqa=False, mask_value=_MASK_VALUE, attn_logits_soft_cap=static.soft_cap,
                q_layout=bs.q_layout, k_layout=bs.k_layout, v_layout=bs.v_layout,
                mask_function=static.mask_function, interpret=static.interpret)

  def one(q, k, v, ids, lse, dout, delta):
    ids = None if ids is None else splash_kernel.SegmentIds(*ids)
    args = (q, k, v, ids, sinks, lse, dout, delta)
    _, dk, dv = splash_kernel._splash_attention_bwd_dkv(  # noqa: SLF001
        *args, bq=bs.block_q_dkv, bkv=bs.block_kv_dkv, bkv_compute=bs.block_kv_dkv_compute,
        mask_info=dkv_info, use_fused_bwd_kernel=False, **common)
    dq = splash_kernel._splash_attention_bwd_dq(  # noqa: SLF001
        *args, bq=bs.block_q_dq, bkv=bs.block_kv_dq, mask_info=dq_info, **common)
    return dq, dk, dv

  dq, dk, dv = jax.vmap(one)(q, k, v, segment_ids, lse, dout, delta)
  dsinks = None
  if sinks is not None:  # d out / d sink = -p_sink out, d lse / d sink = p_sink.
    p_sink = jnp.exp(sinks[None, :, None] - lse)
    dsinks = -jnp.sum(p_sink * delta, axis=(0, 2))
  return None, dq, dk, dv, None, dsinks


def _collapse(info):
  """A MaskInfo with its partial mask blocks as ``[n, block_q, block_kv]`` (as Splash passes
  them to its kernels)."""
  if info is None or info.partial_mask_blocks is None:
    return info
  blocks = info.partial_mask_blocks
  return info._replace(partial_mask_blocks=blocks.reshape(-1, *blocks.shape[-2:]))


_splash_mha.defvjp(_splash_fwd, _splash_bwd)
