"""Toy sequence-to-sequence tasks, generated on device from a PRNG key.

Token layout (the one place it is defined; every other module imports these names)::

  ``PAD = 0``  padding, never predicted, ignored by losses and metrics.
  ``BOS = 1``  begin: first token of every decoder input and of every decoder-only sequence.
  ``SEP = 2``  separator between the input and the target of a decoder-only sequence.
  ``EOS = 3``  end: last token of every target (the model must emit it to finish).
  symbols:     ``NUM_RESERVED + i`` for ``i`` in ``range(num_symbols)``;
               ``vocab_size = NUM_RESERVED + num_symbols``.

The ``annotated_copy`` task reproduces the Annotated Transformer's data instead: tokens
``1..num_symbols`` (``vocab_size = num_symbols + 1``), ``PAD = 0``, every sequence starts
with the start symbol ``1 == BOS`` (which is also an ordinary symbol), and targets carry no EOS.

Batches are dicts of int32 arrays (B batch, S input length, T target length)::

  ``inputs``  ``[B, S]``: the source tokens, right-padded with PAD (no BOS/SEP/EOS).
  ``targets`` ``[B, T]``: the target tokens then EOS, right-padded with PAD.

Every task has one size knob, its *length* n, drawn uniformly per example from
``[min_length, max_length]`` so that a batch mixes lengths::

  ``copy``                input x (n symbols), target x.
  ``reverse``             input x, target x reversed.
  ``duplicate``           input x, target x x.
  ``associative_recall``  n key-value pairs ``k1 v1 .. kn vn`` (distinct keys from the first
                          half of the symbols, values from the second half) followed by
                          ``min(n, num_queries)`` queried keys in random order; the target is
                          the queried keys' values (multi-query associative recall, Arora et
                          al. 2023, "Zoology", in sequence-to-sequence form).
  ``annotated_copy``      input x of exactly ``max_length`` tokens with ``x[0] = 1``; the
                          target is ``x[1:]`` (the decoder input is ``x[:-1]``).

Shapes are static (S and T depend on ``max_length`` only), so one compiled step serves
every batch. The two model formats are built by :func:`encoder_decoder_example` and
:func:`decoder_only_example`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Literal, get_args

import jax
import jax.numpy as jnp
from jax import Array

from attnjax import positional

PAD = 0
BOS = 1
SEP = 2
EOS = 3
NUM_RESERVED = 4

PositionIds = Literal["sequential", "randomized", "coupled"]
POSITION_IDS: tuple[PositionIds, ...] = get_args(PositionIds)

@dataclasses.dataclass(frozen=True)
class TaskSpec:
  """What makes a task: one entry of :data:`TASK_REGISTRY` (a new task is one entry).

  Lengths below are functions of the task (for its other fields) and of the length n (an int
  or an int array).

  Attributes:
    input_len: the number of input tokens of an example of length n.
    target_symbols: the number of target symbols (EOS excluded) of an example of length n.
    source: copy-like tasks: ``source(j, n)``, the input index whose symbol is target symbol
      j, for int arrays j and n; it is also defined for ``j = -1`` (what comes before the
      first target symbol) and ``j = target_symbols(n)`` (EOS), with values in ``[-1, n]``
      (-1 and n: just before and just after the input). Sampling reads it (``target[j] =
      x[source(j, n)]``), and so does position coupling (:func:`position_ids`). None for a
      task whose targets are not a rearrangement of the input fixed by n.
    sample: a task whose examples are not ``source``'s rearrangement: ``sample(task, key,
      batch_size, lengths)`` as :meth:`Task.sample`.
    has_eos: whether targets end with EOS (and the vocabulary has the reserved tokens).
    check: extra validation of a :class:`Task` (raises ValueError).
  """

  input_len: Callable[[Task, Any], Any]
  target_symbols: Callable[[Task, Any], Any]
  source: Callable[[Array, Array], Array] | None = None
  sample: Callable[[Task, Array, int, Array | None], dict[str, Array]] | None = None
  has_eos: bool = True
  check: Callable[[Task], None] | None = None


def _check_associative_recall(task: Task) -> None:
  if task.num_symbols // 2 < task.max_length:
    raise ValueError(
        f"associative_recall needs num_symbols // 2 >= max_length (distinct keys), got "
        f"num_symbols={task.num_symbols}, max_length={task.max_length}")


def _check_annotated_copy(task: Task) -> None:
  if task.min_length != task.max_length:
    raise ValueError("annotated_copy has one length: set min_length == max_length")


def _recall_queries(task: Task, n):
  return jnp.minimum(n, task.num_queries) if isinstance(n, Array) else min(n, task.num_queries)


TASK_REGISTRY: dict[str, TaskSpec] = {
    "copy": TaskSpec(input_len=lambda task, n: n, target_symbols=lambda task, n: n,
                     source=lambda j, n: j),
    "reverse": TaskSpec(input_len=lambda task, n: n, target_symbols=lambda task, n: n,
                        source=lambda j, n: n - 1 - j),
    "duplicate": TaskSpec(input_len=lambda task, n: n, target_symbols=lambda task, n: 2 * n,
                          source=lambda j, n: jnp.where(j < n, j, j - n)),
    "associative_recall": TaskSpec(
        input_len=lambda task, n: 2 * n + _recall_queries(task, n),
        target_symbols=_recall_queries,
        sample=lambda task, key, batch_size, lengths: _associative_recall(
            *_lengths(task, key, batch_size, lengths), task),
        check=_check_associative_recall),
    "annotated_copy": TaskSpec(
        input_len=lambda task, n: n, target_symbols=lambda task, n: n - 1,
        sample=lambda task, key, batch_size, lengths: _annotated_copy(key, batch_size, task),
        has_eos=False, check=_check_annotated_copy),
}
"""Every task by name (see the module docstring for each one's format)."""

TASKS = tuple(TASK_REGISTRY)


@dataclasses.dataclass(frozen=True)
class Task:
  """A task and its size distribution (hashable: usable as a static jit argument).

  Attributes:
    name: one of :data:`TASKS` (a key of :data:`TASK_REGISTRY`).
    num_symbols: number of ordinary symbols.
    min_length: smallest length n (number of symbols, or of key-value pairs).
    max_length: largest length n.
    num_queries: associative recall: the most keys queried per example.
  """

  name: str
  num_symbols: int
  min_length: int
  max_length: int
  num_queries: int = 4

  def __post_init__(self):
    if self.name not in TASK_REGISTRY:
      raise ValueError(f"task name must be one of {TASKS}, got {self.name!r}")
    if not 1 <= self.min_length <= self.max_length:
      raise ValueError(
          f"need 1 <= min_length <= max_length, got {self.min_length}, {self.max_length}")
    if self.num_symbols < 2:
      raise ValueError(f"num_symbols must be >= 2, got {self.num_symbols}")
    if self.spec.check is not None:
      self.spec.check(self)

  @property
  def spec(self) -> TaskSpec:
    """The task's :class:`TaskSpec`."""
    return TASK_REGISTRY[self.name]

  @property
  def vocab_size(self) -> int:
    if not self.has_eos:  # annotated_copy: symbols 1..num_symbols and PAD.
      return self.num_symbols + 1
    return NUM_RESERVED + self.num_symbols

  @property
  def has_eos(self) -> bool:
    return self.spec.has_eos

  def with_lengths(self, min_length: int, max_length: int) -> Task:
    """The same task at other lengths (for length-generalization buckets)."""
    return dataclasses.replace(self, min_length=min_length, max_length=max_length)

  @property
  def input_len(self) -> int:
    """S, the padded input length."""
    return self.spec.input_len(self, self.max_length)

  @property
  def min_input_len(self) -> int:
    """The fewest input tokens of an example."""
    return self.spec.input_len(self, self.min_length)

  @property
  def target_len(self) -> int:
    """T, the padded target length (EOS included)."""
    return self.spec.target_symbols(self, self.max_length) + int(self.has_eos)

  def sample(self, key: Array, batch_size: int, *,
             lengths: Array | None = None) -> dict[str, Array]:
    """Draws a batch.

    Args:
      key: a ``jax.random.key``.
      batch_size: B.
      lengths: optional int ``[B]`` lengths in ``[1, max_length]`` to use instead of
        drawing them from ``[min_length, max_length]`` (for length curves).

    Returns:
      ``{"inputs": [B, S], "targets": [B, T]}`` int32 (see the module docstring).
    """
    spec = self.spec
    if spec.sample is not None:
      return spec.sample(self, key, batch_size, lengths)
    assert spec.source is not None  # A task has a sampler or a source.
    n_B, key = _lengths(self, key, batch_size, lengths)
    x_BS = jax.random.randint(
        key, (batch_size, self.max_length), NUM_RESERVED, NUM_RESERVED + self.num_symbols)
    j_S = jnp.arange(self.max_length)[None, :]
    inputs = jnp.where(j_S < n_B[:, None], x_BS, PAD)
    j_T = jnp.arange(self.target_len)[None, :]
    src_BT = spec.source(j_T, n_B[:, None])
    y_BT = jnp.take_along_axis(x_BS, jnp.clip(src_BT, 0, self.max_length - 1), axis=1)
    m_B = self.target_len_of(n_B)
    targets = jnp.where(j_T < m_B[:, None], y_BT, jnp.where(j_T == m_B[:, None], EOS, PAD))
    return {"inputs": inputs.astype(jnp.int32), "targets": targets.astype(jnp.int32)}

  def target_len_of(self, n: Array) -> Array:
    """Number of target symbols (EOS excluded) for length n."""
    return self.spec.target_symbols(self, n)


def _lengths(task: Task, key: Array, batch_size: int,
             lengths: Array | None) -> tuple[Array, Array]:
  """``(n_B, key)``: the lengths (drawn, or given and checked) and a key for the rest."""
  len_key, key = jax.random.split(key)
  if lengths is None:
    return jax.random.randint(len_key, (batch_size,), task.min_length,
                              task.max_length + 1), key
  n_B = jnp.asarray(lengths, jnp.int32)
  if n_B.shape != (batch_size,):
    raise ValueError(f"lengths must have shape [batch_size] = ({batch_size},), got {n_B.shape}")
  return n_B, key


def _annotated_copy(key: Array, batch_size: int, task: Task) -> dict[str, Array]:
  x = jax.random.randint(key, (batch_size, task.max_length), 1, task.num_symbols + 1)
  x = x.at[:, 0].set(BOS).astype(jnp.int32)
  return {"inputs": x, "targets": x[:, 1:]}


def _associative_recall(n_B: Array, key: Array, task: Task) -> dict[str, Array]:
  batch_size, P = n_B.shape[0], task.max_length
  Q = min(P, task.num_queries)
  half = task.num_symbols // 2
  key_key, value_key, query_key = jax.random.split(key, 3)
  # Distinct keys per example: the first P entries of a random permutation of the key symbols.
  keys_BP = jnp.argsort(jax.random.uniform(key_key, (batch_size, half)), axis=1)[:, :P]
  keys_BP = keys_BP + NUM_RESERVED
  values_BP = jax.random.randint(
      value_key, (batch_size, P), NUM_RESERVED + half, NUM_RESERVED + task.num_symbols)
  # Queried pairs: a random order of the n present pairs, first min(n, Q) of them.
  j_P = jnp.arange(P)[None, :]
  order_BP = jnp.argsort(
      jax.random.uniform(query_key, (batch_size, P)) + (j_P >= n_B[:, None]), axis=1)[:, :Q]
  q_B = jnp.minimum(n_B, Q)
  pairs_B2P = jnp.stack([keys_BP, values_BP], axis=-1).reshape(batch_size, 2 * P)
  queries_BQ = jnp.take_along_axis(keys_BP, order_BP, axis=1)
  answers_BQ = jnp.take_along_axis(values_BP, order_BP, axis=1)
  j_S = jnp.arange(task.input_len)[None, :]
  n2 = 2 * n_B[:, None]
  pair_tok = jnp.take_along_axis(pairs_B2P, jnp.clip(j_S, 0, 2 * P - 1), axis=1)
  query_tok = jnp.take_along_axis(queries_BQ, jnp.clip(j_S - n2, 0, Q - 1), axis=1)
  inputs = jnp.where(j_S < n2, pair_tok,
                     jnp.where(j_S < n2 + q_B[:, None], query_tok, PAD))
  j_T = jnp.arange(Q + 1)[None, :]
  answer_tok = jnp.take_along_axis(answers_BQ, jnp.clip(j_T, 0, Q - 1), axis=1)
  targets = jnp.where(j_T < q_B[:, None], answer_tok,
                      jnp.where(j_T == q_B[:, None], EOS, PAD))
  return {"inputs": inputs.astype(jnp.int32), "targets": targets.astype(jnp.int32)}


def encoder_decoder_example(batch: dict[str, Array]) -> dict[str, Array]:
  """Encoder-decoder format: the decoder reads BOS + targets[:-1] and predicts targets.

  Args:
    batch: ``{"inputs": [B, S], "targets": [B, T]}``.

  Returns:
    ``inputs [B, S]``, ``decoder_inputs [B, T]``, ``labels [B, T]``, float ``weights [B, T]``
    (1 on target tokens, EOS included; 0 on padding).
  """
  targets = batch["targets"]
  decoder_inputs = jnp.concatenate(
      [jnp.full_like(targets[:, :1], BOS), targets[:, :-1]], axis=1)
  return {
      "inputs": batch["inputs"],
      "decoder_inputs": decoder_inputs,
      "labels": targets,
      "weights": (targets != PAD).astype(jnp.float32),
  }


def decoder_only_example(batch: dict[str, Array]) -> dict[str, Array]:
  """Decoder-only format: one sequence ``BOS x SEP y EOS PAD..`` of length ``1 + S + 1 + T``.

  The model reads the sequence without its last token and predicts it shifted by one; the
  loss covers only the target part (y and EOS).

  Args:
    batch: ``{"inputs": [B, S], "targets": [B, T]}``.

  Returns:
    ``decoder_inputs [B, L]``, ``labels [B, L]``, float ``weights [B, L]`` with
    ``L = S + T + 1``, and ``prompt_lengths [B]`` (the length of ``BOS x SEP``).
  """
  inputs, targets = batch["inputs"], batch["targets"]
  S, T = inputs.shape[1], targets.shape[1]
  n_B1 = (inputs != PAD).sum(axis=1, keepdims=True)
  j = jnp.arange(S + T + 2)[None, :]
  x_tok = jnp.take_along_axis(inputs, jnp.clip(j - 1, 0, S - 1), axis=1)
  y_idx = j - n_B1 - 2
  y_tok = jnp.take_along_axis(targets, jnp.clip(y_idx, 0, T - 1), axis=1)
  y_tok = jnp.where(y_idx < T, y_tok, PAD)
  seq = jnp.where(j == 0, BOS,
                  jnp.where(j <= n_B1, x_tok, jnp.where(j == n_B1 + 1, SEP, y_tok)))
  labels = seq[:, 1:]
  in_target = (j[:, 1:] >= n_B1 + 2) & (labels != PAD)
  return {
      "decoder_inputs": seq[:, :-1].astype(jnp.int32),
      "labels": labels.astype(jnp.int32),
      "weights": in_target.astype(jnp.float32),
      "prompt_lengths": n_B1[:, 0] + 2,
  }


def position_ids(example: dict[str, Array], task: Task, *, kind: PositionIds,
                 max_position: int | None = None, key: Array | None = None
                 ) -> dict[str, Array]:
  """Position ids of an example's tokens, for a model that reads them.

  ``"sequential"``: none (the model numbers tokens ``0, 1, ...``). ``"randomized"``: one
  :func:`attnjax.positional.randomized_positions` draw per sequence from
  ``[0, max_position)`` (Ruoss et al. 2023); decoder-only, one draw for the whole ``BOS x
  SEP y EOS`` sequence; encoder-decoder, one for the input and one for the decoder's
  tokens. ``"coupled"``: position coupling (Cho et al. 2024), an oracle that needs the
  task's ``source``: the input gets ``start + 1 + i`` for input index i, BOS ``start``,
  and every target-side token the id of the input token it corresponds to: the token
  that carries target symbol j (and the one that precedes target symbol 0, SEP or the
  decoder's BOS) gets ``start + 1 + source(j, n)``. ``start`` is drawn per sequence
  uniformly from ``[0, max_position - n - 2]`` (every id stays below ``max_position``).
  Padding tokens get ids in range that nothing real attends to.

  Args:
    example: from :func:`decoder_only_example` (``decoder_inputs``, ``prompt_lengths``) or
      :func:`encoder_decoder_example` (``inputs``, ``decoder_inputs``).
    task: the task of the example.
    kind: ``"sequential"``, ``"randomized"`` or ``"coupled"``.
    max_position: the exclusive bound of the ids (randomized and coupled).
    key: a ``jax.random.key`` (randomized and coupled).

  Returns:
    ``{}`` for sequential; decoder-only ``{"positions": [B, L]}`` (L as
    ``decoder_inputs``); encoder-decoder ``{"input_positions": [B, S],
    "decoder_positions": [B, T]}``; int32.

  Raises:
    ValueError: for an unknown kind, a missing ``max_position`` or key, a sequence too
      long for ``max_position``, or coupling on a task without ``source``.

  References:
    Ruoss et al. 2023, "Randomized Positional Encodings Boost Length Generalization of
    Transformers". Cho et al. 2024, "Position Coupling: Improving Length Generalization of
    Arithmetic Transformers Using Task Structure".
  """
  if kind not in POSITION_IDS:
    raise ValueError(f"kind must be one of {POSITION_IDS}, got {kind!r}")
  if kind == "sequential":
    return {}
  if max_position is None or key is None:
    raise ValueError(f"position ids {kind!r} need max_position and key, got "
                     f"max_position={max_position!r}, key={key!r}")
  decoder_only = "prompt_lengths" in example
  B, L = example["decoder_inputs"].shape
  if decoder_only:
    n_B = example["prompt_lengths"] - 2
  else:
    n_B = (example["inputs"] != PAD).sum(axis=1)
  S = task.input_len
  if kind == "randomized":
    need = L if decoder_only else max(S, L)
    if need > max_position:
      raise ValueError(f"randomized positions: {need} tokens per sequence do not fit below "
                       f"max_position={max_position}")
    m_B = task.target_len_of(n_B) + int(task.has_eos)  # target tokens, EOS included
    if decoder_only:
      lengths = jnp.minimum(n_B + m_B + 2, L)
      return {"positions": positional.randomized_positions(key, B, L, max_position,
                                                           lengths=lengths)}
    in_key, dec_key = jax.random.split(key)
    return {"input_positions": positional.randomized_positions(in_key, B, S, max_position,
                                                               lengths=n_B),
            "decoder_positions": positional.randomized_positions(dec_key, B, L, max_position,
                                                                 lengths=m_B)}
  source = task.spec.source
  if source is None:
    raise ValueError(f"position coupling needs a task with a source map; {task.name!r} has "
                     "none")
  if S + 2 > max_position:
    raise ValueError(f"position coupling: inputs of {S} tokens need max_position >= {S + 2}, "
                     f"got {max_position}")
  start_B1 = jax.random.randint(key, (B, 1), 0, max_position - n_B[:, None] - 1)
  n_B1, m_B1 = n_B[:, None], task.target_len_of(n_B)[:, None]

  def target_side(j):  # ids of the tokens that precede target symbol j + 1
    return start_B1 + 1 + source(jnp.clip(j, -1, m_B1), n_B1)

  j_L = jnp.arange(L)[None, :]
  if decoder_only:  # BOS x SEP y EOS: slot i holds x_{i-1} for i <= n, y_{i-n-2} after SEP.
    ids = jnp.where(j_L <= n_B1, start_B1 + j_L, target_side(j_L - n_B1 - 2))
    return {"positions": jnp.clip(ids, 0, max_position - 1).astype(jnp.int32)}
  j_S = jnp.arange(S)[None, :]
  return {"input_positions": jnp.clip(start_B1 + 1 + j_S, 0, max_position - 1).astype(jnp.int32),
          "decoder_positions": jnp.clip(target_side(j_L - 1), 0,
                                        max_position - 1).astype(jnp.int32)}


def token_names(task: Task, tokens) -> list[str]:
  """Readable names of a 1-D token sequence (reserved tokens by name, symbols by index)."""
  if not task.has_eos:  # annotated_copy: symbols are their own ids.
    return ["_" if t == PAD else str(int(t)) for t in tokens]
  special = {PAD: "_", BOS: "<s>", SEP: "|", EOS: "</s>"}
  return [special.get(int(t), str(int(t) - NUM_RESERVED)) for t in tokens]
