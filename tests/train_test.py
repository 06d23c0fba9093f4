"""Tests of attnjax.toy.train: smoke runs, resumption, workdir checks, NaN stop, data parallel,
config validation, and runs that are killed, concurrent or left with damaged files."""

import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest
from absl import flags
from ml_collections import config_flags

from attnjax.toy import evaluation, train
from configs import (
    annotated_copy,
    associative_recall,
    copy_extrapolate,
    duplicate,
    duplicate_extrapolate,
    reverse,
    reverse_extrapolate,
)
from configs import copy as copy_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _smoke(module=copy_config, **overrides) -> ml_collections.ConfigDict:
  config = module.get_config("smoke")
  config.train.num_steps = 10
  config.train.checkpoint_every = 10
  config.optimizer.schedule = "constant"  # so that extending a run does not change its past
  config.plots = False
  config.update_from_flattened_dict(overrides)
  return config


def _steps(workdir):
  return sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())


def _metric_steps(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line)["step"] for line in f]


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
  """The runs here compile the same programs again and again: cache them on disk."""
  old = {name: getattr(jax.config, name) for name in (
      "jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")}
  jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("jax_cache")))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  yield
  for name, value in old.items():
    jax.config.update(name, value)


@pytest.fixture(scope="module")
def copy_run(tmp_path_factory):
  """A finished 10-step smoke run of the copy task (with plots)."""
  workdir = str(tmp_path_factory.mktemp("copy"))
  results = train.train_and_evaluate(_smoke(plots=True), workdir)
  return workdir, results


def test_smoke_run_writes_every_output(copy_run):
  workdir, results = copy_run
  assert _steps(workdir) == [10]
  for name in ("config.json", "metrics.jsonl", "results.json", "curves.png", "attention_0.png"):
    assert os.path.exists(os.path.join(workdir, name)), name
  assert _metric_steps(workdir) == [5, 10]
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    record = json.loads(f.readlines()[-1])
  for key in ("train_loss", "train_token_accuracy", "train_steps_per_sec",
              "train_tokens_per_sec", "eval_loss", "eval_token_accuracy", "eval_exact_match"):
    assert np.isfinite(record[key]), key
  assert set(results["buckets"]) == {"train", "2x"}
  for row in results["buckets"].values():
    assert 0.0 <= row["exact_match"] <= row["token_accuracy"] + 1e-9 <= 1.0 + 1e-9
  with open(os.path.join(workdir, "results.json")) as f:
    assert json.load(f)["buckets"] == results["buckets"]


@pytest.mark.parametrize("module, arch", [
    (reverse, "encoder_decoder"), (duplicate, "decoder_only"),
    (associative_recall, "decoder_only"), (annotated_copy, "encoder_decoder")])
def test_smoke_run_of_each_task(tmp_path, module, arch):
  config = _smoke(module, **{"model.arch": arch, "train.num_steps": 4,
                             "train.checkpoint_every": 4, "train.log_every": 2,
                             "train.eval_every": 0, "eval.check_overlap": False})
  config.eval.length_multipliers = ()
  results = train.train_and_evaluate(config, str(tmp_path))
  assert _steps(str(tmp_path)) == [4]
  assert results["step"] == 4 and set(results["buckets"]) == {"train"}


def test_rerun_resumes_and_matches_an_uninterrupted_run(copy_run, tmp_path, capsys):
  workdir = str(tmp_path / "resumed")
  shutil.copytree(copy_run[0], workdir)
  resumed = train.train_and_evaluate(_smoke(**{"train.num_steps": 20}), workdir)
  assert "Resuming from step 10" in capsys.readouterr().out
  assert _steps(workdir) == [10, 20] and _metric_steps(workdir) == [5, 10, 15, 20]
  # Extending a run under the constant schedule needs no permission, and is recorded.
  (entry,) = _history(workdir)
  assert entry["step"] == 10 and entry["changes"]["train.num_steps"] == {
      "old": 10, "new": 20, "alters_training": False}
  straight = train.train_and_evaluate(_smoke(**{"train.num_steps": 20}), str(tmp_path / "s"))
  assert resumed["buckets"] == straight["buckets"]  # same data, dropout and updates

  again = train.train_and_evaluate(_smoke(**{"train.num_steps": 20}), workdir)
  assert "already finished at step 20" in capsys.readouterr().out
  assert again["buckets"] == resumed["buckets"] and _steps(workdir) == [10, 20]


