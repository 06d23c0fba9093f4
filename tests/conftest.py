"""Shared pytest configuration and fixtures for the attnjax tests."""

from collections.abc import Callable
from typing import Any

import hypothesis
import jax
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
