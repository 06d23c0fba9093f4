r"""Cost of forward-mode autodiff through attention, against the forward and backward passes.

  python -m experiments.benchmark_forward_ad            # a few minutes on 2 CPU cores
  python -m experiments.benchmark_forward_ad --quick    # the headline shape only

For each shape and implementation, times (median wall and process CPU time, side by side in
one run) and the XLA temporary memory of: the forward pass, ``jax.jvp`` along q, k and v,
forward+backward (``jax.grad``), and a forward-over-reverse Hessian-vector product
(``jax.jvp`` of ``jax.grad``), and prints each as a multiple of the forward pass. Writes --out
(JSON).
"""

import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging

import attnjax
from experiments.benchmarking import machine, write_results

_QUICK = flags.DEFINE_bool("quick", False, "Only the headline shape.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed repeats per case (median reported).")
_OUT = flags.DEFINE_string("out", "runs/benchmark_forward_ad.json", "Where to write results.")

# (batch, heads, length, head dim), causal, float32; the first is benchmark_attention's headline.
SHAPES = [(8, 8, 512, 64), (1, 8, 2048, 64)]
IMPLS = ["blockwise", "xla"]
MODES = ["fwd", "jvp", "fwd+bwd", "hvp"]


def describe(shape) -> str:
  B, N, T, H = shape
  return f"B{B} T{T} N{N} H{H} causal float32"


def program(impl: str, shape, mode: str):
  """(compiled, args) for one pass of ``mode`` over random inputs of ``shape``."""
  B, N, T, H = shape
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.standard_normal((B, T, N, H)), jnp.float32) for _ in range(3))

  def fn(q, k, v):
    return attnjax.dot_product_attention(q, k, v, is_causal=True, implementation=impl)

  def loss(q, k, v):
    return jnp.sum(fn(q, k, v).astype(jnp.float32))

  programs = {
      "fwd": (fn, (q, k, v)),
      "jvp": (lambda p, t: jax.jvp(fn, p, t), ((q, k, v), (v, q, k))),
      "fwd+bwd": (jax.value_and_grad(loss, (0, 1, 2)), (q, k, v)),
      "hvp": (lambda p, t: jax.jvp(jax.grad(loss, (0, 1, 2)), p, t), ((q, k, v), (v, q, k))),
  }
  f, args = programs[mode]
  return jax.jit(f).lower(*args).compile(), args


def measure(shape, repeats: int) -> list[dict]:
  """Median wall and CPU seconds per call of every (implementation, mode), taking turns; each
  turn calls a program twice and times the second call (as benchmark_attention does)."""
  cases = {(impl, mode): program(impl, shape, mode) for impl in IMPLS for mode in MODES}
  times = {case: [] for case in cases}
  for _ in range(repeats + 1):
    for case, (compiled, args) in cases.items():
      jax.block_until_ready(compiled(*args))
      wall, cpu = time.perf_counter(), time.process_time()
      jax.block_until_ready(compiled(*args))
      times[case].append((time.perf_counter() - wall, time.process_time() - cpu))
  rows = []
  for (impl, mode), (compiled, _) in cases.items():
    measured = times[(impl, mode)][1:]
    memory = compiled.memory_analysis()
    rows.append(dict(shape=describe(shape), impl=impl, mode=mode,
                     ms=statistics.median(t[0] for t in measured) * 1e3,
                     cpu_ms=statistics.median(t[1] for t in measured) * 1e3,
                     xla_temp_mb=None if memory is None else memory.temp_size_in_bytes / 2**20))
  return rows


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)
  results = dict(machine=machine(), rows=[])
  print(json.dumps(results["machine"]))
  for shape in SHAPES[:1] if _QUICK.value else SHAPES:
    rows = measure(shape, _REPEATS.value)
    results["rows"] += rows
    print(f"\n{describe(shape)}")
    print(f"  {'implementation':14s} {'mode':8s} {'ms':>8s} {'CPU ms':>8s} {'x fwd':>6s}"
          f" {'XLA temp MB':>11s}")
    for row in rows:
      forward = next(r for r in rows if r["impl"] == row["impl"] and r["mode"] == "fwd")
      print(f"  {row['impl']:14s} {row['mode']:8s} {row['ms']:8.1f} {row['cpu_ms']:8.1f}"
            f" {row['cpu_ms'] / forward['cpu_ms']:6.2f} {row['xla_temp_mb'] or 0:11.1f}")
  write_results(_OUT.value, results)


if __name__ == "__main__":
  app.run(main)
