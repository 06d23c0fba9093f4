"""Tests of attnjax.toy.train: smoke runs, resumption, workdir checks, NaN stop, data parallel."""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from absl import flags
from ml_collections import config_flags

from attnjax.toy import evaluation, train
from configs import annotated_copy, associative_recall, duplicate, reverse
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
  straight = train.train_and_evaluate(_smoke(**{"train.num_steps": 20}), str(tmp_path / "s"))
  assert resumed["buckets"] == straight["buckets"]  # same data, dropout and updates

  again = train.train_and_evaluate(_smoke(**{"train.num_steps": 20}), workdir)
  assert "already finished at step 20" in capsys.readouterr().out
  assert again["buckets"] == resumed["buckets"] and _steps(workdir) == [10, 20]


def test_incompatible_workdir_is_an_error_and_nothing_is_written(copy_run):
  workdir = copy_run[0]
  before = {name: os.path.getmtime(os.path.join(workdir, name)) for name in os.listdir(workdir)}
  with pytest.raises(train.IncompatibleWorkdirError, match="model.d_model: 32 in the"):
    train.train_and_evaluate(_smoke(**{"model.d_model": 48}), workdir)
  # Same config.json but another model in the checkpoint (config.json edited by hand).
  os.rename(os.path.join(workdir, "config.json"), os.path.join(workdir, "config.bak"))
  try:
    with pytest.raises(train.IncompatibleWorkdirError, match="parameters of checkpoint 10"):
      train.train_and_evaluate(_smoke(**{"model.mlp_dim": 16}), workdir)
  finally:
    os.rename(os.path.join(workdir, "config.bak"), os.path.join(workdir, "config.json"))
  after = {name: os.path.getmtime(os.path.join(workdir, name)) for name in os.listdir(workdir)}
  assert after == before


def test_nan_loss_stops_training_and_keeps_the_last_good_checkpoint(copy_run, tmp_path):
  workdir = str(tmp_path / "nan")
  shutil.copytree(copy_run[0], workdir)
  config = _smoke(**{"train.num_steps": 30, "optimizer.learning_rate": float("nan")})
  with pytest.raises(train.NonFiniteLossError, match=r"last good checkpoint \(step 10\)"):
    train.train_and_evaluate(config, workdir)
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
            jax.jit(exp.sample_train_batch)(0)["inputs"].sharding.num_devices)
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
