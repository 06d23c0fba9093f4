"""Training loop for the toy tasks: data parallel, checkpointed, resumable.

:func:`train_and_evaluate` is the whole experiment. The batch of a step is drawn from
``fold_in(key, step)``; each process keeps the rows of its devices and feeds them to the
compiled train step as one global array (``jax.make_array_from_process_local_data``),
sharded over the ``data`` axis of a ``(data, tensor, sequence)`` mesh of every device
(``config.mesh``; by default all on ``data``); parameters and Adam's moments are sharded by
the parameters' logical axes (:mod:`attnjax.toy.sharding`), so a run is a function of its
config alone: the same seed gives the same metrics, on one device or eight, in one process
or several, up to float rounding, and a resumed run continues the same data stream,
whatever mesh saved it. In a
multi-process run (:mod:`attnjax.toy.launch`) every process trains and writes its shards
of the checkpoints; the first alone locks the workdir and writes the other files.

Workdir layout::

  config.json           the config of the run (rewritten atomically on every start)
  config_history.jsonl  one JSON line per resume that changed the config: step, old and new
                        values, and which changes alter training
  metrics.jsonl         one JSON object per logged step: train_* and eval_* keys
  checkpoints/          Orbax checkpoints (the last ``keep_checkpoints``)
  damaged_checkpoints/  checkpoints that could not be restored, moved out of the way
  results.json          final evaluation table, per length bucket
  curves.png, attention_*.png   learning curves and attention maps
  lock                  the pid and host of the run holding the workdir (emptied when it
                        ends; left filled by a killed run, harmlessly)

Guarantees of a run, in order:

* The config is checked by :func:`validate_config` (and the task and model by
  :class:`~attnjax.toy.tasks.Task` and :class:`~attnjax.toy.models.TransformerConfig`)
  before anything is written or compiled.
* One run at a time: the run holds an exclusive ``fcntl.flock`` on ``lock`` until it ends;
  another run into the workdir raises :class:`WorkdirLockedError` naming the holder. The
  kernel releases the lock when the holder dies, even by SIGKILL, so a killed run never
  blocks the next one. (``flock`` is reliable on local file systems; on NFS it depends on
  the server.)
* Resuming checks the config against ``config.json``: another task or model is an
  :class:`IncompatibleWorkdirError`; a change that alters the training trajectory (the
  seed, the optimizer, the batch size, label smoothing, and ``train.num_steps`` under the
  cosine schedule, whose length it sets) is a :class:`ConfigChangeError` unless
  ``allow_config_change=True``. Fields in :data:`HARMLESS_CHANGES`, and ``num_steps`` under
  the constant and Noam schedules, may change freely. Every accepted change is appended to
  ``config_history.jsonl``.
* Training resumes from the newest checkpoint that restores (metadata readable, data
  readable and finite); newer damaged ones are logged and moved to ``damaged_checkpoints/``.
  If checkpoints exist but none restores, :class:`DamagedWorkdirError` is raised and
  nothing is moved. A checkpoint of a run before the moments took the parameters' shapes
  (one flat vector each, ``optax.flatten``) is restored and converted. An unreadable
  ``config.json`` is logged, recorded in the history and
  replaced. Unreadable (torn) lines of ``metrics.jsonl`` and records past the restored step
  are dropped, with a log line.
* ``config.json``, ``results.json`` and rewrites of ``metrics.jsonl`` go to a temporary
  file renamed into place; metrics are appended one whole, flushed line per record and also
  kept in memory, so a ``metrics.jsonl`` deleted or replaced during the run is rewritten.
* A failure while plotting is logged and does not fail a finished run.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import math
import os
import socket
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import flax.linen as nn
import jax
import jax.flatten_util
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging
from flax.training import train_state
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, SingleDeviceSharding
from jax.sharding import PartitionSpec as P

from attnjax import parallel
from attnjax.toy import evaluation, models, plotting, sharding, tasks


class IncompatibleWorkdirError(ValueError):
  """The workdir holds a run of another task or model."""


class ConfigChangeError(IncompatibleWorkdirError):
  """Resuming would change how training proceeds (pass ``allow_config_change=True``)."""


class WorkdirLockedError(RuntimeError):
  """Another live run holds the workdir."""


class DamagedWorkdirError(RuntimeError):
  """The workdir holds checkpoints but none of them can be restored."""


class NonFiniteLossError(FloatingPointError):
  """Training produced a NaN or infinite loss or parameters."""


# Config fields that a resumed run may change without asking: they decide what is logged,
# evaluated, saved or drawn, not what training computes. (``train.num_steps`` is harmless
# too unless the schedule is cosine; task and model fields may never change.)
HARMLESS_CHANGES = frozenset({
    "plots", "train.log_every", "train.eval_every", "train.checkpoint_every",
    "train.keep_checkpoints", "eval.num_sequences", "eval.length_multipliers",
    "eval.num_attention_examples", "eval.decode_examples", "eval.check_overlap",
    "eval.curve_max_multiplier", "eval.curve_step", "eval.curve_sequences",
    "mesh.shape", "mesh.rules"})

# Fields added after workdirs were first written, with the value that a workdir without
# them ran with: such a workdir resumes as if it had recorded that value.
ADDED_FIELDS = {"model.t5_max_distance": 128}


def _is_int(x) -> bool:
  return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x) -> bool:
  return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _integer(low: int) -> tuple[Callable[[Any], bool], str]:
  return (lambda x: _is_int(x) and x >= low), f"an integer >= {low}"


def _number(low: float, below: float = math.inf) -> tuple[Callable[[Any], bool], str]:
  want = f"a number in [{low}, {below})" if below < math.inf else f"a finite number >= {low}"
  return (lambda x: _is_number(x) and low <= x < below), want


# (field, test, what it must be): the checks of validate_config.
_FIELD_CHECKS: tuple[tuple[str, Callable[[Any], bool], str], ...] = (
    ("seed", _is_int, "an integer"),
    ("train.num_steps", *_integer(1)),
    ("train.batch_size", *_integer(1)),
    ("train.label_smoothing", *_number(0, 1)),
    ("train.log_every", *_integer(1)),
    ("train.eval_every", *_integer(0)),
    ("train.checkpoint_every", *_integer(1)),
    ("train.keep_checkpoints", *_integer(1)),
    ("optimizer.learning_rate", *_number(0)),
    ("optimizer.warmup_steps", *_integer(0)),
    ("optimizer.final_lr_fraction", *_number(0)),
    ("optimizer.b1", *_number(0, 1)),
    ("optimizer.b2", *_number(0, 1)),
    ("optimizer.eps", *_number(0)),
    ("optimizer.weight_decay", *_number(0)),
    ("optimizer.grad_clip_norm", *_number(0)),
    ("eval.num_sequences", *_integer(1)),
    ("eval.length_multipliers",
     lambda x: isinstance(x, (tuple, list)) and all(_is_number(m) and m >= 1 for m in x),
     "a sequence of numbers >= 1"),
    ("eval.num_attention_examples", *_integer(0)),
    ("eval.curve_max_multiplier", *_integer(0)),
    ("eval.curve_step", *_integer(1)),
    ("eval.curve_sequences", *_integer(1)),
)


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Checks the seed, ``train``, ``optimizer`` and ``eval`` fields of a run's config.

  :func:`train_and_evaluate` calls this before anything is written or compiled, so that a
  value that would only fail after compiling (``log_every=0``: a division by zero) or after
  writing files (``num_steps=-5``) fails at once. Task and model fields are checked when
  :class:`Experiment` builds the task and model, also before anything is written.

  Args:
    config: a config as ``configs/copy.py`` builds it.

  Raises:
    ValueError: naming every invalid field, its value and what it must be.
  """
  errors = []
  for field, ok, want in _FIELD_CHECKS:
    section, _, name = field.rpartition(".")
    value = config[section][name] if section else config[name]
    if not ok(value):
      errors.append(f"config.{field} must be {want}, got {value!r}")
  if errors:
    raise ValueError("; ".join(errors))


