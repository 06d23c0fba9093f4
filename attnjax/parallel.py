"""Sequence parallelism: ring attention over a mesh axis, inside ``jax.shard_map``.

Shape letters: B batch (any number of leading dims in the public API), T query length, S
key/value length (both local to one device unless said otherwise), N query heads, K key/value
heads, H head dim; n devices on the sequence axis, C tokens per chunk.

  query  [..., T, N, H]     key, value  [..., S, K, H]     out  [..., T, N, H]   lse  [..., N, T]

The global sequence of n * T tokens is sharded over one mesh axis. ``layout="contiguous"``:
device d holds tokens ``[d T, (d + 1) T)``, as ``shard_map`` gives it. ``layout="zigzag"``:
the sequence is cut into 2n chunks of C = T / 2 tokens and device d holds chunks d and
2n - 1 - d (:func:`zigzag_permute` puts a sequence in that order, :func:`zigzag_unpermute`
back), so that under a causal mask every device has the same work: the contiguous layout
gives the last device n times the work of the first and makes the others wait for it.

``strategy="ring"``: each device keeps its queries while the key/value shards travel around
the ring of devices with ``lax.ppermute``; at each of n steps a device attends its queries to
the shard it holds (the blockwise path, :mod:`attnjax.blockwise`) and merges the result into
its running output by log-sum-exp. The backward pass (``jax.custom_vjp``) sends the key/value
shards around once more, each with its gradient accumulators, so that dK and dV arrive back
home after n steps; each step's gradients come from the global output and log-sum-exp, so they
are exactly the global gradients restricted to that pair of shards. No device ever holds more
than its own queries and one shard of keys and values (plus one arriving): memory per device
is linear in the local length. Masks use global positions: at each step, a pair of (query,
key) chunks that the causal or local-window mask hides entirely is skipped (``lax.switch``
over the cases that occur), one it shows entirely runs unmasked; :func:`ring_work` counts
the blocks each device computes. ``strategy="all_gather"`` gathers every key/value shard on
every device first (``lax.all_gather``; memory linear in the global length), which is faster
for short sequences; its gradients flow back by the gather's transpose, a reduce-scatter.

References:
  Liu et al. 2023, "Ring Attention with Blockwise Transformers for Near-Infinite Context".
  Brandon et al. 2023, "Striped Attention: Faster Ring Attention for Causal Transformers".
  Zhu 2024, "ring-flash-attention" (the zigzag layout).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Hashable
from typing import Any, Literal, get_args

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array, lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from jax.typing import ArrayLike

from attnjax import attention, blockwise
from attnjax import masks as masks_lib

Layout = Literal["contiguous", "zigzag"]
Strategy = Literal["ring", "all_gather"]

# Chunks of the global sequence that each device holds, per layout.
_CHUNKS_PER_DEVICE: dict[str, int] = {"contiguous": 1, "zigzag": 2}

# A local band (lo, hi): key j of a chunk is visible to query i of a chunk iff
# lo <= j - i <= hi (None: unbounded). None instead of a band: nothing is visible.
_Band = tuple[int | None, int | None]


def zigzag_permute(x: ArrayLike, num_devices: int, *, axis: int = -3) -> Array:
  """Reorders a global sequence into the zigzag layout of :func:`ring_attention`.

  The sequence is cut into ``2 * num_devices`` chunks and reordered as chunks
  ``0, 2n-1, 1, 2n-2, ...``, so that sharding the result evenly over n devices gives device d
  the chunks d and 2n - 1 - d.

  Args:
    x: array with the sequence on ``axis``.
    num_devices: n, the number of devices the sequence will be sharded over.
    axis: the sequence axis; -3 for queries, keys and values ``[..., T, N, H]``, -1 for
      segment ids ``[..., T]``.

  Returns:
    ``x`` with its sequence reordered, same shape.

  Raises:
    ValueError: if the length is not a multiple of ``2 * num_devices``.
  """
  return _permute_chunks(x, _zigzag_order(num_devices), axis)


def zigzag_unpermute(x: ArrayLike, num_devices: int, *, axis: int = -3) -> Array:
  """Inverse of :func:`zigzag_permute`: a sequence in zigzag layout back in order.

  Args:
    x: array with the sequence, in zigzag layout, on ``axis``.
    num_devices: n, as given to :func:`zigzag_permute`.
    axis: the sequence axis (-3 for ``[..., T, N, H]``, -1 for ``[..., N, T]`` or ``[..., T]``).

  Returns:
    ``x`` with its sequence in global order, same shape.

  Raises:
    ValueError: if the length is not a multiple of ``2 * num_devices``.
  """
  return _permute_chunks(x, np.argsort(_zigzag_order(num_devices)), axis)


def _zigzag_order(num_devices: int) -> np.ndarray:
  if not isinstance(num_devices, (int, np.integer)) or num_devices < 1:
    raise ValueError(f"num_devices must be a positive int, got {num_devices!r}")
  first = np.arange(num_devices)
  return np.stack([first, 2 * num_devices - 1 - first], axis=1).reshape(-1)


def _permute_chunks(x: ArrayLike, order: np.ndarray, axis: int) -> Array:
  x = jnp.asarray(x)
  if not -x.ndim <= axis < x.ndim:
    raise ValueError(f"axis {axis} is out of range for an array of shape {x.shape}")
  axis %= x.ndim
  length, m = x.shape[axis], len(order)
  if length % m:
    raise ValueError(f"the zigzag layout over {m // 2} devices needs a length that is a "
                     f"multiple of 2 * num_devices = {m}, got {length} (shape {x.shape}, "
                     f"axis {axis}); pad the sequence")
  chunks = x.reshape(x.shape[:axis] + (m, length // m) + x.shape[axis + 1:])
  return jnp.take(chunks, jnp.asarray(order), axis=axis).reshape(x.shape)


@dataclasses.dataclass(frozen=True)
class _Ring:
  """Static description of one sequence-parallel attention: the axis, the layout and the
  positional mask as a band ``lo <= kv_position - q_position <= hi`` over global positions
  (None: unbounded), with the options of the blockwise path."""
  axis_name: Hashable
  n: int
  chunks: int  # chunks per device: 1 (contiguous) or 2 (zigzag)
  lo: int | None
  hi: int | None
  scale: float
  soft_cap: float | None
  block_q: int | None
  block_k: int | None

  def chunk(self, slot: int, device: Any) -> Any:
    """Global chunk index of a device's chunk ``slot``."""
    return device if slot == 0 else 2 * self.n - 1 - device

  def band(self, offset: int, q_chunk: int, kv_chunk: int) -> _Band | None:
    """The local band of a query chunk against a key chunk ``offset`` positions later (key 0
    minus query 0, globally), None if it hides every key."""
    first, last = offset - (q_chunk - 1), offset + kv_chunk - 1  # range of kv_pos - q_pos
    if (self.hi is not None and first > self.hi) or (self.lo is not None and last < self.lo):
      return None
    return (None if self.lo is None or first >= self.lo else self.lo - offset,
            None if self.hi is None or last <= self.hi else self.hi - offset)

  def schedule(self, q_chunk: int, kv_chunk: int):
    """For each pair of slots (a, b): the distinct bands of query slot a against key slot b
    over all (device, source) pairs, and int ``[n, n]``: which of them device d uses when it
    holds the keys of device ``source``."""
    plans = {}
    for a in range(self.chunks):
      for b in range(self.chunks):
        bands, table = [], np.zeros((self.n, self.n), np.int32)
        for d in range(self.n):
          for src in range(self.n):
            offset = self.chunk(b, src) * kv_chunk - self.chunk(a, d) * q_chunk
            band = self.band(offset, q_chunk, kv_chunk)
            if band not in bands:
              bands.append(band)
            table[d, src] = bands.index(band)
        plans[a, b] = (bands, table)
    return plans


