"""Shared pytest configuration and fixtures for the attnjax tests."""

import os
import re
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import hypothesis
import jax
import numpy as np
import pytest

# Strict broadcasting, as in jax's own tests: attnjax must not rely on implicit rank promotion,
# which strict user test suites turn into errors.
jax.config.update("jax_numpy_rank_promotion", "raise")

# Property tests compile a jitted function per new shape: no deadline, few examples, and a
# fixed seed so that the suite is reproducible on CI.
hypothesis.settings.register_profile("attnjax", deadline=None, max_examples=15, derandomize=True)
hypothesis.settings.load_profile("attnjax")


@pytest.fixture(scope="session")
def eager_and_jit() -> Callable[..., list[Any]]:
  """Returns `run(fn, arrays, **options)`: the eager and jitted `fn(**arrays, **options)`.

  `arrays` is a dict of keyword arguments (a pytree, traced under jit); `options` stay static.
  """

  def run(fn, arrays, **options):
    def call(arrays):
      return fn(**arrays, **options)

    return [call(arrays), jax.jit(call)(arrays)]

  return run


@pytest.fixture(scope="session")
def assert_no_quadratic_buffers() -> Callable[..., None]:
  """Returns `check(compiled, T, S)`: asserts that a compiled attention program over T
  queries and S keys holds no array of T * S / 8 elements or more, and at most T * S float32
  of temporaries (dense attention keeps several float32 [N, T, S] arrays)."""

  def check(compiled, T, S):
    sizes = [int(np.prod([int(d) for d in dims.split(",")]))
             for dims in re.findall(r"\[([0-9,]+)\]", compiled.as_text())]
    assert max(sizes) < T * S // 8, max(sizes)
    memory = compiled.memory_analysis()
    if memory is not None:
      assert memory.temp_size_in_bytes < 4 * T * S, memory.temp_size_in_bytes

  return check


@pytest.fixture(scope="session")
def run_on_eight_devices() -> Callable[[str], None]:
  """Returns `run(test_file)`: runs that file's tests in a fresh pytest process on 8 forced
  CPU devices (with ``ATTNJAX_EIGHT_DEVICES=1`` set, for the tests that only run there) and
  asserts that they all pass."""

  def run(test_file):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               JAX_PLATFORMS="cpu", ATTNJAX_EIGHT_DEVICES="1")
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-x", "-rA", "-n", "0", "-p", "no:cacheprovider",
         test_file], env=env, capture_output=True, text=True, timeout=600,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert "passed" in result.stdout.splitlines()[-1], result.stdout[-3000:]

  return run