def make_task(config: ml_collections.ConfigDict) -> tasks.Task:
  """The :class:`~attnjax.toy.tasks.Task` of ``config.task``."""
  c = config.task
  return tasks.Task(c.name, c.num_symbols, c.min_length, c.max_length, c.num_queries)


def make_model(config: ml_collections.ConfigDict, task: tasks.Task,
               mesh: Mesh | None = None) -> nn.Module:
  """The model of ``config.model`` for ``task``'s vocabulary; on a ``mesh`` whose
  ``sequence`` axis is longer than 1, self-attention is ring attention over it
  (:func:`attnjax.parallel.ring_attention_fn`)."""
  c = config.model
  attention_fn = None
  if mesh is not None and mesh.shape["sequence"] > 1:
    attention_fn = parallel.ring_attention_fn(mesh, "sequence", batch_axis_name="data",
                                              head_axis_name="tensor")
  if c.arch == "decoder_only" and not task.has_eos:
    raise ValueError(f"task {task.name!r} only supports arch='encoder_decoder'")
  if c.position_ids not in tasks.POSITION_IDS:
    raise ValueError(f"config.model.position_ids must be one of {tasks.POSITION_IDS}, got "
                     f"{c.position_ids!r}")
  if c.position_ids != "sequential":
    if c.position not in models.POSITION_SCHEMES or not models.POSITION_SCHEMES[
        c.position].reads_position_ids:
      readers = tuple(k for k, v in models.POSITION_SCHEMES.items() if v.reads_position_ids)
      raise ValueError(f"config.model.position_ids={c.position_ids!r} needs a position that "
                       f"reads position ids, one of {readers}; got position={c.position!r}")
    if c.max_position is None:
      raise ValueError(f"config.model.position_ids={c.position_ids!r} needs "
                       "config.model.max_position")
    if (mesh is not None and mesh.shape["sequence"] > 1
        and models.POSITION_SCHEMES[c.position].attention is not None):
      raise ValueError(f"config.model.position_ids={c.position_ids!r} with "
                       f"position={c.position!r} reads ids inside attention, which ring "
                       f"attention over the mesh's sequence axis does not support")
    if c.position_ids == "coupled" and task.spec.source is None:
      raise ValueError(f"config.model.position_ids='coupled' needs a task with a source map; "
                       f"{task.name!r} has none")
  windows = c.hard_alibi_windows
  return models.make_model(c.arch, models.TransformerConfig(
      vocab_size=task.vocab_size, num_layers=c.num_layers, d_model=c.d_model,
      num_heads=c.num_heads, num_kv_heads=c.num_kv_heads, mlp_dim=c.mlp_dim,
      dropout_rate=c.dropout_rate, attention_dropout_rate=c.attention_dropout_rate,
      norm=c.norm, position=c.position, max_position=c.max_position,
      hard_alibi_windows=None if windows is None else tuple(windows),
      t5_max_distance=c.t5_max_distance,
      tie_embeddings=c.tie_embeddings, short_conv=c.short_conv, kernel_init=c.kernel_init,
      implementation=c.implementation, self_attention_fn=attention_fn))


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

  The moments are trees shaped like the parameters, so that they take the parameters'
  logical axes and are sharded like them on a mesh. (Runs before this kept them as one flat
  vector, ``optax.flatten``; :func:`train_and_evaluate` converts such checkpoints on
  resuming.) AdamW's weight decay applies to every parameter.
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
  return opt