def test_a_checkpoint_with_flat_optimizer_moments_resumes_converted(copy_run, tmp_path):
  # Runs before the moments took the parameters' shapes saved them as one flat vector each
  # (optax.flatten: the leaves' ravels concatenated in tree order).
  exp = train.Experiment(_smoke())
  with ocp.CheckpointManager(os.path.join(copy_run[0], "checkpoints"),
                             item_handlers=ocp.StandardCheckpointHandler()) as manager:
    state = manager.restore(10, args=ocp.args.StandardRestore(exp.abstract_state()))
  clip, (adam, schedule) = state.opt_state
  flat = adam._replace(**{name: np.concatenate([np.ravel(x) for x in jax.tree.leaves(
      getattr(adam, name))]) for name in ("mu", "nu")})
  old = state.replace(opt_state=(clip, (flat, schedule)))
  workdir = tmp_path / "checkpoints"
  with ocp.CheckpointManager(workdir, item_handlers=ocp.StandardCheckpointHandler()) as manager:
    manager.save(10, args=ocp.args.StandardSave(old))
    manager.wait_until_finished()
    assert manager.item_metadata(10)["opt_state"][1][0]["mu"].shape == (
        sum(x.size for x in jax.tree.leaves(state.params)),)
    restored, step, damaged = train._restore_newest_intact(str(tmp_path), exp, manager)
  assert step == 10 and not damaged
  assert jax.tree.structure(restored) == jax.tree.structure(state)
  jax.tree.map(np.testing.assert_array_equal, restored, state)
  assert jax.tree.map(lambda x: x.sharding, restored) == exp.state_sharding


def _mtimes(workdir):
  """Modification times of the workdir's entries but ``lock`` (which every run rewrites)."""
  return {name: os.path.getmtime(os.path.join(workdir, name)) for name in os.listdir(workdir)
          if name != "lock"}


def _history(workdir):
  with open(os.path.join(workdir, "config_history.jsonl")) as f:
    return [json.loads(line) for line in f]


def test_incompatible_workdir_is_an_error_and_nothing_is_written(copy_run):
  workdir = copy_run[0]
  before = _mtimes(workdir)
  with pytest.raises(train.IncompatibleWorkdirError, match="model.d_model: 32 in the"):
    train.train_and_evaluate(_smoke(**{"model.d_model": 48}), workdir)
  # Same config.json but another model in the checkpoint (config.json edited by hand).
  os.rename(os.path.join(workdir, "config.json"), os.path.join(workdir, "config.bak"))
  try:
    with pytest.raises(train.IncompatibleWorkdirError, match="parameters of checkpoint 10"):
      train.train_and_evaluate(_smoke(**{"model.mlp_dim": 16}), workdir)
  finally:
    os.rename(os.path.join(workdir, "config.bak"), os.path.join(workdir, "config.json"))
  assert _mtimes(workdir) == before


def test_workdir_from_before_an_added_field_resumes_with_its_old_value(copy_run, tmp_path):
  workdir = str(tmp_path / "old")
  shutil.copytree(copy_run[0], workdir)
  path = os.path.join(workdir, "config.json")
  with open(path) as f:
    old = json.load(f)
  del old["model"]["t5_max_distance"]  # As written before the field existed.
  with open(path, "w") as f:
    json.dump(old, f)
  extended = train.train_and_evaluate(_smoke(**{"train.num_steps": 12}), workdir)
  assert extended["step"] == 12
  with pytest.raises(train.IncompatibleWorkdirError, match="model.t5_max_distance: 128 in the "
                     "workdir, 64 now"):
    train.train_and_evaluate(_smoke(**{"train.num_steps": 12, "model.t5_max_distance": 64}),
                             workdir)


