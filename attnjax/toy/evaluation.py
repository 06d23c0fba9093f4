"""Final evaluation: teacher-forced accuracy and greedy exact match per length bucket.

Buckets: ``train`` (lengths drawn as in training) and ``{m}x`` for each multiplier m of
``config.eval.length_multipliers`` (every example of length ``m * max_length``: the
length-generalization table). Each bucket holds ``config.eval.num_sequences`` held-out
sequences from the evaluation key stream. For buckets whose lengths occur in training, the
evaluation sequences are also looked up in the whole training stream actually seen
(``seen_in_training``: short sequences of a small vocabulary cannot all be held out) and the
exact match over the unseen ones is reported as ``exact_match_unseen``. The length curve
(``config.eval.curve_*``, in ``length_curve``) adds greedy exact match at every length from
1 to ``curve_max_multiplier * max_length``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from attnjax.toy import decoding, models, tasks

if TYPE_CHECKING:
  from attnjax.toy.train import Experiment

# Largest number of training sequences regenerated for the overlap check.
MAX_OVERLAP_SEQUENCES = 4_000_000


def buckets(task: tasks.Task, multipliers) -> list[tuple[str, tasks.Task]]:
  """``[(name, task)]``: the training lengths, then each multiple m of the longest (length
  ``round(m * max_length)``, named ``f"{m:g}x"``: ``2x``, ``1.5x``)."""
  out = [("train", task)]
  for m in multipliers:
    n = round(m * task.max_length)
    out.append((f"{m:g}x", task.with_lengths(n, n)))
  return out


def curve_lengths(max_length: int, max_multiplier: int, step: int = 1) -> list[int]:
  """The lengths of the length curve: 1, then every ``step``-th length up to
  ``max_multiplier * max_length``."""
  return sorted({1, *range(step, max_multiplier * max_length + 1, step)})


def curve_groups(lengths: list[int], group: int) -> list[tuple[int, ...]]:
  """``lengths`` cut into runs that share ``ceil(n / group)``: each run is evaluated at the
  shapes of its longest length (one compilation per run)."""
  runs: dict[int, list[int]] = {}
  for n in lengths:
    runs.setdefault(-(-n // group), []).append(n)
  return [tuple(run) for _, run in sorted(runs.items())]


def exact_match(predictions: jax.Array, targets: jax.Array) -> jax.Array:
  """bool ``[B]``: every non-PAD target token was generated, in place."""
  return jnp.all((predictions == targets) | (targets == tasks.PAD), axis=-1)


def training_inputs(exp: Experiment, num_steps: int) -> np.ndarray | None:
  """Every training input of steps ``0..num_steps-1`` (None if there are too many)."""
  batch = exp.config.train.batch_size
  if num_steps * batch > MAX_OVERLAP_SEQUENCES:
    return None
  sample = jax.jit(jax.vmap(lambda s: exp.task.sample(
      jax.random.fold_in(exp.train_key, s), batch)["inputs"]))
  chunks = [np.asarray(sample(jnp.arange(i, min(i + 1000, num_steps))))
            for i in range(0, num_steps, 1000)]
  return np.concatenate(chunks).reshape(num_steps * batch, -1)


def _rows(x: np.ndarray) -> list[bytes]:
  x = np.ascontiguousarray(x.astype(np.int32))
  return [r.tobytes() for r in x]


def loss_and_metrics(logits: jax.Array, example: dict[str, jax.Array],
                     label_smoothing: float = 0.0) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Mean cross-entropy over target tokens, and summed counts for metrics.

  Args:
    logits: ``[B, T, V]``.
    example: with ``labels [B, T]`` and ``weights [B, T]``.
    label_smoothing: mass spread uniformly over the vocabulary.

  Returns:
    ``(loss, metrics)``; metrics hold sums: ``loss`` (unsmoothed cross-entropy), ``correct``
    (argmax hits), ``tokens`` (target tokens), ``sequences``, ``exact`` (sequences whose every
    target token is right under teacher forcing).
  """
  labels, weights = example["labels"], example["weights"]
  logits = logits.astype(jnp.float32)
  onehot = jax.nn.one_hot(labels, logits.shape[-1])
  smoothed = optax.smooth_labels(onehot, label_smoothing) if label_smoothing else onehot
  xent = optax.softmax_cross_entropy(logits, smoothed)
  tokens = weights.sum()
  loss = (xent * weights).sum() / jnp.maximum(tokens, 1.0)
  nll = optax.softmax_cross_entropy(logits, onehot) if label_smoothing else xent
  hit = (jnp.argmax(logits, -1) == labels) | (weights == 0)
  return loss, {
      "loss": (nll * weights).sum(),
      "correct": (hit * weights).sum(),
      "tokens": tokens,
      "sequences": jnp.float32(labels.shape[0]),
      "exact": jnp.all(hit, axis=-1).sum().astype(jnp.float32),
  }