class Experiment:
  """Everything derived from a config: task, model, optimizer, mesh and compiled steps."""

  def __init__(self, config: ml_collections.ConfigDict, devices=None):
    """Args: config; devices: the mesh's devices (default: every device, of every
    process)."""
    self.config = config
    self.task = make_task(config)
    mesh_config = config.get("mesh") or ml_collections.ConfigDict()
    self.mesh = sharding.make_mesh(mesh_config.get("shape"), devices)
    rules = mesh_config.get("rules")
    self.rules = sharding.DEFAULT_RULES if rules is None else tuple(map(tuple, rules))
    self.model = make_model(config, self.task, self.mesh)
    self._format = make_format(self.model)
    self.tx = make_optimizer(config)
    data = self.mesh.shape["data"]
    if config.train.batch_size % data:
      raise ValueError(f"train.batch_size={config.train.batch_size} is not a multiple of the "
                       f"{data} devices of the mesh's data axis")
    self.replicated = NamedSharding(self.mesh, P())
    self.data_sharding = NamedSharding(self.mesh, P("data"))
    # Independent streams from the seed: training data, held-out data, dropout, init.
    root = jax.random.key(config.seed)
    (self.train_key, self.eval_key, self.dropout_key, self.init_key, self.position_key,
     self.eval_position_key) = (jax.random.fold_in(root, i) for i in range(6))
    with self.sharding_context():
      boxed = jax.eval_shape(self._create_state)
    # Parameters and the optimizer moments (trees of the parameters' shapes, which keep
    # their logical axes) by their logical axes; the step counts replicated.
    self.state_sharding = sharding.logical_shardings(boxed, self.mesh, self.rules)
    # The training batch: every process draws the step's whole batch with one small jitted
    # sampler on its first device of the mesh, and keeps the rows of its devices.
    rows = _process_rows(self.data_sharding, config.train.batch_size)
    self._sample_local_rows = jax.jit(
        lambda step: jax.tree.map(lambda x: x[rows], self.task.sample(
            jax.random.fold_in(self.train_key, step), config.train.batch_size)),
        out_shardings=SingleDeviceSharding(self.mesh.local_devices[0]))
    self._batch_shapes = {name: (config.train.batch_size, *x.shape[1:]) for name, x in
                          jax.eval_shape(self._sample_local_rows, 0).items()}
    self._train_step_jit = self._in_context(jax.jit(
        self._train_step, donate_argnums=0,
        in_shardings=(self.state_sharding, self.data_sharding),
        out_shardings=(self.state_sharding, self.replicated)))
    self.evaluate_bucket = self._in_context(jax.jit(
        functools.partial(evaluation.evaluate_bucket, self), static_argnames=("task", "stream"),
        out_shardings=self.replicated))
    self._check_position_ids()
    self.evaluate_lengths = self._in_context(jax.jit(
        functools.partial(evaluation.evaluate_lengths, self),
        static_argnames=("lengths", "per_length", "stream"), out_shardings=self.replicated))

  def sharding_context(self) -> contextlib.AbstractContextManager:
    """The mesh (``jax.set_mesh``) and logical axis rules that the model is traced under."""
    stack = contextlib.ExitStack()
    stack.enter_context(jax.set_mesh(self.mesh))
    stack.enter_context(nn.logical_axis_rules(self.rules))
    return stack

  def _in_context(self, fn: Callable) -> Callable:
    @functools.wraps(fn)
    def call(*args, **kwargs):
      with self.sharding_context():
        return fn(*args, **kwargs)
    return call

  def format(self, batch: dict[str, jax.Array], *, task: tasks.Task | None = None,
             stream: int | jax.Array = 0, held_out: bool = False) -> dict[str, jax.Array]:
    """The model's example of ``batch`` (a batch of ``task``, default the training task),
    with the position ids of ``config.model.position_ids`` drawn from ``stream`` (the
    training step, or the held-out stream with ``held_out``) of the position key
    streams."""
    example = self._format(batch)
    c = self.config.model
    if c.position_ids == "sequential":
      return example
    key = jax.random.fold_in(self.eval_position_key if held_out else self.position_key, stream)
    return {**example, **tasks.position_ids(example, task or self.task, kind=c.position_ids,
                                            max_position=c.max_position, key=key)}

  def _check_position_ids(self) -> None:
    """Draws (abstractly) the position ids of the longest evaluated sequences, so that a
    ``max_position`` too small for them fails now rather than after training."""
    c = self.config.eval
    longest = max([self.task.max_length]
                  + [round(m * self.task.max_length) for m in c.length_multipliers]
                  + [c.curve_max_multiplier * self.task.max_length])
    task = self.task.with_lengths(longest, longest)
    jax.eval_shape(lambda: self.format(task.sample(jax.random.key(0), 1), task=task))

  def sample_train_batch(self, step: int) -> dict[str, jax.Array]:
    """The training batch of ``step``, a global array sharded over ``data``.

    Every process draws the whole batch from ``fold_in(train_key, step)`` (the same bits on
    any device) and gives ``jax.make_array_from_process_local_data`` the rows of its own
    devices, so the data stream does not depend on the mesh or the number of processes.
    """
    return jax.make_array_from_process_local_data(
        self.data_sharding, self._sample_local_rows(step), self._batch_shapes)

  def train_step(self, state: train_state.TrainState,
                 batch: dict[str, jax.Array] | None = None
                 ) -> tuple[train_state.TrainState, dict[str, jax.Array]]:
    """One optimizer step (``state`` is donated).

    Args:
      state: the training state, sharded as ``state_sharding``.
      batch: the batch of step ``state.step`` (:meth:`sample_train_batch`); None samples it
        (reading ``state.step`` back from the device).

    Returns:
      ``(new_state, metrics)``: the metrics are sums over the batch (replicated).
    """
    if batch is None:
      batch = self.sample_train_batch(int(state.step))
    return self._train_step_jit(state, batch)

  def _create_state(self) -> train_state.TrainState:
    """The initial state; its parameters boxed with their logical axes under the rules."""
    example = self.format(self.task.sample(self.train_key, 2))
    params = models.apply_init(self.model, self.init_key, example)
    return train_state.TrainState.create(apply_fn=None, params=params, tx=self.tx)

  def init_state(self) -> train_state.TrainState:
    """The initial state, sharded as ``state_sharding``."""
    init = jax.jit(lambda: nn.unbox(self._create_state()), out_shardings=self.state_sharding)
    return self._in_context(init)()

  def abstract_state(self) -> train_state.TrainState:
    """Shapes, dtypes and shardings of the state (the target of a checkpoint restore)."""
    with self.sharding_context():
      state = jax.eval_shape(lambda: nn.unbox(self._create_state()))
    return jax.tree.map(lambda s, sharding: jax.ShapeDtypeStruct(s.shape, s.dtype,
                                                                 sharding=sharding),
                        state, self.state_sharding)

  def abstract_flat_state(self) -> train_state.TrainState:
    """:meth:`abstract_state` in the layout of checkpoints whose optimizer moments are one
    flat vector each (``optax.flatten`` of :func:`make_optimizer`), replicated."""
    abstract = self.abstract_state()
    opt_state = jax.eval_shape(optax.flatten(self.tx).init, abstract.params)
    return abstract.replace(opt_state=jax.tree.map(
        lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=self.replicated), opt_state))

  def from_flat_state(self, state: train_state.TrainState) -> train_state.TrainState:
    """A state of :meth:`abstract_flat_state`'s layout in :meth:`abstract_state`'s: each
    flat moment split into the parameters' shapes, the whole sharded as
    ``state_sharding``."""
    target = self.abstract_state().opt_state

    def convert(state):
      unravel = jax.flatten_util.ravel_pytree(state.params)[1]
      # The flat layout's leaves are a prefix of the new: a flat moment where the new
      # state holds a tree of the parameters' shapes, the same leaf elsewhere.
      opt_state = jax.tree.map(
          lambda flat, new: flat if isinstance(new, jax.ShapeDtypeStruct) else unravel(flat),
          state.opt_state, target)
      return state.replace(opt_state=opt_state)
    return jax.jit(convert, out_shardings=self.state_sharding)(state)

  def _train_step(self, state: train_state.TrainState, batch: dict[str, jax.Array]):
    example = self.format(batch, stream=state.step)
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
    if num % self.mesh.shape["data"] == 0:
      batch = jax.lax.with_sharding_constraint(batch, self.data_sharding)
    return batch