def _global_band(is_causal: bool, window, q_len: int, kv_len: int) -> _Band:
  """``(lo, hi)``: key j is visible to query i iff ``lo <= j - i <= hi`` (None: unbounded)."""
  lo = hi = None
  if window is not None:
    window = masks_lib.clamp_window(masks_lib.canonical_window(window), q_len, kv_len,
                                    is_causal)
    if window is not None:
      lo, hi = -window[0], window[1]
  if is_causal:
    hi = 0 if hi is None else min(hi, 0)
  return lo, hi


def _band_mask(band: _Band, q_seg: Array | None, kv_seg: Array | None) -> masks_lib.Mask | None:
  """The canonical mask object of a local band and the chunks' segment ids."""
  lo, hi = band
  parts: list[masks_lib.Mask] = []
  if hi is not None:
    parts.append(masks_lib.Causal(hi))  # j - i <= hi
  if lo is not None:
    parts.append(~masks_lib.Causal(lo - 1))  # not j - i <= lo - 1
  if q_seg is not None:
    assert kv_seg is not None  # Segment ids come in pairs.
    parts.append(masks_lib.Segments(q_seg, kv_seg))
  return functools.reduce(lambda a, b: a & b, parts) if parts else None


def _split(x: Array | None, parts: int, axis: int) -> list[Any]:
  return [None] * parts if x is None else jnp.split(x, parts, axis=axis)


def _switch(bands: list, table: np.ndarray, device, source, run: Callable, hidden: Callable,
            *operands):
  """``run(band, *operands)`` for the band that device uses with the keys of ``source``, or
  ``hidden(*operands)`` where that band hides everything; one ``lax.switch`` over the
  distinct bands (only the chosen one runs)."""
  branches = [hidden if band is None else functools.partial(run, band) for band in bands]
  if len(branches) == 1:
    return branches[0](*operands)
  return lax.switch(jnp.asarray(table)[device, source], branches, *operands)


