"""Tests for `experiments/device_check.py`: its smoke form runs on CPU and reports sense.

Only the numerics and benchmark parts run here (the training part is the copy task's smoke
run, which `tests/train_test.py` covers).
"""

import json
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_smoke_run_writes_numerics_and_benchmark(tmp_path):
  out = tmp_path / "device_check.json"
  run = subprocess.run(
      [sys.executable, "-m", "experiments.device_check", "--smoke",
       "--parts=numerics,benchmark", f"--out={out}"],
      cwd=ROOT, capture_output=True, text=True, check=False)
  assert run.returncode == 0, run.stderr[-3000:]
  report = json.loads(out.read_text())
  assert report["machine"]["backend"] == "cpu"
  # On CPU: the pure-JAX implementations, each within tolerance of the float32 reference
  # (which "xla" computes at the highest precision, so it matches itself exactly in float32).
  rows = {(r["case"], r["implementation"]): r for r in report["numerics"]}
  assert {name for _, name in rows} == {"xla", "blockwise"}
  assert all(r["ok"] for r in rows.values()), rows
  assert rows[("causal GQA f32", "blockwise")]["out"] < 1e-5
  assert rows[("packed window bf16", "blockwise")]["out"] > 1e-4  # bfloat16 inputs differ.
  timed = {(r["mode"], r["implementation"]) for r in report["benchmark"] if r.get("ms", 0) > 0}
  for mode in ("fwd", "fwd+bwd"):
    assert {(mode, "attnjax:default"), (mode, "jax.nn:xla")} <= timed
  assert "Numerics" in run.stdout and "Benchmark" in run.stdout
