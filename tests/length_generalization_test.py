"""Tests of attnjax.toy.length_generalization: run configs, the smoke study end to end, and
the summary's medians and ranges."""

import json
import os

import numpy as np
import pytest

from attnjax.toy import length_generalization as lg
from attnjax.toy import train
from configs import length_generalization


def test_run_config_applies_task_then_scheme_overrides_then_seed():
  study = length_generalization.get_config()
  config = lg.run_config(study, "reverse", "hard_alibi", 7)
  assert config.task.name == "reverse" and config.seed == 7
  assert config.train.num_steps == 4000  # the task's override
  assert config.model.position == "hard_alibi"
  assert config.model.hard_alibi_windows == (2, 4, None, None)
  assert config.model.arch == "decoder_only"  # from the study's run config
  with pytest.raises(KeyError, match="scheme 'xpos' has no entry"):
    lg.run_config(study, "copy", "xpos", 1)
  with study.unlocked():
    study.scheme_overrides["bad"] = {"model": {"positions": "rotary"}}
  with pytest.raises(KeyError, match=r"scheme_overrides.bad.model: the run config has no "
                                     r"field 'positions'"):
    lg.run_config(study, "copy", "bad", 1)
  # Every scheme of the full study makes a valid run.
  for scheme in study.schemes:
    for task in study.tasks:
      train.validate_config(lg.run_config(study, task, scheme, 1))
  recall = lg.run_config(study, "associative_recall", "rotary", 1)
  train.validate_config(recall)
  assert recall.task.max_length == 4 and recall.model.short_conv == 3


def test_smoke_study_end_to_end_and_a_rerun_redoes_nothing(tmp_path, monkeypatch):
  study = length_generalization.get_config("smoke")
  summary = lg.run_study(study, str(tmp_path))
  for name in ("results.json", "results.md", "curve_copy.png"):
    assert os.path.getsize(tmp_path / name) > 0
  assert summary["columns"] == ["1x", "2x"]
  table = (tmp_path / "results.md").read_text()
  for scheme in study.schemes:
    with open(lg.run_dir(str(tmp_path), "copy", scheme, 1) + "/results.json") as f:
      run = json.load(f)
    row = summary["runs"]["copy"][scheme]
    assert row["2x"]["values"] == [run["buckets"]["2x"]["exact_match"]]
    assert row["1x"]["median"] == run["buckets"]["train"]["exact_match"]
    assert row["curve"]["lengths"] == [1, 3, 6]  # every third length up to 2 * 4
    assert f"| copy | {scheme} | {row['1x']['median']:.3f}" in table
    assert row["2x"]["symbol_accuracy"]["values"] == [run["buckets"]["2x"]["symbol_accuracy"]]

  def must_not_train(*args, **kwargs):
    raise AssertionError("a finished run was redone")
  monkeypatch.setattr(train, "train_and_evaluate", must_not_train)
  assert lg.run_study(study, str(tmp_path)) == summary


def test_summary_medians_and_ranges_over_seeds(tmp_path):
  study = length_generalization.get_config("smoke")
  with study.unlocked():
    study.seeds = (1, 2, 3)
    study.schemes = ("nope",)
  exact = {1: (1.0, 0.5), 2: (0.9, 0.1), 3: (1.0, 0.2)}  # (train, 2x) per seed
  for seed, (at_1x, at_2x) in exact.items():
    path = lg.run_dir(str(tmp_path), "copy", "nope", seed)
    os.makedirs(path)
    with open(os.path.join(path, "results.json"), "w") as f:
      json.dump({"buckets": {"train": {"exact_match": at_1x}, "2x": {"exact_match": at_2x}},
                 "wall_seconds": 10.0 * seed,
                 "length_curve": {"lengths": [1, 2], "exact_match": [at_1x, at_2x]}}, f)
  row = lg.summarize(study, str(tmp_path))["runs"]["copy"]["nope"]
  assert row["seeds"] == [1, 2, 3]
  assert row["2x"] == {"values": [0.5, 0.1, 0.2], "median": 0.2, "min": 0.1, "max": 0.5}
  assert row["1x"]["median"] == 1.0 and row["1x"]["min"] == 0.9
  assert row["wall_seconds"]["median"] == 20.0
  np.testing.assert_allclose(row["curve"]["median"], [1.0, 0.2])
  np.testing.assert_allclose(row["curve"]["min"], [0.9, 0.1])
  assert "| copy | nope | 1.000 [0.900, 1.000] | 0.200 [0.100, 0.500] | 3 | 20 |" in (
      tmp_path / "results.md").read_text()