def _process_rows(data_sharding: NamedSharding, batch_size: int) -> np.ndarray:
  """The batch rows on this process's devices of ``data_sharding``, in order."""
  spans = {(slice(None) if index is None else index[0]).indices(batch_size)[:2]
           for index in data_sharding.addressable_devices_indices_map((batch_size,)).values()}
  return np.concatenate([np.arange(start, stop) for start, stop in sorted(spans)])


def _is_primary() -> bool:
  """Whether this is the process that writes the workdir's files (the first)."""
  return jax.process_index() == 0


@contextlib.contextmanager
def _lock_workdir(workdir: str) -> Iterator[None]:
  """Holds an exclusive flock on ``workdir/lock`` (released by the kernel when the process
  ends, however it ends); raises WorkdirLockedError if another process holds it."""
  fd = os.open(os.path.join(workdir, "lock"), os.O_RDWR | os.O_CREAT, 0o644)
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = os.pread(fd, 1000, 0).decode(errors="replace").strip()
      raise WorkdirLockedError(
          f"{workdir} is in use by another run ({holder or 'holder unknown'}); wait for it "
          "to finish or stop it, or use another workdir") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on host {socket.gethostname()}, started "
              f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode(), 0)
    try:
      yield
    finally:
      os.ftruncate(fd, 0)  # a lock file with a holder's pid left in it means a killed run
  finally:
    os.close(fd)


