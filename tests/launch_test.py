"""Tests for attnjax.toy.launch: two localhost processes train the smoke config as one JAX
program (CPU collectives over gloo), match the one-process run, and resume after a kill."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from attnjax.toy import launch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A short constant-rate run (so that num_steps may change on resuming), no figures.
SMOKE = ["--config", "configs/copy.py:smoke", "--config.plots=False",
         "--config.optimizer.schedule=constant", "--config.train.eval_every=0",
         "--config.eval.length_multipliers=()", "--config.eval.check_overlap=False"]


def copy_task(workdir, *flags):
  return [sys.executable, "-m", "experiments.copy_task", "--workdir", str(workdir), *SMOKE,
          *flags]


def launcher(num_processes, command):
  return [sys.executable, "-m", "experiments.launch_local",
          f"--num_processes={num_processes}", "--", *command]


def run(command, **kwargs):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)  # One device per process.
  return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=600, **kwargs)


def final_metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    last = [json.loads(line) for line in f][-1]
  with open(os.path.join(workdir, "results.json")) as f:
    train = json.load(f)["buckets"]["train"]
  return {"step": last["step"], "train_loss": last["train_loss"],
          "train_token_accuracy": last["train_token_accuracy"], "eval_loss": train["loss"],
          "eval_token_accuracy": train["token_accuracy"]}


def children(pid):
  """Pids of the processes whose parent is ``pid``."""
  found = []
  for entry in os.listdir("/proc"):
    if entry.isdigit():
      try:
        with open(f"/proc/{entry}/stat") as f:
          ppid = int(f.read().rsplit(")", 1)[1].split()[1])
      except (OSError, ValueError, IndexError):
        continue
      if ppid == pid:
        found.append(int(entry))
  return found


def test_failure_of_one_process_stops_the_other_and_is_returned(capfd):
  code = ("import os, sys, time\n"
          "print('process', os.environ['ATTNJAX_PROCESS_ID'], 'of',"
          " os.environ['ATTNJAX_NUM_PROCESSES'], flush=True)\n"
          "sys.exit(3) if os.environ['ATTNJAX_PROCESS_ID'] == '1' else time.sleep(600)")
  # (Returns only once the sleeping survivor is stopped.)
  assert launch.launch_local([sys.executable, "-c", code], 2, grace_seconds=1.0) == 3
  out = capfd.readouterr().out
  assert "[0] process 0 of 2" in out and "[1] process 1 of 2" in out


def test_launch_local_errors():
  with pytest.raises(ValueError, match="num_processes >= 1"):
    launch.launch_local(["true"], 0)


def test_initialize_from_environment_needs_every_variable(monkeypatch):
  monkeypatch.setenv(launch.COORDINATOR_ADDRESS, "localhost:1")
  monkeypatch.delenv(launch.NUM_PROCESSES, raising=False)
  with pytest.raises(ValueError, match="or none"):
    launch.initialize_from_environment()


def test_two_processes_match_one_and_resume_after_a_kill(tmp_path):
  one = run(copy_task(tmp_path / "one", "--config.train.num_steps=40"))
  assert one.returncode == 0, one.stderr[-3000:]

  # Two processes, one of them killed once checkpoint 10 is written: the launcher stops the
  # other and fails.
  mp = tmp_path / "mp"
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  first = subprocess.Popen(
      launcher(2, copy_task(mp, "--config.train.num_steps=100000")), cwd=ROOT, env=env,
      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  try:
    while not os.path.isdir(mp / "checkpoints" / "10") and first.poll() is None:
      time.sleep(0.05)
    assert first.poll() is None, first.stdout.read()[-3000:]
    workers = children(first.pid)
    assert len(workers) == 2
    os.kill(workers[1], signal.SIGKILL)
    out, _ = first.communicate(timeout=120)
  finally:
    if first.poll() is None:
      first.kill()
  assert first.returncode != 0, out[-3000:]
  assert not any(os.path.exists(f"/proc/{pid}") for pid in workers), "a process survived"

  # Both restarted: they resume from the newest checkpoint and end as the one-process run.
  second = run(launcher(2, copy_task(mp, "--config.train.num_steps=40")))
  assert second.returncode == 0, second.stdout[-3000:]
  assert "[0] Resuming from step" in second.stdout
  assert "[1] Resuming from step" in second.stdout
  assert os.path.exists(mp / "results.json") and os.path.exists(mp / "config.json")
  # The processes saved Adam's moments in the parameters' shapes, shard by shard.
  with ocp.CheckpointManager(mp / "checkpoints",
                             item_handlers=ocp.StandardCheckpointHandler()) as manager:
    metadata = manager.item_metadata(40)
  shapes = [x.shape for x in jax.tree.leaves(metadata["params"])]
  assert [x.shape for x in jax.tree.leaves(metadata["opt_state"][1][0]["mu"])] == shapes
  expected, got = final_metrics(tmp_path / "one"), final_metrics(mp)
  assert got["step"] == expected["step"] == 40
  for name in expected:
    np.testing.assert_allclose(got[name], expected[name], rtol=1e-4, err_msg=name)
