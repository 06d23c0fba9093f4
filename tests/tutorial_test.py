"""The tutorial runs end to end as a script, writes its figures, and renders as a notebook."""

import os
import pathlib
import re
import subprocess
import sys

import jupytext
import nbformat

ROOT = pathlib.Path(__file__).resolve().parents[1]
TUTORIAL = ROOT / "docs" / "tutorials" / "attention_explained.py"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_tutorial_runs_and_writes_its_figures(tmp_path):
  env = dict(os.environ, MPLBACKEND="Agg", ATTNJAX_TUTORIAL_FIGURES=str(tmp_path),
             PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
  # The tutorial compiles a dozen XLA programs and runs each only a few times; unoptimized
  # code generation halves its compile time and changes nothing it checks.
  env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_backend_optimization_level=0".strip()
  run = subprocess.run([sys.executable, str(TUTORIAL)], cwd=tmp_path, env=env,
                       capture_output=True, text=True)
  assert run.returncode == 0, f"stdout:\n{run.stdout[-3000:]}\nstderr:\n{run.stderr[-6000:]}"

  announced = {pathlib.Path(p) for p in re.findall(r"^figure: (.+)$", run.stdout, flags=re.M)}
  saved = set(re.findall(r'save\(fig, "([^"]+)"\)', TUTORIAL.read_text()))
  assert len(saved) >= 5
  assert {p.name for p in announced} >= saved
  assert announced == set(tmp_path.glob("*.png"))
  for path in announced:
    assert path.read_bytes().startswith(PNG_MAGIC), path
  assert "greedy exact match:" in run.stdout


def test_tutorial_renders_as_a_notebook():
  notebook = jupytext.read(TUTORIAL)
  ipynb = nbformat.reads(jupytext.writes(notebook, fmt="ipynb"), as_version=4)
  nbformat.validate(ipynb)
  kinds = [cell.cell_type for cell in ipynb.cells]
  assert kinds[0] == "markdown" and ipynb.cells[0].source.startswith("# ")
  assert kinds.count("code") >= 10 and kinds.count("markdown") >= 10
  # The script is the notebook: its code cells are the file's code, in order.
  code = "\n".join(cell.source for cell in ipynb.cells if cell.cell_type == "code")
  script = re.sub(r"(?ms)^# %% \[markdown\]\n(#.*?\n)*|^# %%\n|\A# ---.*?# ---\n", "",
                  TUTORIAL.read_text())
  assert code.split() == script.split()