def _write_atomic(path: str, text: str) -> None:
  """Writes ``text`` to a temporary file beside ``path``, then renames it over ``path``."""
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w") as f:
    f.write(text)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in tree.items():
    out.update(_flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v})
  return out


def _read_config_json(path: str) -> tuple[dict[str, Any] | None, str | None]:
  """``(config, None)``: config.json flattened; ``(None, None)`` if there is none;
  ``(None, why)`` if it cannot be read."""
  if not os.path.exists(path):
    return None, None
  try:
    with open(path) as f:
      tree = json.load(f)
  except (OSError, ValueError) as e:  # JSONDecodeError and UnicodeDecodeError included
    return None, _first_line(e)
  if not isinstance(tree, dict):
    return None, f"not a JSON object but a {type(tree).__name__}"
  return _flatten(tree), None


def _alters_training(field: str, old: dict[str, Any], new: dict[str, Any]) -> bool:
  if field == "train.num_steps":  # the cosine schedule decays over num_steps
    return "cosine" in (old.get("optimizer.schedule"), new.get("optimizer.schedule"))
  return field not in HARMLESS_CHANGES


def _describe(field: str, old: dict[str, Any], new: dict[str, Any]) -> str:
  return f"{field}: {old.get(field)!r} in the workdir, {new.get(field)!r} now"


