"""Training loop for the toy tasks: data parallel, checkpointed, resumable.

:func:`train_and_evaluate` is the whole experiment. Batches are generated inside the jitted
train step from ``fold_in(key, step)`` and sharded over the ``data`` axis of a mesh of every
local device (parameters and optimizer state replicated), so a run is a function of its
config alone: the same seed gives the same metrics, on one device or eight up to float
rounding, and a resumed run continues the same data stream.

Workdir layout::

  config.json       the config of the run (an existing one must agree on task and model)
  metrics.jsonl     one JSON object per logged step: train_* and eval_* keys
  checkpoints/      Orbax checkpoints (the last ``keep_checkpoints``)
  results.json      final evaluation table, per length bucket
  curves.png, attention_*.png   learning curves and attention maps
"""

from __future__ import annotations

import functools
import json
import math
import os
import sys
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging
from flax.training import train_state
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from attnjax.toy import evaluation, models, plotting, tasks


class IncompatibleWorkdirError(ValueError):
  """The workdir holds a run of another task or model."""


class NonFiniteLossError(FloatingPointError):
  """Training produced a NaN or infinite loss or parameters."""


def make_task(config: ml_collections.ConfigDict) -> tasks.Task:
  """The :class:`~attnjax.toy.tasks.Task` of ``config.task``."""
  c = config.task
  return tasks.Task(c.name, c.num_symbols, c.min_length, c.max_length, c.num_queries)


def make_model(config: ml_collections.ConfigDict, task: tasks.Task) -> nn.Module:
  """The model of ``config.model`` for ``task``'s vocabulary."""
  c = config.model
  if c.arch == "decoder_only" and not task.has_eos:
    raise ValueError(f"task {task.name!r} only supports arch='encoder_decoder'")
  return models.make_model(c.arch, models.TransformerConfig(
      vocab_size=task.vocab_size, num_layers=c.num_layers, d_model=c.d_model,
      num_heads=c.num_heads, num_kv_heads=c.num_kv_heads, mlp_dim=c.mlp_dim,
      dropout_rate=c.dropout_rate, attention_dropout_rate=c.attention_dropout_rate,
      norm=c.norm, position=c.position, tie_embeddings=c.tie_embeddings,
      kernel_init=c.kernel_init, implementation=c.implementation))


def make_format(model: nn.Module):
  """The batch-to-example function of the model's architecture."""
  if isinstance(model, models.EncoderDecoder):
    return tasks.encoder_decoder_example
  return tasks.decoder_only_example


def learning_rate_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
  """``config.optimizer.schedule``: ``"cosine"`` (linear warmup, cosine decay to
  ``final_lr_fraction``), ``"noam"`` (``lr * d_model^-0.5 * min(s^-0.5, s * warmup^-1.5)``
  with s the 1-based step, Vaswani et al. 2017) or ``"constant"`` (after linear warmup)."""
  c = config.optimizer
  if c.schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(
        0.0, c.learning_rate, max(c.warmup_steps, 1),
        max(config.train.num_steps, c.warmup_steps + 1),
        end_value=c.learning_rate * c.final_lr_fraction)
  if c.schedule == "noam":
    d, warmup = config.model.d_model, c.warmup_steps

    def noam(count):
      s = count + 1.0
      return c.learning_rate * d**-0.5 * jnp.minimum(s**-0.5, s * warmup**-1.5)
    return noam
  if c.schedule == "constant":
    return optax.linear_schedule(0.0, c.learning_rate, max(c.warmup_steps, 1))
  raise ValueError(f"optimizer.schedule must be cosine, noam or constant, got {c.schedule!r}")


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """Adam or AdamW under the schedule, after global-norm gradient clipping.

  The update runs on all parameters flattened into one vector (``optax.flatten``): the same
  arithmetic in a few large XLA ops instead of a few per parameter, which compiles and runs
  faster on CPU. (AdamW's weight decay therefore applies to every parameter.)
  """
  c = config.optimizer
  lr = learning_rate_schedule(config)
  if c.name == "adam":
    opt = optax.adam(lr, b1=c.b1, b2=c.b2, eps=c.eps)
  elif c.name == "adamw":
    opt = optax.adamw(lr, b1=c.b1, b2=c.b2, eps=c.eps, weight_decay=c.weight_decay)
  else:
    raise ValueError(f"optimizer.name must be adam or adamw, got {c.name!r}")
  if c.grad_clip_norm > 0:
    opt = optax.chain(optax.clip_by_global_norm(c.grad_clip_norm), opt)
  return optax.flatten(opt)