def _attend_chunk(ring: _Ring, band: _Band, q, k, v, q_seg, kv_seg):
  """(out float32 [B, C, N, H], lse [B, N, C]) of a query chunk against a key chunk."""
  out, lse = blockwise.blockwise_attention(
      q, k, v, None, _band_mask(band, q_seg, kv_seg), scale=ring.scale, is_causal=False,
      window=None, q_segment_ids=None, kv_segment_ids=None, logits_soft_cap=ring.soft_cap,
      block_q=ring.block_q, block_k=ring.block_k)
  return out.astype(jnp.float32), lse


def _nothing_visible(q, k, v, q_seg, kv_seg):
  B, C, N, _ = q.shape
  return _varying((jnp.zeros(q.shape, jnp.float32), jnp.full((B, N, C), -jnp.inf, jnp.float32)),
                  q, k, v)


def _forward_step(ring: _Ring, device, source, q_parts, q_seg_parts, k, v, kv_seg, outs, lses):
  """Merges the attention of each query chunk to the keys of ``source`` into (outs, lses)."""
  k_parts, v_parts = _split(k, ring.chunks, 1), _split(v, ring.chunks, 1)
  kv_seg_parts = _split(kv_seg, ring.chunks, 1)
  plans = ring.schedule(q_parts[0].shape[1], k_parts[0].shape[1])
  outs, lses = list(outs), list(lses)
  for (a, b), (bands, table) in plans.items():
    if bands == [None]:  # This pair of chunks never sees anything (zigzag, causal).
      continue
    out, lse = _switch(bands, table, device, source, functools.partial(_attend_chunk, ring),
                       _nothing_visible, q_parts[a], k_parts[b], v_parts[b], q_seg_parts[a],
                       kv_seg_parts[b])
    outs[a], lses[a] = attention.merge_attention([outs[a], out], [lses[a], lse])
  return outs, lses


def _varying(tree, *like: Array):
  """``tree`` typed as varying over every mesh axis that an array of ``like`` varies over, as
  ``shard_map`` wants of a loop's initial carry that becomes varying in the loop."""
  axes = frozenset().union(*map(_varying_axes, like))

  def cast(x):
    missing = tuple(sorted(axes - _varying_axes(x), key=str))
    return lax.pcast(x, missing, to="varying") if missing else x
  return jax.tree.map(cast, tree)


def _varying_axes(x: Array) -> frozenset:
  """The mesh axes that ``x`` varies over inside ``shard_map`` (empty outside)."""
  return getattr(jax.typeof(x).manual_axis_type, "varying", frozenset())


def _init(ring: _Ring, q: Array, k: Array):
  """Empty running results for each query chunk: zeros and lse -inf."""
  parts = _split(q, ring.chunks, 1)
  return _varying(([jnp.zeros(x.shape, jnp.float32) for x in parts],
                   [jnp.full((x.shape[0], x.shape[2], x.shape[1]), -jnp.inf, jnp.float32)
                    for x in parts]), q, k)


def _finish(q: Array, outs, lses):
  return jnp.concatenate(outs, axis=1).astype(q.dtype), jnp.concatenate(lses, axis=2)


def _rotate(ring: _Ring, tree):
  """Every array of ``tree`` sent to the next device on the ring."""
  perm = [(i, (i + 1) % ring.n) for i in range(ring.n)]
  return jax.tree.map(lambda x: lax.ppermute(x, ring.axis_name, perm), tree)


def _ring_forward(ring: _Ring, q, k, v, q_seg, kv_seg):
  device = lax.axis_index(ring.axis_name)
  q_parts, q_seg_parts = _split(q, ring.chunks, 1), _split(q_seg, ring.chunks, 1)

  def step(carry, s):
    kv, (outs, lses) = carry
    arriving = _rotate(ring, kv)  # sent before the step's work, so that the two can overlap
    outs, lses = _forward_step(ring, device, (device - s) % ring.n, q_parts, q_seg_parts, *kv,
                               outs, lses)
    return (arriving, (outs, lses)), None

  (_, (outs, lses)), _ = lax.scan(step, ((k, v, kv_seg), _init(ring, q, k)), jnp.arange(ring.n))
  return _finish(q, outs, lses)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _ring(ring: _Ring, q, k, v, q_seg, kv_seg):
  return _ring_forward(ring, q, k, v, q_seg, kv_seg)


def _ring_fwd(ring, q, k, v, q_seg, kv_seg):
  out, lse = _ring_forward(ring, q, k, v, q_seg, kv_seg)
  return (out, lse), (q, k, v, q_seg, kv_seg, out, lse)


def _grad_chunk(ring: _Ring, band: _Band, q, k, v, q_seg, kv_seg, out, lse, dout, dlse):
  """Float32 (dq, dk, dv) of one query chunk against one key chunk, from global results."""
  return blockwise.blockwise_attention_backward(
      q, k, v, _band_mask(band, q_seg, kv_seg), out, lse, dout, dlse, scale=ring.scale,
      logits_soft_cap=ring.soft_cap, block_q=ring.block_q, block_k=ring.block_k)