def _compare_configs(workdir: str, old: dict[str, Any], new: dict[str, Any],
                     resuming: bool, allow_config_change: bool) -> dict[str, Any]:
  """Raises if ``new`` may not resume the run of ``old`` (flattened configs); returns the
  changed fields as ``{field: {"old", "new", "alters_training"}}``."""
  old = {**{k: v for k, v in ADDED_FIELDS.items() if k in new}, **old}
  changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
  identity = [k for k in changed if k.startswith(("task.", "model."))]
  if identity:
    raise IncompatibleWorkdirError(
        f"{workdir} holds a run of another task or model; use a new workdir. "
        "Differences: " + "; ".join(_describe(k, old, new) for k in identity))
  altering = [k for k in changed if _alters_training(k, old, new)]
  if resuming and altering and not allow_config_change:
    raise ConfigChangeError(
        f"{workdir} holds checkpoints made with another config, and these changes alter "
        "how training proceeds: " + "; ".join(_describe(k, old, new) for k in altering)
        + ". Rerun with the workdir's values, use a new workdir, or pass "
        "--allow_config_change (allow_config_change=True) to resume with the new values "
        "(recorded in config_history.jsonl).")
  return {k: {"old": old.get(k), "new": new.get(k), "alters_training": k in altering}
          for k in changed}


def _restore_newest_intact(workdir: str, exp: Experiment, manager: ocp.CheckpointManager
                           ) -> tuple[train_state.TrainState | None, int | None,
                                      list[tuple[int, str]]]:
  """Restores the newest checkpoint whose metadata and data read back, finite.

  Returns:
    ``(state, step, damaged)``: ``(None, None, [])`` if there is no checkpoint;
    ``damaged`` lists ``(step, reason)`` of the newer checkpoints that failed.

  Raises:
    IncompatibleWorkdirError: a checkpoint holds parameters of another model.
    DamagedWorkdirError: there are checkpoints but none restores.
  """
  abstract = exp.abstract_state()
  want = _shapes(abstract.params)
  flat_layout = _leaf_shapes(exp.abstract_flat_state().opt_state)
  damaged = []
  for step in sorted(manager.all_steps(), reverse=True):
    try:
      metadata = manager.item_metadata(step)
    except Exception as e:  # Whatever reading damaged metadata raises.
      metadata, why = None, f"unreadable metadata: {_first_line(e)}"
    else:
      why = "metadata missing"
    if metadata is None or "params" not in metadata:
      damaged.append((step, why))
      continue
    saved = _shapes(metadata["params"])
    if saved != want:
      diffs = [f"{k}: {saved.get(k)} saved, {want.get(k)} expected"
               for k in sorted(set(saved) | set(want)) if saved.get(k) != want.get(k)]
      raise IncompatibleWorkdirError(
          f"{workdir}: the parameters of checkpoint {step} do not match the model of this "
          f"config; use a new workdir. Differences: " + "; ".join(diffs[:5]))
    flat = "opt_state" in metadata and _leaf_shapes(metadata["opt_state"]) == flat_layout
    try:
      state = manager.restore(step, args=ocp.args.StandardRestore(
          exp.abstract_flat_state() if flat else abstract))
    except Exception as e:  # TensorStore reports damaged data as a ValueError.
      damaged.append((step, f"unreadable data: {_first_line(e)}"))
      continue
    if flat:
      logging.info("Checkpoint %d keeps the optimizer moments flat; converting them to the "
                   "parameters' shapes.", step)
      state = exp.from_flat_state(state)
    if not bool(_all_finite((state.params, state.opt_state))):
      damaged.append((step, "non-finite values"))
      continue
    return state, step, damaged
  if damaged:
    raise DamagedWorkdirError(
        f"no checkpoint in {manager.directory} can be restored ("
        + "; ".join(f"step {s}: {why}" for s, why in damaged)
        + "); move the checkpoints aside to start over, or use a new workdir.")
  return None, None, []


def _first_line(error: BaseException, limit: int = 300) -> str:
  """The type and first line of the innermost cause of ``error``."""
  while error.__cause__ is not None:
    error = error.__cause__
  text = str(error).strip().splitlines()
  return f"{type(error).__name__}: {text[0][:limit] if text else ''}"