class Experiment:
  """Everything derived from a config: task, model, optimizer, mesh and compiled steps."""

  def __init__(self, config: ml_collections.ConfigDict, devices=None):
    """Args: config; devices: the mesh's devices (default: every local device)."""
    self.config = config
    self.task = make_task(config)
    self.model = make_model(config, self.task)
    self.format = make_format(self.model)
    self.tx = make_optimizer(config)
    devices = np.array(jax.devices() if devices is None else devices)
    if config.train.batch_size % devices.size:
      raise ValueError(f"train.batch_size={config.train.batch_size} is not a multiple of the "
                       f"{devices.size} devices")
    self.mesh = Mesh(devices, ("data",))
    self.replicated = NamedSharding(self.mesh, P())
    self.data_sharding = NamedSharding(self.mesh, P("data"))
    # Independent streams from the seed: training data, held-out data, dropout, init.
    root = jax.random.key(config.seed)
    self.train_key, self.eval_key, self.dropout_key, self.init_key = (
        jax.random.fold_in(root, i) for i in range(4))
    self.train_step = jax.jit(self._train_step, donate_argnums=0,
                              in_shardings=self.replicated,
                              out_shardings=(self.replicated, self.replicated))
    self.evaluate_bucket = jax.jit(
        functools.partial(evaluation.evaluate_bucket, self), static_argnames=("task", "stream"),
        out_shardings=self.replicated)

  def sample_train_batch(self, step: int | jax.Array) -> dict[str, jax.Array]:
    """The training batch of ``step`` (sharded over ``data`` inside jit)."""
    batch = self.task.sample(jax.random.fold_in(self.train_key, step),
                             self.config.train.batch_size)
    return jax.lax.with_sharding_constraint(batch, self.data_sharding)

  def init_state(self) -> train_state.TrainState:
    def init():
      example = self.format(self.task.sample(self.train_key, 2))
      params = models.apply_init(self.model, self.init_key, example)
      return train_state.TrainState.create(apply_fn=None, params=params, tx=self.tx)
    return jax.jit(init, out_shardings=self.replicated)()

  def abstract_state(self) -> train_state.TrainState:
    state = jax.eval_shape(self.init_state)
    return jax.tree.map(
        lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=self.replicated), state)

  def _train_step(self, state: train_state.TrainState):
    example = self.format(self.sample_train_batch(state.step))
    dropout_key = jax.random.fold_in(self.dropout_key, state.step)

    def loss_fn(params):
      logits = models.apply_model(self.model, {"params": params}, example,
                                  deterministic=False, rngs={"dropout": dropout_key})
      return evaluation.loss_and_metrics(logits, example, self.config.train.label_smoothing)

    grads, metrics = jax.grad(loss_fn, has_aux=True)(state.params)
    metrics["grad_norm"] = optax.tree.norm(grads)
    return state.apply_gradients(grads=grads), metrics

  def eval_batch(self, task: tasks.Task, num: int, stream: int) -> dict[str, jax.Array]:
    """``num`` held-out sequences of ``task`` from the evaluation key stream (inside jit:
    sharded over ``data`` when the devices divide ``num``)."""
    batch = task.sample(jax.random.fold_in(self.eval_key, stream), num)
    if num % self.mesh.size == 0:
      batch = jax.lax.with_sharding_constraint(batch, self.data_sharding)
    return batch