def _no_grad(q, k, v, *rest):
  zeros = tuple(jnp.zeros(x.shape, jnp.float32) for x in (q, k, v))
  return _varying(zeros, q, k, v, *(x for x in rest if x is not None))


def _ring_bwd(ring, residuals, cotangents):
  q, k, v, q_seg, kv_seg, out, lse = residuals
  dout, dlse = cotangents
  device = lax.axis_index(ring.axis_name)
  split = functools.partial(_split, parts=ring.chunks, axis=1)
  q_parts, q_seg_parts, out_parts, dout_parts = map(split, (q, q_seg, out, dout))
  lse_parts, dlse_parts = _split(lse, ring.chunks, 2), _split(dlse, ring.chunks, 2)

  def step(carry, s):
    (k, v, kv_seg, dk, dv), dq = carry
    k_parts, v_parts, kv_seg_parts = map(split, (k, v, kv_seg))
    dq, dk, dv = split(dq), split(dk), split(dv)
    plans = ring.schedule(q_parts[0].shape[1], k_parts[0].shape[1])
    # Pairs of chunks one after the other (each waits for the last one's gradients), so that
    # XLA:CPU does not run them side by side with all their temporaries at once.
    token = None
    for (a, b), (bands, table) in plans.items():
      if bands == [None]:
        continue
      q_a, dout_a = blockwise._after(token, (q_parts[a], dout_parts[a]), True)
      grads = _switch(bands, table, device, (device - s) % ring.n,
                      functools.partial(_grad_chunk, ring), _no_grad, q_a, k_parts[b],
                      v_parts[b], q_seg_parts[a], kv_seg_parts[b], out_parts[a], lse_parts[a],
                      dout_a, dlse_parts[a])
      token = blockwise._token(*grads)
      dq[a], dk[b], dv[b] = dq[a] + grads[0], dk[b] + grads[1], dv[b] + grads[2]
    # The gradients of the keys travel with them: after n steps both are back home.
    kv = _rotate(ring, (k, v, kv_seg, jnp.concatenate(dk, 1), jnp.concatenate(dv, 1)))
    return (kv, jnp.concatenate(dq, 1)), None

  zeros = functools.partial(jnp.zeros, dtype=jnp.float32)
  init = ((k, v, kv_seg) + _varying((zeros(k.shape), zeros(v.shape)), q, k, v, dout),
          _varying(zeros(q.shape), q, k, v, dout))
  ((_, _, _, dk, dv), dq), _ = lax.scan(step, init, jnp.arange(ring.n))
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None


_ring.defvjp(_ring_fwd, _ring_bwd)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class _GlobalBand(masks_lib.Mask):
  """Key j is visible to query i iff ``lo <= j - (q_start + i) <= hi`` (None: unbounded),
  for a start known only at run time (from ``lax.axis_index``); its blocks are classified at
  run time."""
  q_start: Array
  lo: int | None = dataclasses.field(metadata=dict(static=True))
  hi: int | None = dataclasses.field(metadata=dict(static=True))

  def __call__(self, batch, head, q_idx, kv_idx):
    diff = kv_idx - (q_idx + self.q_start)
    visible = jnp.ones(diff.shape, bool)
    if self.lo is not None:
      visible &= diff >= self.lo
    if self.hi is not None:
      visible &= diff <= self.hi
    return visible

  def block_grid(self, q_len, kv_len, block_q, block_k, static_only=False):
    if static_only:
      return None, None
    q0, q1 = (x + self.q_start for x in _block_ranges(q_len, block_q))
    k0, k1 = _block_ranges(kv_len, block_k)
    first, last = k0[None, :] - q1[:, None], k1[None, :] - q0[:, None]
    empty, full = jnp.zeros(first.shape, bool), jnp.ones(first.shape, bool)
    if self.lo is not None:
      empty, full = empty | (last < self.lo), full & (first >= self.lo)
    if self.hi is not None:
      empty, full = empty | (first > self.hi), full & (last <= self.hi)
    return empty, full


