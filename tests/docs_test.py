"""The Sphinx reference builds with warnings as errors and documents every public name.

The expected names come from the package at test time: everything in ``attnjax.__all__``,
and every public function and class of every attnjax module, so that a new name or module
without a docstring or a page fails here.
"""

import importlib
import inspect
import os
import pathlib
import pkgutil
import re
import subprocess
import sys

import pytest

import attnjax

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, str]:
  """{html path relative to the build: its text} of a fresh ``sphinx-build -W`` run."""
  out = tmp_path_factory.mktemp("html")
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
  run = subprocess.run(
      [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html", str(DOCS),
       str(out)], cwd=ROOT, env=env, capture_output=True, text=True)
  assert run.returncode == 0, f"sphinx-build failed:\n{run.stdout}\n{run.stderr}"
  return {str(p.relative_to(out)): p.read_text() for p in out.rglob("*.html")}


def anchors(built: dict[str, str]) -> set[str]:
  return {a for text in built.values() for a in re.findall(r'id="([^"]+)"', text)}


def public_modules() -> list[str]:
  names = ["attnjax"]
  for info in pkgutil.walk_packages(attnjax.__path__, "attnjax."):
    if not any(part.startswith("_") for part in info.name.split(".")):
      names.append(info.name)
  return names


def defined_here(module) -> list[str]:
  """Public functions and classes defined in ``module`` (not imported into it)."""
  return [name for name, obj in vars(module).items()
          if not name.startswith("_") and (inspect.isfunction(obj) or inspect.isclass(obj))
          and obj.__module__ == module.__name__]


def test_every_name_in_all_is_documented(built):
  ids = anchors(built)
  assert attnjax.__all__
  for name in attnjax.__all__:
    obj = getattr(attnjax, name)
    want = f"module-{obj.__name__}" if inspect.ismodule(obj) else f"attnjax.{name}"
    assert want in ids, f"attnjax.{name} is not in the reference (no anchor {want!r})"


@pytest.mark.parametrize("module_name", ["attnjax.linen", "attnjax.nnx"])
def test_flax_module_classes_are_documented(built, module_name):
  module = importlib.import_module(module_name)
  classes = [n for n in defined_here(module) if inspect.isclass(getattr(module, n))]
  assert "MultiHeadAttention" in classes
  ids = anchors(built)
  for name in classes:
    assert f"{module_name}.{name}" in ids, f"{module_name}.{name} is not in the reference"
    assert f"{module_name}.{name}.__call__" in ids


def test_every_public_function_and_class_is_documented(built):
  ids = anchors(built)
  missing = []
  for module_name in public_modules():
    module = importlib.import_module(module_name)
    for name in defined_here(module):
      if f"{module_name}.{name}" not in ids and not (
          name in attnjax.__all__ and f"attnjax.{name}" in ids):
        missing.append(f"{module_name}.{name}")
  assert not missing, (
      f"not in the reference: {missing}. Give them a docstring, and give a new module a page "
      "(docs/api/<module>.rst with `.. automodule:: attnjax.<module>`, listed in docs/api.rst)")


def test_tutorial_page_links_into_the_reference(built):
  page = built["_generated/attention_explained.html"]
  assert "Attention, explained with attnjax" in page
  xrefs = re.findall(r'<code class="xref py py-obj[^"]*">', page)
  linked = re.findall(r'<a class="reference internal" href="[^"]*api/[^"]*"[^>]*>'
                      r'<code class="xref py py-obj', page)
  assert len(xrefs) >= 8
  assert len(linked) == len(xrefs), "some attnjax names in the tutorial do not resolve"
  assert 'href="_generated/attention_explained.html"' in built["index.html"]