def summarize(sums: dict[str, Any], prefix: str) -> dict[str, float]:
  """Means of summed metrics (see :func:`loss_and_metrics`), with a key prefix."""
  tokens = max(float(sums["tokens"]), 1.0)
  return {
      f"{prefix}loss": float(sums["loss"]) / tokens,
      f"{prefix}token_accuracy": float(sums["correct"]) / tokens,
      f"{prefix}teacher_forced_exact_match": float(sums["exact"]) / float(sums["sequences"]),
  }


def evaluate_bucket(exp: Experiment, params, *, task: tasks.Task,
                    stream: int) -> dict[str, Any]:
  """Teacher-forced sums and greedy exact match on held-out sequences (jit this).

  Args:
    exp: the experiment (model, config, keys).
    params: model parameters.
    task: the task at the bucket's lengths.
    stream: index of the held-out key stream (buckets use distinct streams).

  Returns:
    ``sums`` (as :func:`loss_and_metrics`), bool ``exact [B]`` and the
    ``inputs [B, S]``.
  """
  batch = exp.eval_batch(task, exp.config.eval.num_sequences, stream)
  example = exp.format(batch, task=task, stream=stream, held_out=True)
  logits = models.apply_model(exp.model, {"params": params}, example)
  sums = loss_and_metrics(logits, example)[1]
  predictions = _greedy(exp, params, task, batch, example)
  hits, symbols = symbol_hits(predictions, batch["targets"], task)
  return {"sums": sums, "exact": exact_match(predictions, batch["targets"]),
          "symbol_hits": hits.sum(), "symbols": symbols.sum(), "inputs": batch["inputs"]}


def symbol_hits(predictions: jax.Array, targets: jax.Array,
                task: tasks.Task) -> tuple[jax.Array, jax.Array]:
  """int32 ``[B]`` pairs: target symbols generated in place, and target symbols (neither
  PAD nor, for tasks that end in EOS, EOS). For associative recall, each symbol is the answer
  to one query: their ratio is the per-query accuracy of greedy decoding."""
  symbols = targets != tasks.PAD
  if task.has_eos:
    symbols = symbols & (targets != tasks.EOS)
  hits = (predictions == targets) & symbols
  return hits.sum(axis=-1, dtype=jnp.int32), symbols.sum(axis=-1, dtype=jnp.int32)


def _greedy(exp: Experiment, params, task: tasks.Task, batch: dict[str, Any],
            example: dict[str, Any]) -> jax.Array:
  """int32 ``[B, T]``: greedy decoding (with the example's position ids)."""
  prefill = task.min_input_len + 1 if exp.config.model.arch == "decoder_only" else 0
  return decoding.greedy_decode(
      exp.model, params, batch, target_len=task.target_len, stop_at_eos=task.has_eos,
      prefill=prefill, position_ids=models.position_kwargs(exp.model, example))


def evaluate_lengths(exp: Experiment, params, *, lengths: tuple[int, ...], per_length: int,
                     stream: int) -> jax.Array:
  """Greedy exact match at each of ``lengths`` (jit this; lengths static).

  Args:
    exp: the experiment.
    params: model parameters.
    lengths: the lengths n, evaluated together at the shapes of the longest.
    per_length: held-out sequences per length.
    stream: index of the held-out key stream.

  Returns:
    float32 ``[len(lengths)]``: the fraction of each length's sequences decoded exactly.
  """
  task = exp.task.with_lengths(min(lengths), max(lengths))
  n_B = jnp.repeat(jnp.asarray(lengths, jnp.int32), per_length)
  batch = task.sample(jax.random.fold_in(exp.eval_key, stream), n_B.shape[0], lengths=n_B)
  example = exp.format(batch, task=task, stream=stream, held_out=True)
  exact = exact_match(_greedy(exp, params, task, batch, example), batch["targets"])
  return exact.reshape(len(lengths), per_length).astype(jnp.float32).mean(axis=1)


def length_curve(exp: Experiment, params) -> dict[str, Any] | None:
  """Greedy exact match at every length of :func:`curve_lengths` (``config.eval.curve_*``),
  in runs of ``2 * max_length`` lengths (see :func:`curve_groups`); None when
  ``curve_max_multiplier`` is 0."""
  c = exp.config.eval
  if not c.curve_max_multiplier:
    return None
  lengths = curve_lengths(exp.task.max_length, c.curve_max_multiplier, c.curve_step)
  exact: list[float] = []
  for i, group in enumerate(curve_groups(lengths, 2 * exp.task.max_length)):
    exact.extend(float(x) for x in jax.device_get(exp.evaluate_lengths(
        params, lengths=group, per_length=c.curve_sequences, stream=CURVE_STREAM + i)))
  return {"lengths": lengths, "exact_match": exact, "sequences_per_length": c.curve_sequences}