def _block_ranges(length: int, block: int):
  """First and last index of each block, cut to ``length`` (int32 [nblocks])."""
  first = np.arange(-(-length // block)) * block
  return jnp.asarray(first, jnp.int32), jnp.asarray(np.minimum(first + block, length) - 1,
                                                     jnp.int32)


def _all_gather(ring: _Ring, q, k, v, q_seg, kv_seg):
  """Attention of each query chunk to every key, gathered on every device first (in device
  order, which is global order but for the zigzag layout); differentiable by JAX."""
  gather = functools.partial(lax.all_gather, axis_name=ring.axis_name, axis=1, tiled=True)
  k_all, v_all, kv_seg_all = jax.tree.map(gather, (k, v, kv_seg))
  if ring.chunks == 2:
    k_all, v_all, kv_seg_all = jax.tree.map(
        lambda x: zigzag_unpermute(x, ring.n, axis=1), (k_all, v_all, kv_seg_all))
  device = lax.axis_index(ring.axis_name)
  q_parts, q_seg_parts = _split(q, ring.chunks, 1), _split(q_seg, ring.chunks, 1)
  outs, lses = [], []
  for a, (q_a, q_seg_a) in enumerate(zip(q_parts, q_seg_parts)):
    start = ring.chunk(a, device) * q_a.shape[1]
    mask = None
    if (ring.lo, ring.hi) != (None, None):
      mask = _GlobalBand(jnp.asarray(start, jnp.int32), ring.lo, ring.hi)
    out, lse = attention.dot_product_attention(
        q_a, k_all, v_all, mask=mask, scale=ring.scale, q_segment_ids=q_seg_a,
        kv_segment_ids=kv_seg_all, logits_soft_cap=ring.soft_cap, return_lse=True,
        block_sizes=(None if ring.block_q is None or ring.block_k is None
                     else (ring.block_q, ring.block_k)))
    outs.append(out)
    lses.append(lse)
  return _finish(q, outs, lses)


# Strategies by name: each takes (ring, q, k, v, q_seg, kv_seg) and returns (out, lse).
_STRATEGIES: dict[str, Callable[..., tuple[Array, Array]]] = {
    "ring": _ring, "all_gather": _all_gather}


def ring_attention(
    query: ArrayLike,
    key: ArrayLike,
    value: ArrayLike,
    *,
    axis_name: Hashable,
    layout: Layout = "contiguous",
    strategy: Strategy = "ring",
    is_causal: bool = False,
    scale: float | None = None,
    local_window_size: int | tuple[int, int] | None = None,
    q_segment_ids: ArrayLike | None = None,
    kv_segment_ids: ArrayLike | None = None,
    logits_soft_cap: float | None = None,
    return_lse: bool = False,
    block_sizes: tuple[int, int] | None = None,
) -> Array | tuple[Array, Array]:
  """Attention over a sequence sharded along ``axis_name``; call it inside ``jax.shard_map``.

  Each device passes its shard of the queries, keys and values (and segment ids); the result
  is its shard of ``attnjax.dot_product_attention`` over the global sequence, with global
  positions for ``is_causal`` and ``local_window_size``. Queries and keys are sharded the same
  way; their lengths may differ (cross-attention), masks then align them top-left as
  :func:`attnjax.dot_product_attention` does.

  With segment ids, or with ``strategy="all_gather"`` and a causal or window mask, the
  blockwise path decides at run time which blocks to skip; this passes ``jax.shard_map``'s
  type checks (``check_vma=True``, the default).

  Args:
    query: this device's queries ``[..., T, N, H]``.
    key: this device's keys ``[..., S, K, H]`` (N a multiple of K: grouped-query attention).
    value: this device's values ``[..., S, K, H]``.
    axis_name: the ``shard_map`` mesh axis that the sequence is sharded over (n devices).
    layout: ``"contiguous"``: device d holds the d-th slice of n of the sequence;
      ``"zigzag"``: of 2n chunks of the sequence, device d holds chunks d and 2n - 1 - d
      (the global arrays are put in that order by :func:`zigzag_permute`, the output taken
      back by :func:`zigzag_unpermute`), which balances causal attention over the devices.
      T and S must then be even.
    strategy: ``"ring"`` rotates key/value shards around the devices (memory linear in the
      local length); ``"all_gather"`` gathers them all on every device first (memory linear
      in the global length; fewer, larger collectives, for short sequences).
    is_causal: key j is visible to query i iff ``j <= i`` in global positions.
    scale: logit scale (a Python float), ``1 / sqrt(H)`` by default.
    local_window_size: ``w`` or ``(left, right)``: key j is visible to query i iff
      ``i - left <= j <= i + right`` in global positions.
    q_segment_ids: int ``[..., T]``, this device's shard; with ``kv_segment_ids``, keys are
      visible only to queries of the same segment (packed documents).
    kv_segment_ids: int ``[..., S]``, this device's shard.
    logits_soft_cap: if given, logits become ``cap * tanh(logits / cap)``.
    return_lse: also return the log-sum-exp of the visible logits over the global sequence.
    block_sizes: ``(block_q, block_k)`` of the blockwise path (see
      :func:`attnjax.blockwise.default_block_sizes`), within each chunk of a step.

  Returns:
    ``out [..., T, N, H]`` in the input dtype, this device's shard of the output, and with
    ``return_lse`` also ``lse [..., N, T]`` (float32, ``-inf`` for a query that sees no key).

  Raises:
    ValueError: outside ``shard_map`` (``axis_name`` not bound), for an unknown ``layout`` or
      ``strategy``, odd local lengths under ``layout="zigzag"``, a traced ``scale``, and for
      every invalid argument that :func:`attnjax.dot_product_attention` refuses.
    TypeError: for inputs of the wrong dtype.

  References:
    Liu et al. 2023, "Ring Attention with Blockwise Transformers for Near-Infinite Context".
  """
  if layout not in _CHUNKS_PER_DEVICE:
    raise ValueError(f"layout must be one of {get_args(Layout)}, got {layout!r}")
  if strategy not in _STRATEGIES:
    raise ValueError(f"strategy must be one of {get_args(Strategy)}, got {strategy!r}")
  try:
    n = lax.axis_size(axis_name)
  except NameError:
    raise ValueError(f"ring_attention must run inside jax.shard_map with the sequence sharded "
                     f"over axis_name, got axis_name={axis_name!r}, which is not bound "
                     f"here") from None
  c = attention._canonicalize(query, key, value, None, None, is_causal, scale, None,
                              q_segment_ids, kv_segment_ids, logits_soft_cap)
  if isinstance(c.scale, jax.core.Tracer):
    raise ValueError("ring_attention needs a static scale (a Python float), got a traced value")
  T, S, chunks = c.q.shape[1], c.k.shape[1], _CHUNKS_PER_DEVICE[layout]
  if T % chunks or S % chunks:
    raise ValueError(f"layout='zigzag' needs even local lengths (two chunks per device), got "
                     f"query length {T} and key length {S}; the global length must be a "
                     f"multiple of 2 * {n} devices (pad the sequence)")
  lo, hi = _global_band(bool(is_causal), local_window_size, n * T, n * S)
  block_q, block_k = (None, None) if block_sizes is None else block_sizes
  ring = _Ring(axis_name=axis_name, n=n, chunks=chunks, lo=lo, hi=hi, scale=float(c.scale),
               soft_cap=c.logits_soft_cap, block_q=block_q, block_k=block_k)
  q_seg = kv_seg = None
  if q_segment_ids is not None:
    B = c.q.shape[0]
    q_seg = jnp.asarray(q_segment_ids).reshape(B, T).astype(jnp.int32)
    kv_seg = jnp.asarray(kv_segment_ids).reshape(B, S).astype(jnp.int32)
  out, lse = _STRATEGIES[strategy](ring, c.q, c.k, c.v, q_seg, kv_seg)
  out = out.reshape(c.batch_shape + out.shape[1:])
  if return_lse:
    return out, lse.reshape(c.batch_shape + lse.shape[1:])
  return out


def sharded_ring_attention(
    query: ArrayLike,
    key: ArrayLike,
    value: ArrayLike,
    *,
    mesh: Mesh,
    axis_name: Hashable,
    batch_axis_name: Hashable | None = None,
    head_axis_name: Hashable | None = None,
    q_segment_ids: ArrayLike | None = None,
    kv_segment_ids: ArrayLike | None = None,
    return_lse: bool = False,
    **options: Any,
) -> Array | tuple[Array, Array]:
  """:func:`ring_attention` on global arrays: runs ``jax.shard_map`` over ``mesh`` for you.

  The sequence is sharded over the mesh axis ``axis_name``, and optionally the first batch
  dim over ``batch_axis_name`` and the heads over ``head_axis_name`` (tensor parallelism);
  the arrays are replicated over the mesh's other axes (and resharded so if the mesh has
  explicit axes, as ``jax.make_mesh`` makes by default). Works under ``jax.jit`` and
  ``jax.grad``.

  Args:
    query: ``[..., T, N, H]``, the global queries (in zigzag order, from
      :func:`zigzag_permute`, under ``layout="zigzag"``).
    key: ``[..., S, K, H]``, the global keys, in the same layout.
    value: ``[..., S, K, H]``.
    mesh: the ``jax.sharding.Mesh`` holding ``axis_name`` (and the other axes named).
    axis_name: the mesh axis of the sequence, n devices.
    batch_axis_name: None, or the mesh axis to shard the first batch dim over.
    head_axis_name: None, or the mesh axis to shard the heads over (N and K must be multiples
      of its size).
    q_segment_ids: None or int ``[..., T]``, in the layout of ``query``.
    kv_segment_ids: None or int ``[..., S]``, in the layout of ``key``.
    return_lse: also return the log-sum-exp ``[..., N, T]``.
    **options: the other keyword arguments of :func:`ring_attention` (``layout``,
      ``strategy``, ``is_causal``, ``scale``, ``local_window_size``, ``logits_soft_cap``,
      ``block_sizes``).

  Returns:
    ``out [..., T, N, H]`` (and ``lse [..., N, T]``), global arrays in the input's layout.

  Raises:
    ValueError: if the global lengths are not multiples of n (of 2n under
      ``layout="zigzag"``), or the batch or head counts not multiples of their axes' sizes,
      and for everything :func:`ring_attention` refuses.
  """
  q, k, v = jnp.asarray(query), jnp.asarray(key), jnp.asarray(value)
  if q.ndim < 3 or k.ndim < 3:
    raise ValueError(f"query and key must have shape [..., length, heads, head_dim], got "
                     f"query {q.shape} and key {k.shape}")
  n = mesh.shape[axis_name]
  multiple = n * _CHUNKS_PER_DEVICE.get(options.get("layout", "contiguous"), 1)
  for name, length in (("query", q.shape[-3]), ("key", k.shape[-3])):
    if length % multiple:
      raise ValueError(f"{name} length {length} must be a multiple of {multiple} (the {n} "
                       f"devices of mesh axis {axis_name!r}"
                       f"{', two chunks each' if multiple > n else ''}); pad the sequence")
  batch_dims = q.ndim - 3
  if batch_axis_name is not None:
    if batch_dims == 0 or q.shape[0] % mesh.shape[batch_axis_name]:
      raise ValueError(f"the first batch dim must be a multiple of the "
                       f"{mesh.shape[batch_axis_name]} devices of mesh axis "
                       f"{batch_axis_name!r}, got query shape {q.shape}")
  if head_axis_name is not None:
    size = mesh.shape[head_axis_name]
    if q.shape[-2] % size or k.shape[-2] % size:
      raise ValueError(f"query and key heads must be multiples of the {size} devices of mesh "
                       f"axis {head_axis_name!r}, got query {q.shape} and key {k.shape}")
  lead = (batch_axis_name,) + (None,) * (batch_dims - 1) if batch_dims else ()
  qkv_spec = P(*lead, axis_name, head_axis_name, None)
  seg_spec = P(*lead, axis_name)
  lse_spec = P(*lead, head_axis_name, axis_name)
  segments = None if q_segment_ids is None else (q_segment_ids, kv_segment_ids)

  if jax.sharding.AxisType.Explicit in mesh.axis_types:  # (shard_map reshards Auto axes)
    def shard(x, spec):
      return jax.sharding.reshard(x, NamedSharding(mesh, spec))
    q, k, v = (shard(x, qkv_spec) for x in (q, k, v))
    segments = jax.tree.map(lambda x: shard(x, seg_spec), segments)

  def local(q, k, v, segments):
    q_seg, kv_seg = (None, None) if segments is None else segments
    return ring_attention(q, k, v, axis_name=axis_name, q_segment_ids=q_seg,
                          kv_segment_ids=kv_seg, return_lse=True, **options)

  out, lse = jax.shard_map(
      local, mesh=mesh, in_specs=(qkv_spec, qkv_spec, qkv_spec, seg_spec),
      out_specs=(qkv_spec, lse_spec))(q, k, v, segments)
  return (out, lse) if return_lse else out


def ring_attention_fn(mesh: Mesh, axis_name: Hashable, *,
                      batch_axis_name: Hashable | None = None,
                      head_axis_name: Hashable | None = None,
                      **options: Any) -> Callable[..., Any]:
  """An ``attention_fn`` that runs :func:`sharded_ring_attention` over ``mesh``.

  For the ``attention_fn`` hook of :func:`attnjax.multi_head_attention` and of the Linen and
  NNX modules, so that a model built for one device attends with the sequence sharded over
  ``axis_name``. It takes global ``query [..., T, N, H]`` and ``key``, ``value``
  ``[..., S, K, H]`` and:

  * pads T and S to multiples of the n devices of ``axis_name`` (the padding keys hidden by
    segment ids, the padding queries dropped from the output), so any length works;
  * shards the first batch dim over ``batch_axis_name`` and the heads over
    ``head_axis_name`` where their sizes divide it (and replicates it over that axis where
    not: e.g. a batch of one while decoding);
  * turns a key-padding ``mask`` (bool, broadcastable to ``[..., 1, 1, S]``, True =
    attend) into segment ids;
  * with ``return_weights=True`` (attention maps, which ring attention never forms) runs
    :func:`attnjax.dot_product_attention` instead, with ``implementation`` and
    ``precision``, which the ring ignores.

  Other options (``bias``, dropout, ``sinks``, ``score_mod``) are refused by
  :func:`attnjax.multi_head_attention` (a TypeError) when they are set.

  Args:
    mesh: the mesh.
    axis_name: the mesh axis of the sequence.
    batch_axis_name: the mesh axis of the batch, or None.
    head_axis_name: the mesh axis of the heads (tensor parallelism), or None.
    **options: ``strategy`` and ``block_sizes`` of :func:`ring_attention` (the layout is
      contiguous).

  Returns:
    ``attention_fn(query, key, value, *, mask, is_causal, local_window_size,
    q_segment_ids, kv_segment_ids, logits_soft_cap, return_weights, implementation,
    precision) -> out [..., T, N, H]`` (or ``(out, weights)`` with ``return_weights``).

  Raises:
    ValueError: (when called) for a mask that is not a key-padding mask, or a mask together
      with segment ids.
  """
  def attention_fn(query, key, value, *, mask=None, is_causal=False, local_window_size=None,
                   q_segment_ids=None, kv_segment_ids=None, logits_soft_cap=None,
                   return_weights=False, implementation=None, precision=None):
    common = dict(is_causal=is_causal, local_window_size=local_window_size,
                  q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids,
                  logits_soft_cap=logits_soft_cap)
    if return_weights:
      return attention.dot_product_attention(
          query, key, value, mask=mask, return_weights=True, implementation=implementation,
          precision=precision, **common)
    q, k, v = jnp.asarray(query), jnp.asarray(key), jnp.asarray(value)
    batch, T, S = q.shape[:-3], q.shape[-3], k.shape[-3]
    q_seg, kv_seg = q_segment_ids, kv_segment_ids
    if mask is not None:
      if (isinstance(mask, masks_lib.Mask) or jnp.ndim(mask) < 3
          or jnp.shape(mask)[-3:-1] != (1, 1) or q_seg is not None):
        raise ValueError(f"ring_attention_fn takes only a key-padding mask [..., 1, 1, S] "
                         f"and no segment ids with it, got mask "
                         f"{getattr(mask, 'shape', mask)!r}")
      visible = jnp.broadcast_to(jnp.asarray(mask)[..., 0, 0, :], batch + (S,))
      q_seg, kv_seg = jnp.zeros(batch + (T,), jnp.int32), visible.astype(jnp.int32) - 1
    n = mesh.shape[axis_name]
    pad_q, pad_kv = -T % n, -S % n
    if pad_q or pad_kv:
      if q_seg is None:
        q_seg, kv_seg = jnp.zeros(batch + (T,), jnp.int32), jnp.zeros(batch + (S,), jnp.int32)
      q_seg = jnp.broadcast_to(jnp.asarray(q_seg, jnp.int32), batch + (T,))
      kv_seg = jnp.broadcast_to(jnp.asarray(kv_seg, jnp.int32), batch + (S,))
      hidden = jnp.minimum(q_seg.min(), kv_seg.min()) - 1  # An id no real token has.

      def pad(x, amount, axis, value=0):
        widths = [(0, 0)] * x.ndim
        widths[axis] = (0, amount)
        return jnp.pad(x, widths, constant_values=value)
      q, k, v = pad(q, pad_q, -3), pad(k, pad_kv, -3), pad(v, pad_kv, -3)
      q_seg, kv_seg = pad(q_seg, pad_q, -1, hidden), pad(kv_seg, pad_kv, -1, hidden)
    def if_divides(name, dims):
      return name if name is not None and all(d % mesh.shape[name] == 0 for d in dims) else None
    out = sharded_ring_attention(
        q, k, v, mesh=mesh, axis_name=axis_name,
        batch_axis_name=if_divides(batch_axis_name, batch[:1]) if batch else None,
        head_axis_name=if_divides(head_axis_name, (q.shape[-2], k.shape[-2])),
        q_segment_ids=q_seg, kv_segment_ids=kv_seg, is_causal=is_causal,
        local_window_size=local_window_size, logits_soft_cap=logits_soft_cap, **options)
    return out[..., :T, :, :]
  return attention_fn


def ring_work(num_devices: int, q_len: int, kv_len: int | None = None, *,
              layout: Layout = "contiguous", is_causal: bool = False,
              local_window_size: int | tuple[int, int] | None = None,
              block_sizes: tuple[int, int] = (512, 512)) -> np.ndarray:
  """Blocks of logits that each device computes in :func:`ring_attention`'s forward pass.

  Counts the (query block, key block) pairs that the blockwise path visits on each device over
  all n steps of the ring, with the given block sizes (segment ids, which can skip more at run
  time, are not counted). A measure of load balance: the slowest device sets the pace.

  Args:
    num_devices: n.
    q_len: global query length.
    kv_len: global key length, ``q_len`` by default.
    layout: as in :func:`ring_attention`.
    is_causal: as in :func:`ring_attention`.
    local_window_size: as in :func:`ring_attention`.
    block_sizes: ``(block_q, block_k)``.

  Returns:
    int ``[n]``: block pairs visited by each device.
  """
  kv_len = q_len if kv_len is None else kv_len
  chunks = _CHUNKS_PER_DEVICE[layout]
  q_chunk, kv_chunk = q_len // (chunks * num_devices), kv_len // (chunks * num_devices)
  lo, hi = _global_band(is_causal, local_window_size, q_len, kv_len)
  ring = _Ring(axis_name=None, n=num_devices, chunks=chunks, lo=lo, hi=hi, scale=1.0,
               soft_cap=None, block_q=None, block_k=None)
  bq, bk = min(block_sizes[0], q_chunk), min(block_sizes[1], kv_chunk)

  def blocks(band):
    if band is None:
      return 0
    mask = _band_mask(band, None, None)
    empty, _ = masks_lib.static_block_grid(mask, q_chunk, kv_chunk, bq, bk)
    return int(np.logical_not(empty).sum())

  work = np.zeros(num_devices, np.int64)
  for bands, table in ring.schedule(q_chunk, kv_chunk).values():
    work += np.array([sum(blocks(bands[i]) for i in row) for row in table])
  return work