def test_nan_loss_stops_training_and_keeps_the_last_good_checkpoint(copy_run, tmp_path):
  workdir = str(tmp_path / "nan")
  shutil.copytree(copy_run[0], workdir)
  # Adam moves every parameter by about the learning rate: 1e30 overflows within 3 steps.
  config = _smoke(**{"train.num_steps": 30, "optimizer.learning_rate": 1e30})
  with pytest.raises(train.NonFiniteLossError, match=r"last good checkpoint \(step 10\)"):
    train.train_and_evaluate(config, workdir, allow_config_change=True)
  assert _steps(workdir) == [10]


def test_unknown_or_mistyped_config_keys_are_errors():
  config = copy_config.get_config()
  with pytest.raises(AttributeError):
    config.model.num_layer = 4
  path = os.path.join(REPO, "configs", "copy.py")

  def parse(override):
    argv = ["prog", f"--config={path}:smoke", override]
    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=values, sys_argv=argv,
                                    lock_config=True)
    values(argv)
    return values.config

  assert parse("--config.model.num_layers=3").model.num_layers == 3
  # Optional fields are typed placeholders: None by default, settable from the command line.
  assert parse("--config.model.num_layers=3").model.num_kv_heads is None
  assert parse("--config.model.num_kv_heads=2").model.num_kv_heads == 2
  assert parse("--config.model.implementation=blockwise").model.implementation == "blockwise"
  for bad in ("--config.model.num_layer=3", "--config.modle.num_layers=3",
              "--config.train.batch_size=big", "--config.model.num_kv_heads=two"):
    with pytest.raises((AttributeError, KeyError, flags.Error)):
      parse(bad)


