"""The length-generalization study: tasks x position schemes x seeds, one toy run each.

Every run is an ordinary :func:`attnjax.toy.train.train_and_evaluate` run (the config of
``configs/copy.py`` with the study's overrides) in its own subdirectory
``{task}/{scheme}/seed_{seed}`` of the study's workdir, so an interrupted study resumes
where it stopped, and a run whose ``results.json`` exists is not redone. The summary reads
every run's ``results.json`` and writes, to the workdir:

* ``results.json``: per task and scheme, each seed's exact match at every reported length
  (``1x``: the training lengths; then the buckets ``1.5x``, ``2x``, ``4x``, ...) and the
  length curve, with the median, min and max over seeds;
* ``results.md``: the Markdown tables, median [min, max] exact match and symbol accuracy
  (per query, for associative recall) per task x scheme;
* ``curve_{task}.png``: exact match against length, one line (the median over seeds) per
  scheme, the range over seeds shaded.

The study config (``configs/length_generalization.py``) holds the base run config
(``run``), the ``tasks``, the ``schemes`` and ``seeds`` to run, and per-task and per-scheme
overrides of the run config (``task_overrides``, ``scheme_overrides``: nested dicts of run
config fields).

References:
  Kazemnejad et al. 2023, "The Impact of Positional Encoding on Length Generalization in
  Transformers". Ruoss et al. 2023, "Randomized Positional Encodings Boost Length
  Generalization of Transformers". Jelassi et al. 2024, "Repeat After Me". Cho et al. 2024,
  "Position Coupling".
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from typing import Any

import matplotlib
import ml_collections
import numpy as np

from attnjax.toy import train

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def run_config(study: ml_collections.ConfigDict, task: str, scheme: str,
               seed: int) -> ml_collections.ConfigDict:
  """The run config of one (task, scheme, seed): ``study.run`` with the task's overrides,
  then the scheme's, then the seed; locked.

  Raises:
    KeyError: for a scheme without an entry in ``study.scheme_overrides``.
  """
  config = ml_collections.ConfigDict(study.run.to_dict())
  config.task.name = task
  _override(config, study.task_overrides.get(task, {}), f"task_overrides.{task}")
  if scheme not in study.scheme_overrides:
    raise KeyError(f"scheme {scheme!r} has no entry in scheme_overrides (known: "
                   f"{sorted(study.scheme_overrides)})")
  _override(config, study.scheme_overrides[scheme], f"scheme_overrides.{scheme}")
  config.seed = seed
  config.lock()
  return config


def _override(config: ml_collections.ConfigDict, overrides: Mapping[str, Any],
              where: str) -> None:
  for name, value in overrides.items():
    if name not in config:
      raise KeyError(f"{where}: the run config has no field {name!r}")
    if isinstance(value, (Mapping, ml_collections.ConfigDict)):
      _override(config[name], value, f"{where}.{name}")
    else:
      config[name] = tuple(value) if isinstance(value, list) else value


def run_dir(workdir: str, task: str, scheme: str, seed: int) -> str:
  """The workdir of one run."""
  return os.path.join(workdir, task, scheme, f"seed_{seed}")


def run_study(study: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Runs every (task, scheme, seed) not finished yet, one at a time, then summarizes.

  Args:
    study: see ``configs/length_generalization.py``.
    workdir: the study's directory (created).

  Returns:
    The summary written to ``results.json`` (see :func:`summarize`).
  """
  os.makedirs(workdir, exist_ok=True)
  for task in study.tasks:
    for scheme in study.schemes:
      for seed in study.seeds:
        path = run_dir(workdir, task, scheme, seed)
        if os.path.exists(os.path.join(path, "results.json")):
          continue
        print(f"=== {task} / {scheme} / seed {seed}", flush=True)
        start = time.time()
        train.train_and_evaluate(run_config(study, task, scheme, seed), path)
        print(f"=== {task} / {scheme} / seed {seed}: {time.time() - start:.0f} s", flush=True)
  return summarize(study, workdir)


def _median_range(values: list[float]) -> dict[str, float]:
  return {"median": float(np.median(values)), "min": float(np.min(values)),
          "max": float(np.max(values))}