def _check_workdir(workdir: str, config: ml_collections.ConfigDict, exp: Experiment,
                   manager: ocp.CheckpointManager) -> None:
  """Raises IncompatibleWorkdirError before anything is written if the workdir holds another
  task or model (by config.json and by the parameter shapes of the latest checkpoint)."""
  path = os.path.join(workdir, "config.json")
  if os.path.exists(path):
    with open(path) as f:
      old = json.load(f)
    new = json.loads(config.to_json())
    diffs = [f"{section}.{k}: {old.get(section, {}).get(k)!r} in the workdir, "
             f"{new[section].get(k)!r} now"
             for section in ("task", "model")
             for k in sorted(set(old.get(section, {})) | set(new[section]))
             if old.get(section, {}).get(k) != new[section].get(k)]
    if diffs:
      raise IncompatibleWorkdirError(
          f"{workdir} holds a run of another task or model; use a new workdir. "
          "Differences: " + "; ".join(diffs))
  step = manager.latest_step()
  if step is not None:
    saved = _shapes(manager.item_metadata(step)["params"])
    want = _shapes(exp.abstract_state().params)
    if saved != want:
      diffs = [f"{k}: {saved.get(k)} saved, {want.get(k)} expected"
               for k in sorted(set(saved) | set(want)) if saved.get(k) != want.get(k)]
      raise IncompatibleWorkdirError(
          f"{workdir}: the parameters of checkpoint {step} do not match the model of this "
          f"config; use a new workdir. Differences: " + "; ".join(diffs[:5]))


def _shapes(tree) -> dict[str, tuple[int, ...]]:
  leaves = jax.tree_util.tree_flatten_with_path(dict(tree))[0]
  return {jax.tree_util.keystr(path): tuple(leaf.shape) for path, leaf in leaves}