def test_noam_schedule_and_label_smoothed_loss_match_closed_forms():
  config = copy_config.get_config()
  config.optimizer.schedule = "noam"
  config.optimizer.learning_rate = 2.0
  config.optimizer.warmup_steps = 400
  schedule = train.learning_rate_schedule(config)
  for step in (1, 10, 400, 401, 5000):  # 1-based, as in the Annotated Transformer
    want = 2.0 * 64**-0.5 * min(step**-0.5, step * 400**-1.5)
    np.testing.assert_allclose(schedule(step - 1), want, rtol=1e-6)

  logits = jax.random.normal(jax.random.key(0), (2, 3, 5))
  labels = jnp.array([[1, 2, 0], [4, 4, 3]])
  weights = jnp.array([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
  loss, sums = evaluation.loss_and_metrics(
      logits, {"labels": labels, "weights": weights}, label_smoothing=0.1)
  logp = np.asarray(jax.nn.log_softmax(logits))
  target = np.full((2, 3, 5), 0.1 / 5) + 0.9 * np.eye(5)[np.asarray(labels)]
  per_token = -(target * logp).sum(-1)
  np.testing.assert_allclose(loss, (per_token * weights).sum() / 5, rtol=1e-5)
  nll = -np.take_along_axis(logp, np.asarray(labels)[..., None], -1)[..., 0]
  np.testing.assert_allclose(sums["loss"], (nll * weights).sum(), rtol=1e-5)
  assert sums["tokens"] == 5 and sums["sequences"] == 2


DATA_PARALLEL = textwrap.dedent("""
    import os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    import jax, numpy as np
    from attnjax.toy import train
    from configs import copy
    assert jax.device_count() == 8
    config = copy.get_config("smoke")
    config.model.dropout_rate = 0.1
    runs = []
    for devices in (jax.devices(), jax.devices()[:1]):
      exp = train.Experiment(config, devices=devices)
      state = exp.init_state()
      for _ in range(3):
        state, metrics = exp.train_step(state)
      runs.append((state.params, metrics))
      print(len(exp.mesh.devices.ravel()), "devices, sharding of a batch:",
            exp.sample_train_batch(0)["inputs"].sharding.num_devices)
    (params8, metrics8), (params1, metrics1) = runs
    for name in ("loss", "correct", "grad_norm"):
      np.testing.assert_allclose(metrics8[name], metrics1[name], rtol=1e-5)
    flat1 = dict(jax.tree_util.tree_flatten_with_path(params1)[0])
    for path, a in jax.tree_util.tree_flatten_with_path(params8)[0]:
      name = jax.tree_util.keystr(path)
      if "['key']['bias']" in name:
        # Softmax ignores a per-query constant: this gradient is zero up to rounding,
        # which Adam's normalisation scales up to a learning-rate-sized step.
        continue
      np.testing.assert_allclose(a, flat1[path], rtol=2e-5, atol=2e-6, err_msg=name)
    print("OK")
""")


def test_data_parallel_step_on_8_devices_matches_one_device():
  env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
  env.pop("XLA_FLAGS", None)
  proc = subprocess.run([sys.executable, "-c", DATA_PARALLEL], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "8 devices, sharding of a batch: 8" in proc.stdout
  assert "1 devices, sharding of a batch: 1" in proc.stdout
  assert proc.stdout.strip().endswith("OK")


@pytest.mark.parametrize("field, value", [
    ("train.log_every", 0), ("train.checkpoint_every", 0), ("train.batch_size", 0),
    ("train.num_steps", -5), ("train.num_steps", 0), ("train.eval_every", -1),
    ("train.keep_checkpoints", 0), ("train.label_smoothing", 1.0),
    ("optimizer.learning_rate", float("nan")), ("optimizer.learning_rate", -1e-3),
    ("optimizer.warmup_steps", -1), ("optimizer.b2", 1.0), ("optimizer.eps", float("inf")),
    ("optimizer.grad_clip_norm", -1.0), ("eval.num_sequences", 0),
    ("eval.length_multipliers", (2, 0)), ("eval.num_attention_examples", -1)])
def test_invalid_config_values_are_refused_before_anything_is_written(tmp_path, field, value):
  config = _smoke(**{field: value})
  message = rf"config\.{re.escape(field)} must be .*, got {re.escape(repr(value))}"
  with pytest.raises(ValueError, match=message):
    train.validate_config(config)
  with pytest.raises(ValueError, match=message):
    train.train_and_evaluate(config, str(tmp_path / "run"))
  assert not os.path.exists(tmp_path / "run")


def test_every_shipped_config_is_valid_and_errors_are_reported_together():
  for module in (copy_config, reverse, duplicate, associative_recall, annotated_copy,
                 copy_extrapolate, reverse_extrapolate, duplicate_extrapolate):
    for arg in (None, "smoke"):
      train.validate_config(module.get_config(arg))
      train.make_model(module.get_config(arg), train.make_task(module.get_config(arg)))
  with pytest.raises(ValueError, match=r"batch_size must be .* got 0; .*log_every must be"):
    train.validate_config(_smoke(**{"train.log_every": 0, "train.batch_size": 0}))


@pytest.mark.parametrize("overrides", [
    {"optimizer.learning_rate": 1e-3}, {"seed": 1}, {"train.batch_size": 8},
    {"train.label_smoothing": 0.1}, {"optimizer.schedule": "cosine"},
    # num_steps sets the length of a cosine schedule's decay.
    {"train.num_steps": 20, "optimizer.schedule": "cosine"}])
def test_resuming_with_a_change_that_alters_training_is_refused(copy_run, overrides):
  workdir = copy_run[0]
  before = _mtimes(workdir)
  field, value = next(iter(overrides.items()))
  with pytest.raises(train.ConfigChangeError,
                     match=rf"{re.escape(field)}: .* in the workdir, {re.escape(repr(value))} now"
                     r".*--allow_config_change"):
    train.train_and_evaluate(_smoke(**overrides), workdir)
  assert _mtimes(workdir) == before


def test_an_allowed_config_change_is_recorded(copy_run, tmp_path):
  workdir = str(tmp_path / "changed")
  shutil.copytree(copy_run[0], workdir)
  config = _smoke(**{"optimizer.learning_rate": 1e-3, "eval.check_overlap": False})
  train.train_and_evaluate(config, workdir, allow_config_change=True)  # evaluates only
  (entry,) = _history(workdir)
  assert entry["step"] == 10 and entry["changes"] == {
      "optimizer.learning_rate": {"old": 3e-3, "new": 1e-3, "alters_training": True},
      "eval.check_overlap": {"old": True, "new": False, "alters_training": False},
      "plots": {"old": True, "new": False, "alters_training": False}}
  with open(os.path.join(workdir, "config.json")) as f:
    assert json.load(f)["optimizer"]["learning_rate"] == 1e-3


def test_metrics_deleted_during_a_run_are_rewritten_and_a_plotting_error_is_logged(
    tmp_path, monkeypatch, caplog):
  workdir = str(tmp_path / "run")
  metrics_path = os.path.join(workdir, "metrics.jsonl")
  summarize_bucket = evaluation.summarize_bucket

  def delete_metrics_then_summarize(*args, **kwargs):  # first called at the step-10 eval
    if os.path.exists(metrics_path) and _metric_steps(workdir) == [5]:
      os.remove(metrics_path)
    return summarize_bucket(*args, **kwargs)

  def fail(*args, **kwargs):
    raise RuntimeError("no display")

  monkeypatch.setattr(evaluation, "summarize_bucket", delete_metrics_then_summarize)
  monkeypatch.setattr(train.plotting, "attention_maps", fail)
  results = train.train_and_evaluate(_smoke(plots=True), workdir)
  assert _metric_steps(workdir) == [5, 10]
  assert "deleted or replaced during the run" in caplog.text
  assert "Plotting failed" in caplog.text and "no display" in caplog.text
  assert os.path.exists(os.path.join(workdir, "curves.png"))  # drawn before the failure
  with open(os.path.join(workdir, "results.json")) as f:
    assert json.load(f)["buckets"] == results["buckets"]


# The command line, in separate processes: concurrent, killed and damaged runs.
# The fields of _smoke(), so that the compiled programs come from the cache.
CLI_FLAGS = ("--config=configs/copy.py:smoke", "--config.plots=False",
             "--config.optimizer.schedule=constant", "--config.eval.check_overlap=False",
             "--config.train.checkpoint_every=5")


def _cli(workdir, *flags):
  """Starts the command (smoke config, checkpoints every 5 steps) on ``workdir``, with its
  output in files beside the workdir and the test's compilation cache."""
  env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
         "JAX_COMPILATION_CACHE_DIR": jax.config.jax_compilation_cache_dir,
         "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
  env.pop("XLA_FLAGS", None)
  log = f"{workdir}.{len(glob.glob(workdir + '.*.out'))}"
  with open(log + ".out", "w") as out, open(log + ".err", "w") as err:
    proc = subprocess.Popen(
        [sys.executable, "-m", "experiments.copy_task", f"--workdir={workdir}", *CLI_FLAGS,
         *flags], cwd=REPO, env=env, stdout=out, stderr=err)
  proc.out, proc.err = log + ".out", log + ".err"
  return proc


def _finish(proc):
  """Waits for ``proc``; returns ``(returncode, stdout, stderr)``."""
  proc.wait(timeout=600)
  with open(proc.out) as out, open(proc.err) as err:
    return proc.returncode, out.read(), err.read()


def _wait_until_locked_by(proc, workdir):
  """Polls until ``proc`` holds the workdir (its pid is in ``lock``)."""
  path = os.path.join(workdir, "lock")
  while proc.poll() is None:
    if os.path.exists(path):
      with open(path) as f:
        if f.read().startswith(f"pid {proc.pid} "):
          return
    time.sleep(0.05)
  raise AssertionError(f"the run ended before taking the lock: {_finish(proc)}")


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
  """A 20-step smoke run of the command (checkpoints 10, 15, 20), stopped (SIGSTOP) while it
  held the workdir so that a second run into it could try and fail; returns the workdir
  and both ``(returncode, stdout, stderr, pid)``."""
  workdir = str(tmp_path_factory.mktemp("cli") / "run")
  first = _cli(workdir)
  try:
    _wait_until_locked_by(first, workdir)
    os.kill(first.pid, signal.SIGSTOP)
    try:
      second = _finish(_cli(workdir))
    finally:
      os.kill(first.pid, signal.SIGCONT)
    return workdir, (*_finish(first), first.pid), second
  finally:
    first.kill()


def test_a_second_run_into_a_held_workdir_is_refused_and_the_first_finishes(cli_run):
  workdir, (rc, out, err, pid), (rc2, _, err2) = cli_run
  assert rc2 != 0
  assert re.search(rf"WorkdirLockedError: .* is in use by another run \(pid {pid} on host ",
                   err2), err2[-2000:]
  assert rc == 0, err[-3000:]
  assert "Resuming" not in out and "train" in out  # the results table
  assert _metric_steps(workdir) == [5, 10, 15, 20] and _steps(workdir) == [10, 15, 20]


def test_a_killed_run_does_not_block_the_next_one(cli_run, tmp_path):
  workdir = str(tmp_path / "run")
  shutil.copytree(cli_run[0], workdir)
  flags = ("--config.train.num_steps=30",)
  killed = _cli(workdir, *flags)
  _wait_until_locked_by(killed, workdir)
  assert killed.poll() is None
  killed.send_signal(signal.SIGKILL)
  assert _finish(killed)[0] == -signal.SIGKILL
  rc, out, err = _finish(_cli(workdir, *flags))
  assert rc == 0, err[-3000:]
  assert "Resuming from step 20" in out
  assert _metric_steps(workdir) == [5, 10, 15, 20, 25, 30] and _steps(workdir) == [20, 25, 30]
  (entry,) = _history(workdir)
  assert entry["changes"] == {
      "train.num_steps": {"old": 20, "new": 30, "alters_training": False}}


def test_damaged_files_are_skipped_with_a_log_line(cli_run, tmp_path):
  workdir = str(tmp_path / "run")
  shutil.copytree(cli_run[0], workdir)
  with open(os.path.join(workdir, "config.json")) as f:
    config = json.load(f)
  with open(os.path.join(workdir, "results.json")) as f:
    results = json.load(f)
  # A torn last metrics line, a truncated config.json, checkpoint 20 without its metadata,
  # checkpoint 15 with damaged data: the run resumes from checkpoint 10.
  for name in ("metrics.jsonl", "config.json"):
    path = os.path.join(workdir, name)
    os.truncate(path, os.path.getsize(path) - 40)
  os.remove(os.path.join(workdir, "checkpoints", "20", "default", "_METADATA"))
  data_files = glob.glob(os.path.join(workdir, "checkpoints", "15", "default", "*", "d", "*"))
  assert data_files
  for path in data_files:
    with open(path, "r+b") as f:
      f.write(b"\0" * 64)

  rc, out, err = _finish(_cli(workdir))
  assert rc == 0, err[-3000:]
  assert "Resuming from step 10" in out
  for logged in ("config.json is unreadable (JSONDecodeError",
                 "metrics.jsonl: dropped 1 unreadable line(s)",
                 "metrics.jsonl: dropped 1 record(s) past step 10",
                 "Skipping checkpoint 20 (metadata missing)",
                 "Skipping checkpoint 15 (unreadable data: "):
    assert logged in err, (logged, err[-3000:])
  assert sorted(os.listdir(os.path.join(workdir, "damaged_checkpoints"))) == ["15", "20"]
  assert _steps(workdir) == [10, 15, 20] and _metric_steps(workdir) == [5, 10, 15, 20]
  with open(os.path.join(workdir, "config.json")) as f:
    assert json.load(f) == config
  with open(os.path.join(workdir, "results.json")) as f:
    assert json.load(f)["buckets"] == results["buckets"]  # the same steps, replayed
  assert "config.json was unreadable" in _history(workdir)[0]["note"]