def _move_damaged(workdir: str, manager: ocp.CheckpointManager,
                  damaged: list[tuple[int, str]]) -> None:
  """Moves damaged checkpoints to ``workdir/damaged_checkpoints/`` (so that the steps can
  be saved again) and logs why."""
  if not damaged:
    return
  target_dir = os.path.join(workdir, "damaged_checkpoints")
  os.makedirs(target_dir, exist_ok=True)
  for step, why in damaged:
    target = os.path.join(target_dir, str(step))
    n = 0
    while os.path.exists(target):
      n += 1
      target = os.path.join(target_dir, f"{step}.{n}")
    os.rename(os.path.join(str(manager.directory), str(step)), target)
    logging.warning("Skipping checkpoint %d (%s); moved it to %s.", step, why, target)
  manager.reload()


def _shapes(tree) -> dict[str, tuple[int, ...]]:
  leaves = jax.tree_util.tree_flatten_with_path(dict(tree))[0]
  return {jax.tree_util.keystr(path): tuple(leaf.shape) for path, leaf in leaves}


def _leaf_shapes(tree) -> list[tuple[int, ...]]:
  return [tuple(leaf.shape) for leaf in jax.tree.leaves(tree)]


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


def _read_metrics(path: str, last_step: int | None) -> list[dict[str, Any]]:
  """The records of ``metrics.jsonl`` up to ``last_step`` (none if None); logs what it
  drops: unreadable lines (a torn write) and records past the step training resumes from."""
  if not os.path.exists(path):
    return []
  with open(path, errors="replace") as f:
    lines = [line for line in f if line.strip()]
  kept, torn, later = [], 0, 0
  for line in lines:
    try:
      record = json.loads(line)
      step = record["step"]
    except (ValueError, TypeError, KeyError):
      torn += 1
      continue
    if last_step is not None and step <= last_step:
      kept.append(record)
    else:
      later += 1
  if torn:
    logging.warning("%s: dropped %d unreadable line(s).", path, torn)
  if later:
    logging.warning("%s: dropped %d record(s) %s.", path, later,
                    "of a run without checkpoints" if last_step is None
                    else f"past step {last_step}, where training resumes")
  return kept


class _MetricsLog:
  """``metrics.jsonl``, also kept in memory: one whole, flushed line per record; the file is
  rewritten from memory (atomically) if it is deleted or replaced during the run."""

  def __init__(self, path: str, records: list[dict[str, Any]], write: bool = True):
    self.path = path
    self.records = list(records)
    self.write = write  # False: in memory only (the processes but the first of a run).
    self.file: Any = None
    if write:
      self._rewrite()

  def _rewrite(self) -> None:
    if self.file is not None:
      self.file.close()
    _write_atomic(self.path, "".join(json.dumps(r) + "\n" for r in self.records))
    self.file = open(self.path, "a")

  def _vanished(self) -> bool:
    try:
      on_disk = os.stat(self.path)
    except FileNotFoundError:
      return True
    ours = os.fstat(self.file.fileno())
    return (on_disk.st_dev, on_disk.st_ino) != (ours.st_dev, ours.st_ino)

  def _repair(self) -> None:
    if self._vanished():
      logging.warning("%s was deleted or replaced during the run; rewriting its %d records.",
                      self.path, len(self.records))
      self._rewrite()

  def append(self, record: dict[str, Any]) -> None:
    self.records.append(record)
    if not self.write:
      return
    self.file.write(json.dumps(record) + "\n")
    self.file.flush()
    self._repair()

  def close(self) -> None:
    if self.write:
      self._repair()
      self.file.close()


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       allow_config_change: bool = False) -> dict[str, Any]:
  """Trains (or resumes) the run of ``config`` in ``workdir``, then evaluates it.

  See the module docstring for what holds about locking, resuming after damage and config
  changes.

  Args:
    config: see ``configs/copy.py`` for the fields.
    workdir: output directory (created).
    allow_config_change: resume even if the config changes fields that alter the training
      trajectory (the seed, the optimizer, the batch size, label smoothing, or
      ``num_steps`` under the cosine schedule); the change is recorded in
      ``config_history.jsonl``.

  Returns:
    The final results: ``{"step", "buckets": {name: {...metrics}}, ...}`` (also written to
    ``results.json``).

  Raises:
    ValueError: an invalid config value (:func:`validate_config`); nothing is written.
    WorkdirLockedError: another live run holds the workdir.
    IncompatibleWorkdirError: the workdir holds a run of another task or model; nothing is
      written (but ``lock``).
    ConfigChangeError: (an IncompatibleWorkdirError) resuming with changes that alter
      training, without ``allow_config_change``; nothing is written (but ``lock``).
    DamagedWorkdirError: the workdir holds checkpoints and none can be restored.
    NonFiniteLossError: the loss or the parameters became NaN or infinite; the last good
      checkpoint is kept and nothing non-finite is saved.
  """
  start_time = time.time()
  validate_config(config)
  exp = Experiment(config)
  os.makedirs(workdir, exist_ok=True)
  ckpt_dir = os.path.abspath(os.path.join(workdir, "checkpoints"))
  # In a multi-process run every process trains and saves its shards of the checkpoints;
  # the first holds the lock and writes the other files.
  lock = _lock_workdir(workdir) if _is_primary() else contextlib.nullcontext()
  with lock, ocp.CheckpointManager(
      ckpt_dir, options=ocp.CheckpointManagerOptions(
          max_to_keep=config.train.keep_checkpoints, create=False,
          cleanup_tmp_directories=True),
      item_handlers=ocp.StandardCheckpointHandler()) as manager:
    state, latest = _prepare_workdir(workdir, config, exp, manager, allow_config_change)
    return _train_and_evaluate(config, workdir, exp, manager, state, latest, start_time)


