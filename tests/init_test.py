"""Tests for `attnjax/__init__.py`: the Flax modules load on first use, the core never needs
Flax. Each case runs in a fresh interpreter, since this test session has imported Flax."""

import pathlib
import subprocess
import sys
import textwrap

import pytest

import attnjax

ROOT = pathlib.Path(__file__).resolve().parents[1]


def run_fresh(code):
  """Runs `code` in a new interpreter from the repository root; returns its stdout."""
  result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr
  return result.stdout


def test_flax_modules_load_lazily_on_attribute_access():
  out = run_fresh("""
      import sys
      import attnjax
      from attnjax import *  # noqa: F403
      print("flax" in sys.modules, "attnjax.linen" in sys.modules)
      print("linen" in dir(attnjax), "nnx" in dir(attnjax))
      print(attnjax.linen.MultiHeadAttention.__module__, "flax" in sys.modules)
      print(attnjax.nnx.MultiHeadAttention.__module__)
      import attnjax.linen
      print(attnjax.linen is sys.modules["attnjax.linen"])
  """)
  assert out.split("\n") == ["False False", "True True", "attnjax.linen True", "attnjax.nnx",
                             "True", ""]


def test_unknown_attribute_is_an_attribute_error():
  with pytest.raises(AttributeError, match="no_such_name"):
    attnjax.no_such_name  # noqa: B018
  assert not hasattr(attnjax, "flax")
  assert set(attnjax.__all__) <= set(dir(attnjax))