def summarize(study: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Reads the finished runs and writes ``results.json``, ``results.md`` and the curves.

  Returns:
    ``{"columns": [...], "runs": {task: {scheme: row}}}`` where a row holds ``seeds``, per
    column ``{"values", "median", "min", "max"}``, ``wall_seconds`` (median, min, max) and
    ``curve`` (``lengths`` and the median, min and max exact match at each); a (task,
    scheme) with no finished run is left out.
  """
  columns = ["1x"] + [f"{m:g}x" for m in study.run.eval.length_multipliers]
  runs: dict[str, dict[str, Any]] = {}
  for task in study.tasks:
    for scheme in study.schemes:
      results = {}
      for seed in study.seeds:
        path = os.path.join(run_dir(workdir, task, scheme, seed), "results.json")
        if os.path.exists(path):
          with open(path) as f:
            results[seed] = json.load(f)
      if not results:
        continue
      row: dict[str, Any] = {"seeds": sorted(results)}
      for column in columns:
        bucket = "train" if column == "1x" else column
        values = [results[s]["buckets"][bucket]["exact_match"] for s in row["seeds"]]
        row[column] = {"values": values, **_median_range(values)}
        symbols = [results[s]["buckets"][bucket].get("symbol_accuracy") for s in row["seeds"]]
        if None not in symbols:  # (runs from before the metric existed lack it)
          row[column]["symbol_accuracy"] = {"values": symbols, **_median_range(symbols)}
      row["wall_seconds"] = _median_range([results[s]["wall_seconds"] for s in row["seeds"]])
      curves = [results[s]["length_curve"] for s in row["seeds"] if "length_curve" in results[s]]
      if curves:
        exact = np.array([c["exact_match"] for c in curves])
        row["curve"] = {"lengths": curves[0]["lengths"],
                        "median": np.median(exact, axis=0).tolist(),
                        "min": exact.min(axis=0).tolist(), "max": exact.max(axis=0).tolist()}
      runs.setdefault(task, {})[scheme] = row
  summary = {"columns": columns, "runs": runs}
  with open(os.path.join(workdir, "results.json"), "w") as f:
    json.dump(summary, f, indent=2)
  with open(os.path.join(workdir, "results.md"), "w") as f:
    f.write("Greedy exact match:\n\n" + markdown_table(summary) + "\n\n"
            "Greedy symbol accuracy (associative recall: per-query accuracy):\n\n"
            + markdown_table(summary, "symbol_accuracy") + "\n")
  for task, rows in runs.items():
    plot_curves(task, rows, study.run.task.max_length,
                os.path.join(workdir, f"curve_{task}.png"))
  return summary


def markdown_table(summary: dict[str, Any], metric: str = "exact_match") -> str:
  """One row per task x scheme: median [min, max] over seeds per column of greedy
  ``"exact_match"`` or ``"symbol_accuracy"`` (``-`` where a run lacks it), the number of
  seeds and the median wall time of a run."""
  columns = summary["columns"]
  lines = ["| task | scheme | " + " | ".join(columns) + " | seeds | s/run |",
           "|" + "---|" * (len(columns) + 4)]
  for task, rows in summary["runs"].items():
    for scheme, row in rows.items():
      stats = [row[c] if metric == "exact_match" else row[c].get(metric) for c in columns]
      cells = ["-" if x is None else f"{x['median']:.3f} [{x['min']:.3f}, {x['max']:.3f}]"
               for x in stats]
      lines.append(f"| {task} | {scheme} | " + " | ".join(cells)
                   + f" | {len(row['seeds'])} | {row['wall_seconds']['median']:.0f} |")
  return "\n".join(lines)


def plot_curves(task: str, rows: dict[str, Any], max_length: int, out_path: str) -> None:
  """Exact match against length for one task: the median over seeds per scheme, the range
  over seeds shaded, the longest training length marked."""
  fig, ax = plt.subplots(figsize=(8.5, 3.8))
  for i, (scheme, row) in enumerate(rows.items()):
    if "curve" not in row:
      continue
    c = row["curve"]
    # tab20: distinct colours for up to 20 schemes; the coupling oracles dashed.
    line, = ax.plot(c["lengths"], c["median"], label=scheme, linewidth=1.3,
                    color=plt.get_cmap("tab20")(i % 20),
                    linestyle="--" if scheme.startswith("coupled") else "-")
    ax.fill_between(c["lengths"], c["min"], c["max"], color=line.get_color(), alpha=0.2,
                    linewidth=0)
  ax.axvline(max_length, color="gray", linestyle="--", linewidth=0.8)
  ax.text(max_length, 1.02, " longest training length", fontsize=7, color="gray",
          va="bottom")
  ax.set(xlabel="input length n", ylabel="greedy exact match", ylim=(-0.02, 1.08),
         title=f"{task}: median over seeds, range shaded")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
  fig.tight_layout()
  fig.savefig(out_path, dpi=110)
  plt.close(fig)