def _prepare_workdir(workdir: str, config: ml_collections.ConfigDict, exp: Experiment,
                     manager: ocp.CheckpointManager, allow_config_change: bool
                     ) -> tuple[train_state.TrainState, int | None]:
  """Checks the workdir against the config (raising before anything is written), restores
  the newest intact checkpoint, then writes config.json and its history; returns the
  state to train from and its checkpoint step (None for a new run)."""
  config_path = os.path.join(workdir, "config.json")
  history_path = os.path.join(workdir, "config_history.jsonl")
  old, unreadable = _read_config_json(config_path)
  new = _flatten(json.loads(config.to_json()))
  resuming = bool(manager.all_steps())
  changes = {} if old is None else _compare_configs(workdir, old, new, resuming,
                                                     allow_config_change)
  state, latest, damaged = _restore_newest_intact(workdir, exp, manager)

  if not _is_primary():
    manager.reload()  # (the first process moves damaged checkpoints aside)
    return (exp.init_state() if latest is None else state), latest  # type: ignore[return-value]
  _move_damaged(workdir, manager, damaged)
  if latest is None:
    state = exp.init_state()
    if os.path.exists(history_path):
      os.remove(history_path)  # it described checkpoints that are gone
  elif changes or old is None:
    entry = {"step": latest, "time": time.strftime("%Y-%m-%d %H:%M:%S"), "changes": changes}
    if old is None:
      entry["note"] = (f"config.json was {'unreadable' if unreadable else 'missing'}; "
                       "the config of this run replaced it without comparison")
      logging.warning("%s is %s; resuming without comparing configs, and replacing it.",
                      config_path, f"unreadable ({unreadable})" if unreadable else "missing")
    with open(history_path, "a") as f:
      f.write(json.dumps(entry) + "\n")
  _write_atomic(config_path, config.to_json(indent=2))
  return state, latest  # type: ignore[return-value]


def _train_and_evaluate(config, workdir, exp, manager, state, latest, start_time):
  """The training loop, final evaluation and figures of train_and_evaluate."""
  num_steps = config.train.num_steps
  start = int(state.step)
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
          f"checkpoint (step {last_good}) is kept in {manager.directory}; lower the learning "
          "rate or clip gradients harder and rerun.")

  metrics_path = os.path.join(workdir, "metrics.jsonl")
  metrics_log = _MetricsLog(metrics_path, _read_metrics(metrics_path, latest),
                            write=_is_primary())
  with contextlib.closing(metrics_log):
    for step in range(start + 1, num_steps + 1):
      state, metrics = exp.train_step(state, exp.sample_train_batch(step - 1))
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
        metrics_log.append(record)
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
  # Figures read whole parameters: in a multi-process run, every process gathers them (a
  # collective) and the first draws from its host copy, with dense attention on one device.
  params = (state.params if jax.process_count() == 1
            else multihost_utils.process_allgather(state.params, tiled=True))
  if not _is_primary():
    return results
  _write_atomic(os.path.join(workdir, "results.json"), json.dumps(results, indent=2))
  print(evaluation.format_table(results), flush=True)
  for d in results.get("decodes", ()):
    print(f"greedy decode: {d['input']} -> {d['output']}", flush=True)
  if config.plots:
    try:
      plotting.learning_curves(metrics_path, os.path.join(workdir, "curves.png"))
      plotting.attention_maps(exp, params, workdir)
    except Exception:  # The run is done and its results are written: figures are extras.
      logging.exception("Plotting failed; results.json and metrics.jsonl are complete.")
  return results