# Held-out key streams of the length curve start here (buckets use 0, 1, ...).
CURVE_STREAM = 10_000


def summarize_bucket(out: dict[str, Any], prefix: str = "") -> dict[str, float]:
  """:func:`summarize` plus ``exact_match`` and ``symbol_accuracy`` (greedy decoding; see
  :func:`symbol_hits`) of an :func:`evaluate_bucket` output."""
  return {**summarize(out["sums"], prefix),
          f"{prefix}exact_match": float(np.mean(out["exact"])),
          f"{prefix}symbol_accuracy": float(out["symbol_hits"]) / max(float(out["symbols"]), 1.0)}


def evaluate(exp: Experiment, params) -> dict[str, Any]:
  """The results table of a trained model (see the module docstring)."""
  cfg = exp.config
  results: dict[str, Any] = {"buckets": {}}
  seen_rows = None
  for i, (name, task) in enumerate(buckets(exp.task, cfg.eval.length_multipliers)):
    out = jax.device_get(exp.evaluate_bucket(params, task=task, stream=i))
    row: dict[str, Any] = {"min_length": task.min_length, "max_length": task.max_length,
           "num_sequences": int(out["exact"].size), **summarize_bucket(out)}
    row.pop("teacher_forced_exact_match")
    if cfg.eval.check_overlap and task.min_length <= exp.task.max_length:
      if seen_rows is None:
        train_inputs = training_inputs(exp, int(cfg.train.num_steps))
        seen_rows = set() if train_inputs is None else set(_rows(train_inputs))
      if seen_rows:
        seen = np.array([r in seen_rows for r in _rows(out["inputs"])])
        unseen = out["exact"][~seen]
        row["seen_in_training"] = float(seen.mean())
        row["exact_match_unseen"] = float(unseen.mean()) if unseen.size else None
    results["buckets"][name] = row
  curve = length_curve(exp, params)
  if curve is not None:
    results["length_curve"] = curve
  if cfg.eval.decode_examples:
    results["decodes"] = [
        {"input": list(x), "output": decode_example(exp, params, x)}
        for x in cfg.eval.decode_examples]
  return results


def decode_example(exp: Experiment, params, input_tokens) -> list[int]:
  """Greedy decoding of one input (token ids): the decoder's start token, then the
  generated tokens up to and including EOS."""
  task = exp.task.with_lengths(len(input_tokens), len(input_tokens))
  if task.name == "associative_recall":
    raise ValueError("decode_examples are for copy-like tasks")
  batch = {"inputs": jnp.asarray([input_tokens], jnp.int32),
           "targets": jnp.zeros((1, task.target_len), jnp.int32)}
  start = int(tasks.encoder_decoder_example(batch)["decoder_inputs"][0, 0])
  example = exp.format(batch, task=task, held_out=True)
  tokens = decoding.greedy_decode(exp.model, params, batch, target_len=task.target_len,
                                  stop_at_eos=task.has_eos,
                                  prefill=len(input_tokens) + 1 if exp.config.model.arch
                                  == "decoder_only" else 0,
                                  position_ids=models.position_kwargs(exp.model, example))
  out = [int(t) for t in np.asarray(tokens[0])]
  if tasks.EOS in out and task.has_eos:
    out = out[:out.index(tasks.EOS) + 1]
  return [start] + out


def format_table(results: dict[str, Any]) -> str:
  """The results as a fixed-width text table."""
  lines = [f"{'bucket':>8} {'lengths':>9} {'n':>6} {'loss':>8} {'token_acc':>9} "
           f"{'exact':>7} {'seen':>6} {'exact_unseen':>12}"]
  for name, r in results["buckets"].items():
    lengths = f"{r['min_length']}-{r['max_length']}"
    seen = r.get("seen_in_training")
    unseen = r.get("exact_match_unseen")
    lines.append(
        f"{name:>8} {lengths:>9} {r['num_sequences']:>6} {r['loss']:>8.4f} "
        f"{r['token_accuracy']:>9.4f} {r['exact_match']:>7.4f} "
        f"{'' if seen is None else f'{seen:.3f}':>6} "
        f"{'' if unseen is None else f'{unseen:.4f}':>12}")
  return "\n".join(lines)
