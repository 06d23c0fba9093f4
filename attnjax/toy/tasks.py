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

import jax
import jax.numpy as jnp
from jax import Array

PAD = 0
BOS = 1
SEP = 2
EOS = 3
NUM_RESERVED = 4

TASKS = ("copy", "reverse", "duplicate", "associative_recall", "annotated_copy")


@dataclasses.dataclass(frozen=True)
class Task:
  """A task and its size distribution (hashable: usable as a static jit argument).

  Attributes:
    name: one of :data:`TASKS`.
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
    if self.name not in TASKS:
      raise ValueError(f"task name must be one of {TASKS}, got {self.name!r}")
    if not 1 <= self.min_length <= self.max_length:
      raise ValueError(
          f"need 1 <= min_length <= max_length, got {self.min_length}, {self.max_length}")
    if self.num_symbols < 2:
      raise ValueError(f"num_symbols must be >= 2, got {self.num_symbols}")
    if self.name == "associative_recall" and self.num_symbols // 2 < self.max_length:
      raise ValueError(
          f"associative_recall needs num_symbols // 2 >= max_length (distinct keys), got "
          f"num_symbols={self.num_symbols}, max_length={self.max_length}")
    if self.name == "annotated_copy" and self.min_length != self.max_length:
      raise ValueError("annotated_copy has one length: set min_length == max_length")

  @property
  def vocab_size(self) -> int:
    if self.name == "annotated_copy":
      return self.num_symbols + 1
    return NUM_RESERVED + self.num_symbols

  @property
  def has_eos(self) -> bool:
    return self.name != "annotated_copy"

  def with_lengths(self, min_length: int, max_length: int) -> Task:
    """The same task at other lengths (for length-generalization buckets)."""
    return dataclasses.replace(self, min_length=min_length, max_length=max_length)

  @property
  def input_len(self) -> int:
    """S, the padded input length."""
    if self.name == "associative_recall":
      return 2 * self.max_length + min(self.max_length, self.num_queries)
    return self.max_length

  @property
  def min_input_len(self) -> int:
    """The fewest input tokens of an example."""
    n = self.min_length
    if self.name == "associative_recall":
      return 2 * n + min(n, self.num_queries)
    return n

  @property
  def target_len(self) -> int:
    """T, the padded target length (EOS included)."""
    n = self.max_length
    return {
        "copy": n + 1,
        "reverse": n + 1,
        "duplicate": 2 * n + 1,
        "associative_recall": min(n, self.num_queries) + 1,
        "annotated_copy": n - 1,
    }[self.name]

  def sample(self, key: Array, batch_size: int) -> dict[str, Array]:
    """Draws a batch.

    Args:
      key: a ``jax.random.key``.
      batch_size: B.

    Returns:
      ``{"inputs": [B, S], "targets": [B, T]}`` int32 (see the module docstring).
    """
    if self.name == "annotated_copy":
      x = jax.random.randint(key, (batch_size, self.max_length), 1, self.num_symbols + 1)
      x = x.at[:, 0].set(BOS).astype(jnp.int32)
      return {"inputs": x, "targets": x[:, 1:]}
    len_key, key = jax.random.split(key)
    n_B = jax.random.randint(len_key, (batch_size,), self.min_length, self.max_length + 1)
    if self.name == "associative_recall":
      return _associative_recall(key, n_B, self)
    x_BS = jax.random.randint(
        key, (batch_size, self.max_length), NUM_RESERVED, NUM_RESERVED + self.num_symbols)
    j_S = jnp.arange(self.max_length)[None, :]
    inputs = jnp.where(j_S < n_B[:, None], x_BS, PAD)
    j_T = jnp.arange(self.target_len)[None, :]
    if self.name == "copy":
      src_BT = j_T
    elif self.name == "reverse":
      src_BT = n_B[:, None] - 1 - j_T
    else:  # duplicate
      src_BT = jnp.where(j_T < n_B[:, None], j_T, j_T - n_B[:, None])
    y_BT = jnp.take_along_axis(x_BS, jnp.clip(src_BT, 0, self.max_length - 1), axis=1)
    m_B = self.target_len_of(n_B)
    targets = jnp.where(j_T < m_B[:, None], y_BT, jnp.where(j_T == m_B[:, None], EOS, PAD))
    return {"inputs": inputs.astype(jnp.int32), "targets": targets.astype(jnp.int32)}

  def target_len_of(self, n: Array) -> Array:
    """Number of target symbols (EOS excluded) for length n."""
    if self.name == "duplicate":
      return 2 * n
    if self.name == "associative_recall":
      return jnp.minimum(n, self.num_queries)
    return n


def _associative_recall(key: Array, n_B: Array, task: Task) -> dict[str, Array]:
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


def token_names(task: Task, tokens) -> list[str]:
  """Readable names of a 1-D token sequence (reserved tokens by name, symbols by index)."""
  if task.name == "annotated_copy":
    return ["_" if t == PAD else str(int(t)) for t in tokens]
  special = {PAD: "_", BOS: "<s>", SEP: "|", EOS: "</s>"}
  return [special.get(int(t), str(int(t) - NUM_RESERVED)) for t in tokens]