@jax.jit
def _all_finite(tree) -> jax.Array:
  return jnp.all(jnp.array([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


class _Progress:
  """A one-line progress bar on stderr (a carriage-return line on a terminal)."""

  def __init__(self, total: int):
    self.total = total
    self.tty = sys.stderr.isatty()

  def update(self, step: int, fields: dict[str, float]) -> None:
    width = 20
    done = int(width * step / max(self.total, 1))
    text = " ".join(f"{k} {v:.4g}" for k, v in fields.items())
    line = f"[{'#' * done}{'.' * (width - done)}] step {step}/{self.total} {text}"
    sys.stderr.write(("\r" + line + "\033[K") if self.tty else line + "\n")
    sys.stderr.flush()

  def close(self) -> None:
    if self.tty:
      sys.stderr.write("\n")


def _trim_metrics(path: str, last_step: int) -> None:
  """Drops logged lines past ``last_step`` (from a run that stopped after its checkpoint)."""
  if not os.path.exists(path):
    return
  with open(path) as f:
    lines = [line for line in f if json.loads(line)["step"] <= last_step]
  with open(path, "w") as f:
    f.writelines(lines)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains (or resumes) the run of ``config`` in ``workdir``, then evaluates it.

  Args:
    config: see ``configs/copy.py`` for the fields.
    workdir: output directory (created).

  Returns:
    The final results: ``{"step", "buckets": {name: {...metrics}}, ...}`` (also written to
    ``results.json``).

  Raises:
    IncompatibleWorkdirError: the workdir holds a run of another task or model.
    NonFiniteLossError: the loss or the parameters became NaN or infinite; the last good
      checkpoint is kept and nothing non-finite is saved.
  """
  start_time = time.time()
  exp = Experiment(config)
  ckpt_dir = os.path.abspath(os.path.join(workdir, "checkpoints"))
  manager = ocp.CheckpointManager(ckpt_dir, options=ocp.CheckpointManagerOptions(
      max_to_keep=config.train.keep_checkpoints, create=False),
      item_handlers=ocp.StandardCheckpointHandler())
  _check_workdir(workdir, config, exp, manager)
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(config.to_json(indent=2))

  metrics_path = os.path.join(workdir, "metrics.jsonl")
  latest = manager.latest_step()
  if latest is None:
    state = exp.init_state()
    if os.path.exists(metrics_path):
      os.remove(metrics_path)
  else:
    state = manager.restore(latest, args=ocp.args.StandardRestore(exp.abstract_state()))
    _trim_metrics(metrics_path, latest)
  start = int(state.step)
  num_steps = config.train.num_steps
  if start >= num_steps:
    logging.info("Run in %s already finished at step %d; evaluating only.", workdir, start)
    print(f"Run already finished at step {start}; evaluating only.", flush=True)
  elif start:
    logging.info("Resuming from step %d.", start)
    print(f"Resuming from step {start}.", flush=True)
  num_params = sum(x.size for x in jax.tree.leaves(state.params))
  logging.info("Model %s: %d parameters on %d device(s).", config.model.arch, num_params,
               exp.mesh.size)

  shapes = jax.eval_shape(lambda: exp.format(exp.task.sample(jax.random.key(0), 1)))
  tokens_per_step = config.train.batch_size * sum(
      shapes[k].shape[1] for k in ("inputs", "decoder_inputs") if k in shapes)
  progress = _Progress(num_steps)
  pending: list[dict[str, jax.Array]] = []
  last_log_time, last_log_step = time.time(), start
  last_good = latest

  def check_finite(step, sums=None):
    finite = ((sums is None or math.isfinite(float(sums["loss"])))
              and bool(_all_finite(state.params)))
    if not finite:
      progress.close()
      raise NonFiniteLossError(
          f"non-finite loss or parameters at step <= {step}; training stopped. The last good "
          f"checkpoint (step {last_good}) is kept in {ckpt_dir}; lower the learning rate or "
          "clip gradients harder and rerun.")

  with open(metrics_path, "a") as metrics_file:
    for step in range(start + 1, num_steps + 1):
      state, metrics = exp.train_step(state)
      pending.append(metrics)
      record = {}
      if step % config.train.log_every == 0 or step == num_steps:
        sums = jax.tree.map(lambda *xs: np.sum(xs), *jax.device_get(pending))
        pending = []
        check_finite(step, sums)
        now = time.time()
        rate = (step - last_log_step) / (now - last_log_time)
        record.update(evaluation.summarize(sums, "train_"))
        record.update(train_steps_per_sec=rate, train_tokens_per_sec=rate * tokens_per_step,
                      train_grad_norm=float(sums["grad_norm"]) / (step - last_log_step),
                      train_learning_rate=float(learning_rate_schedule(config)(step - 1)))
        last_log_time, last_log_step = now, step
      if config.train.eval_every and (step % config.train.eval_every == 0
                                      or step == num_steps):
        record.update(evaluation.summarize_bucket(
            jax.device_get(exp.evaluate_bucket(state.params, task=exp.task, stream=0)),
            "eval_"))
      if record:
        record = {"step": step, "wall_time": time.time() - start_time, **record}
        metrics_file.write(json.dumps(record) + "\n")
        metrics_file.flush()
        progress.update(step, {k.removeprefix("train_"): v for k, v in record.items()
                               if k in ("train_loss", "train_token_accuracy", "eval_loss",
                                        "eval_exact_match", "train_steps_per_sec")})
      if step % config.train.checkpoint_every == 0 or step == num_steps:
        check_finite(step)
        manager.save(step, args=ocp.args.StandardSave(state))
        last_good = step
  progress.close()
  manager.wait_until_finished()
  train_seconds = time.time() - start_time

  results = evaluation.evaluate(exp, state.params)
  results.update(step=int(state.step), train_seconds_to_eval=train_seconds,
                 wall_seconds=time.time() - start_time, num_params=int(num_params),
                 num_devices=exp.mesh.size)
  with open(os.path.join(workdir, "results.json"), "w") as f:
    json.dump(results, f, indent=2)
  print(evaluation.format_table(results), flush=True)
  for d in results.get("decodes", ()):
    print(f"greedy decode: {d['input']} -> {d['output']}", flush=True)
  if config.plots:
    plotting.learning_curves(metrics_path, os.path.join(workdir, "curves.png"))
    plotting.attention_maps(exp, state.params, workdir)
  manager.close()
  return results
