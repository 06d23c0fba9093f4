"""Ready-made score modifiers: ALiBi, T5 relative bias, FIRE and soft-capping, and
``AtPositions`` to read any of them at position ids instead of indices.

A score modifier is a callable ``score_mod(score, batch, head, q_idx, kv_idx) -> score``
(FlexAttention's signature), applied elementwise to the float32 logits ``scale * q.k`` before
the bias and the masks. Its arguments are broadcastable arrays of one rank::

  score   float32 [B, N, T, S]    (T, S may be a block of the query and key lengths)
  batch   int32   [B, 1, 1, 1]    batch index
  head    int32   [1, N, 1, 1]    query head index
  q_idx   int32   [1, 1, T, 1]    absolute query position
  kv_idx  int32   [1, 1, 1, S]    absolute key position

Each modifier here is a frozen dataclass registered as a JAX pytree: learnable arrays are its
data fields (leaves, so gradients and optimizers reach them), configuration its static fields.
They work under ``jit``, ``vmap`` and ``grad``, and under ``jax_numpy_rank_promotion="raise"``.
``materialize`` turns an additive modifier into a dense bias ``[B, N, T, S]``.

References:
  - Press et al. 2022, "Train Short, Test Long: Attention with Linear Biases Enables Input
    Length Extrapolation" (ALiBi).
  - Raffel et al. 2020, "Exploring the Limits of Transfer Learning with a Unified
    Text-to-Text Transformer" (T5 relative position buckets).
  - Li et al. 2024, "Functional Interpolation for Relative Positions Improves Long Context
    Transformers", ICLR 2024, arXiv:2310.04418 (FIRE).
  - Gemma Team 2024, "Gemma 2: Improving Open Language Models at a Practical Size"
    (soft-capping).
  - Dong et al. 2024, "Flex Attention: A Programming Model for Generating Optimized Attention
    Kernels" (the score_mod signature).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import Array
from jax.typing import ArrayLike

ScoreMod = Callable[[Array, Array, Array, Array, Array], Array]
"""``score_mod(score, batch, head, q_idx, kv_idx) -> score``, all broadcastable arrays."""


def alibi_slopes(num_heads: int) -> Array:
  """The standard ALiBi head slopes, a geometric sequence.

  For ``num_heads`` n a power of two, head h (from 0) has slope ``2^(-8 (h + 1) / n)``: 1/2,
  1/4, ..., 1/256 for 8 heads. Otherwise, with p the largest power of two below n, the p
  slopes of p heads come first, then every other slope of 2p heads (the 1st, 3rd, ...) up to
  n in all, as ``get_slopes`` in the paper's code does.

  Args:
    num_heads: number of heads N, positive.

  Returns:
    float32 ``[N]``.

  Raises:
    ValueError: for a non-positive or non-int ``num_heads``.

  References:
    Press et al. 2022, section 3; github.com/ofirpress/attention_with_linear_biases.
  """
  if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads <= 0:
    raise ValueError(f"num_heads must be a positive int, got {num_heads!r}")

  def power_of_two(n: int) -> list[float]:
    return [2.0 ** (-8.0 * (h + 1) / n) for h in range(n)]

  def slopes(n: int) -> list[float]:
    if n & (n - 1) == 0:
      return power_of_two(n)
    p = 2 ** math.floor(math.log2(n))
    return power_of_two(p) + slopes(2 * p)[0::2][: n - p]

  return jnp.asarray(slopes(num_heads), jnp.float32)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ALiBi:
  """Attention with Linear Biases: a head-specific penalty linear in the distance.

  ``score + slope[head] * (kv_idx - q_idx)`` (the paper's ``-m (i - j)`` for query i, key j):
  zero on the diagonal, more negative for keys further in the past. This is the causal form;
  it rewards future keys, so for non-causal attention use ``symmetric=True``, which gives
  ``score - slope[head] * |q_idx - kv_idx|``.

  Args:
    slopes: float ``[N]``, the slope of each query head (``alibi_slopes(N)`` gives the
      paper's; they are a leaf, so they may be learned).
    symmetric: static; penalize past and future keys alike by their distance.

  References:
    Press et al. 2022, "Train Short, Test Long: Attention with Linear Biases Enables Input
    Length Extrapolation".
  """

  slopes: ArrayLike
  symmetric: bool = dataclasses.field(default=False, metadata=dict(static=True))

  def __call__(self, score: Array, batch: Array, head: Array, q_idx: Array,
               kv_idx: Array) -> Array:
    slopes = jnp.asarray(self.slopes)
    if slopes.ndim != 1:
      raise ValueError(f"ALiBi slopes must have shape [num_heads], got {slopes.shape}")
    distance = _float(kv_idx) - _float(q_idx)  # [1, 1, T, S]
    if self.symmetric:
      distance = -jnp.abs(distance)
    return _add(score, slopes.astype(jnp.float32)[head] * distance)


def t5_relative_position_bucket(
    relative_position: ArrayLike,
    *,
    bidirectional: bool = True,
    num_buckets: int = 32,
    max_distance: int = 128,
) -> Array:
  """T5's bucket of a relative position ``kv_idx - q_idx``, as in Mesh TensorFlow.

  With ``n = q_idx - kv_idx``: when bidirectional, half the buckets go to each direction
  (keys after the query take the upper half) and ``n = |n|``; otherwise ``n = max(n, 0)`` (all
  future keys share bucket 0). Of the ``b`` buckets left, distances below ``b // 2`` get one
  bucket each; larger ones ``b // 2 + int(log(n / (b // 2)) / log(max_distance / (b // 2)) *
  (b - b // 2))`` computed in float32, at most ``b - 1``.

  Args:
    relative_position: int array, ``kv_idx - q_idx``, any shape.
    bidirectional: whether keys after the query get their own buckets.
    num_buckets: total number of buckets (at least 2, or 4 when bidirectional).
    max_distance: distance from which all keys share the last bucket; more than half the
      buckets of one direction.

  Returns:
    int32 buckets in ``[0, num_buckets)``, the shape of ``relative_position``.

  Raises:
    TypeError: for a non-integer ``relative_position``.
    ValueError: for too few buckets or too small a ``max_distance``.

  References:
    Raffel et al. 2020, section 2.1; ``_relative_position_bucket`` in Mesh TensorFlow's
    ``transformer/transformer_layers.py``.
  """
  relative_position = jnp.asarray(relative_position)
  if not jnp.issubdtype(relative_position.dtype, jnp.integer):
    raise TypeError(f"relative_position must be an int array, got dtype "
                    f"{relative_position.dtype}")
  if bidirectional:
    if not isinstance(num_buckets, int) or num_buckets < 4:
      raise ValueError(f"num_buckets must be an int >= 4 when bidirectional, got "
                       f"{num_buckets!r}")
    num_buckets //= 2
  elif not isinstance(num_buckets, int) or num_buckets < 2:
    raise ValueError(f"num_buckets must be an int >= 2, got {num_buckets!r}")
  max_exact = num_buckets // 2
  if not max_distance > max_exact:
    raise ValueError(f"max_distance must exceed the {max_exact} exact buckets of a direction, "
                     f"got {max_distance!r}")
  n = -relative_position.astype(jnp.int32)
  bucket = jnp.zeros_like(n)
  if bidirectional:
    bucket = bucket + (n < 0).astype(jnp.int32) * num_buckets
    n = jnp.abs(n)
  else:
    n = jnp.maximum(n, 0)
  log_ratio = jnp.log(jnp.maximum(n, max_exact).astype(jnp.float32) / max_exact)
  large = max_exact + (log_ratio / math.log(max_distance / max_exact)
                       * (num_buckets - max_exact)).astype(jnp.int32)
  large = jnp.minimum(large, num_buckets - 1)
  return bucket + jnp.where(n < max_exact, n, large)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class T5RelativeBias:
  """T5's learned relative position bias: one scalar per (bucket, head).

  ``score + table[t5_relative_position_bucket(kv_idx - q_idx), head]``.

  Args:
    table: float ``[num_buckets, N]``, learnable (a leaf).
    num_buckets: static; the number of buckets, ``table.shape[0]``.
    max_distance: static; distance from which all keys share the last bucket.
    bidirectional: static; whether keys after the query get their own buckets (T5's encoder
      and encoder-decoder attention; its decoder self-attention uses False).

  References:
    Raffel et al. 2020, "Exploring the Limits of Transfer Learning with a Unified Text-to-Text
    Transformer", section 2.1.
  """

  table: ArrayLike
  num_buckets: int = dataclasses.field(default=32, metadata=dict(static=True))
  max_distance: int = dataclasses.field(default=128, metadata=dict(static=True))
  bidirectional: bool = dataclasses.field(default=True, metadata=dict(static=True))

  def __call__(self, score: Array, batch: Array, head: Array, q_idx: Array,
               kv_idx: Array) -> Array:
    table = jnp.asarray(self.table)
    if table.ndim != 2 or table.shape[0] != self.num_buckets:
      raise ValueError(f"T5RelativeBias table must have shape [num_buckets={self.num_buckets}, "
                       f"num_heads], got {table.shape}")
    bucket = t5_relative_position_bucket(
        kv_idx - q_idx, bidirectional=self.bidirectional, num_buckets=self.num_buckets,
        max_distance=self.max_distance)  # [1, 1, T, S]
    return _add(score, table.astype(jnp.float32)[bucket, head])


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class FIRE:
  """Functional Interpolation for Relative Positions: a learned function of the distance.

  For query position i and key position j, ``score + f(psi(i - j) / psi(max(L, i)))[head]``
  with ``psi(x) = log(|c x| + 1)``, ``L = |threshold_multiplier * init_threshold|`` and f an
  MLP ``1 -> K -> N`` with a ReLU: ``f(x) = relu(x kernel_in + bias_in) kernel_out +
  bias_out``. As in the paper's code, the denominator gets ``+ eps``, and L is learned through
  a multiplier of a fixed initial value (so that an optimizer's steps on it are relative).
  FIRE is meant for causal attention (``j <= i``); for keys after the query it uses
  ``|i - j|``, as the paper's code does.

  Args:
    kernel_in: float ``[1, K]``, first layer weights.
    bias_in: float ``[K]``.
    kernel_out: float ``[K, N]``, second layer weights, one column per query head.
    bias_out: float ``[N]``.
    c: float scalar, the log transform's scale.
    threshold_multiplier: float scalar; L is ``|threshold_multiplier * init_threshold|``.
    init_threshold: static float, L's initial value.
    eps: static float added to the denominator.

  References:
    Li et al. 2024, "Functional Interpolation for Relative Positions Improves Long Context
    Transformers", ICLR 2024, arXiv:2310.04418, section 3.2 and appendix (code).
  """

  kernel_in: ArrayLike
  bias_in: ArrayLike
  kernel_out: ArrayLike
  bias_out: ArrayLike
  c: ArrayLike
  threshold_multiplier: ArrayLike
  init_threshold: float = dataclasses.field(default=512.0, metadata=dict(static=True))
  eps: float = dataclasses.field(default=1e-6, metadata=dict(static=True))

  def __call__(self, score: Array, batch: Array, head: Array, q_idx: Array,
               kv_idx: Array) -> Array:
    params = {name: jnp.asarray(getattr(self, name), jnp.float32) for name in (
        "kernel_in", "bias_in", "kernel_out", "bias_out", "c", "threshold_multiplier")}
    K, N = params["kernel_out"].shape if params["kernel_out"].ndim == 2 else (-1, -1)
    want = dict(kernel_in=(1, K), bias_in=(K,), kernel_out=(K, N), bias_out=(N,), c=(),
                threshold_multiplier=())
    for name, shape in want.items():
      if params[name].shape != shape or K < 1:
        raise ValueError(f"FIRE {name} must have shape {shape} (kernel_out [K, N]), got "
                         f"{params[name].shape}")
    c = params["c"]
    i, j = _float(q_idx), _float(kv_idx)  # [1, 1, T, 1], [1, 1, 1, S]
    threshold = jnp.abs(params["threshold_multiplier"] * self.init_threshold)
    numerator = jnp.log(jnp.abs(c * (i - j)) + 1.0)
    denominator = jnp.log(jnp.abs(c * jnp.maximum(i, threshold)) + 1.0) + self.eps
    x = (numerator / denominator)[..., None]  # [1, 1, T, S, 1]
    ones = (1,) * (x.ndim - 1)
    hidden = jax.nn.relu(x * params["kernel_in"].reshape(*ones, K)
                         + params["bias_in"].reshape(*ones, K))
    out = hidden @ params["kernel_out"] + params["bias_out"].reshape(*ones, N)  # [1,1,T,S,N]
    return _add(score, jnp.take_along_axis(out, head[..., None], axis=-1)[..., 0])


def init_fire(
    rng: Array,
    num_heads: int,
    *,
    hidden: int = 32,
    c: float = 0.1,
    L: float = 512.0,
    eps: float = 1e-6,
) -> FIRE:
  """A FIRE modifier with the paper's initialization.

  The defaults are the paper's (Li et al. 2024, appendix code): a 32-wide MLP, ``c = 0.1``,
  ``L = 512`` (``threshold_multiplier = 1``), ``eps = 1e-6``. The MLP layers start as PyTorch's
  ``nn.Linear`` does, as in that code: weights and biases uniform in ``+-1 / sqrt(fan_in)``.

  Args:
    rng: a ``jax.random.key``.
    num_heads: number of query heads N.
    hidden: MLP width K.
    c: initial log-transform scale.
    L: initial threshold (static in the result, as ``init_threshold``).
    eps: added to the denominator.

  Returns:
    A ``FIRE`` with float32 leaves.

  Raises:
    ValueError: for a non-positive ``num_heads`` or ``hidden``.
  """
  for name, value in (("num_heads", num_heads), ("hidden", hidden)):
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
      raise ValueError(f"{name} must be a positive int, got {value!r}")
  rng_kernel_in, rng_bias_in, rng_kernel_out, rng_bias_out = jax.random.split(rng, 4)

  def uniform(rng, shape, fan_in):
    bound = 1.0 / math.sqrt(fan_in)
    return jax.random.uniform(rng, shape, jnp.float32, -bound, bound)

  return FIRE(
      kernel_in=uniform(rng_kernel_in, (1, hidden), 1),
      bias_in=uniform(rng_bias_in, (hidden,), 1),
      kernel_out=uniform(rng_kernel_out, (hidden, num_heads), hidden),
      bias_out=uniform(rng_bias_out, (num_heads,), hidden),
      c=jnp.float32(c),
      threshold_multiplier=jnp.float32(1.0),
      init_threshold=float(L),
      eps=float(eps),
  )


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SoftCap:
  """Logit soft-capping: ``cap * tanh(score / cap)``, smooth and bounded by ``+-cap``.

  The same as ``dot_product_attention``'s ``logits_soft_cap``; ``cap = inf`` leaves the score
  unchanged. Not additive: ``materialize`` does not apply to it.

  Args:
    cap: static positive float.

  Raises:
    ValueError: for a non-positive ``cap``.

  References:
    Gemma Team 2024, "Gemma 2: Improving Open Language Models at a Practical Size".
  """

  cap: float = dataclasses.field(metadata=dict(static=True))

  def __post_init__(self):
    if isinstance(self.cap, bool) or not isinstance(self.cap, int | float) or not self.cap > 0:
      raise ValueError(f"SoftCap cap must be a positive float (or inf for no cap), got "
                       f"{self.cap!r}")

  def __call__(self, score: Array, batch: Array, head: Array, q_idx: Array,
               kv_idx: Array) -> Array:
    if math.isinf(self.cap):
      return score
    return self.cap * jnp.tanh(score / self.cap)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AtPositions:
  """A score modifier read at position ids instead of indices.

  ``score_mod(score, batch, head, q_positions[batch, q_idx], kv_positions[batch, kv_idx])``:
  a relative scheme (``ALiBi``, ``T5RelativeBias``, ``FIRE``) over ids that are not
  ``0, 1, ...``, such as randomized positions (Ruoss et al. 2023) or coupled ones (Cho et
  al. 2024). Ids need not increase along the sequence, so give the inner modifier its
  two-sided form (``ALiBi(symmetric=True)``, ``T5RelativeBias(bidirectional=True)``) unless
  they do. With a key/value cache the indices are cache slots: give the ids of every slot.

  Args:
    score_mod: the inner modifier; a pytree (the modifiers of this module are), so that
      gradients reach its arrays.
    q_positions: int ``[B or 1, T]``, the position id at each query index.
    kv_positions: int ``[B or 1, S]``, the position id at each key index.

  Raises:
    ValueError: (when called) for id tables that are not 2-D, or whose batch is neither 1
      nor the attention's.

  References:
    Ruoss et al. 2023, "Randomized Positional Encodings Boost Length Generalization of
    Transformers". Cho et al. 2024, "Position Coupling: Improving Length Generalization of
    Arithmetic Transformers Using Task Structure".
  """

  score_mod: ScoreMod
  q_positions: ArrayLike
  kv_positions: ArrayLike

  def __call__(self, score: Array, batch: Array, head: Array, q_idx: Array,
               kv_idx: Array) -> Array:
    return self.score_mod(score, batch, head,
                          lookup_positions(self.q_positions, batch, q_idx, "q_positions"),
                          lookup_positions(self.kv_positions, batch, kv_idx, "kv_positions"))


def lookup_positions(positions: ArrayLike, batch: Array, index: Array,
                     name: str = "positions") -> Array:
  """``positions[batch, index]``: the ids ``[B or 1, L]`` at a score modifier's (or a
  ``masks.MaskFn``'s) broadcastable ``batch`` and query or key ``index`` arrays; indices past
  the table (a block's padding) read its last id.

  Raises:
    ValueError: for a table that is not 2-D, or a batch of ids that is neither 1 nor the
      attention's (named ``name`` in the message).
  """
  table = jnp.asarray(positions)
  if table.ndim != 2:
    raise ValueError(f"{name} must have shape [batch or 1, length], got {table.shape}")
  batch = jnp.asarray(batch)
  if table.shape[0] == 1:
    batch = jnp.zeros_like(batch)
  elif batch.shape[0] not in (1, table.shape[0]):
    raise ValueError(f"{name} has a batch of {table.shape[0]}, the attention {batch.shape[0]}")
  index = jnp.clip(jnp.asarray(index), 0, table.shape[1] - 1)
  return table[batch, index].astype(jnp.int32)


def materialize(
    score_mod: ScoreMod, batch_size: int, num_heads: int, q_len: int, kv_len: int
) -> Array:
  """The dense bias of an additive score modifier: ``score_mod(0, b, n, i, j)``.

  Valid only for a modifier with ``score_mod(s, ...) == s + bias(...)`` (``ALiBi``,
  ``T5RelativeBias``, ``FIRE``); then it can be passed as ``bias`` to attention instead
  (``jax.nn.dot_product_attention`` included), with positions ``0..q_len-1`` and
  ``0..kv_len-1``. For other modifiers (``SoftCap``) the result means nothing.

  Args:
    score_mod: ``score_mod(score, batch, head, q_idx, kv_idx) -> score``.
    batch_size: B.
    num_heads: N.
    q_len: T.
    kv_len: S.

  Returns:
    float32 ``[B, N, T, S]``.

  Raises:
    ValueError: for a non-positive size.
  """
  sizes = dict(batch_size=batch_size, num_heads=num_heads, q_len=q_len, kv_len=kv_len)
  for name, value in sizes.items():
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
      raise ValueError(f"{name} must be a positive int, got {value!r}")
  B, N, T, S = sizes.values()
  index = [jnp.arange(n, dtype=jnp.int32).reshape([n if a == axis else 1 for a in range(4)])
           for axis, n in enumerate((B, N, T, S))]
  bias = score_mod(jnp.zeros((B, N, T, S), jnp.float32), *index)
  return jnp.broadcast_to(bias.astype(jnp.float32), (B, N, T, S))


def _float(index: Array) -> Array:
  return jnp.asarray(index).astype(jnp.float32)


def _add(score: Array, bias: Array) -> Array:
  return score + bias.astype(score.dtype)
