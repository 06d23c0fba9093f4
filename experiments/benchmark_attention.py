r"""Benchmarks attnjax attention against jax.nn, Flax and PyTorch, side by side in one run.

  python -m experiments.benchmark_attention                 # a few minutes on 2 CPU cores
  python -m experiments.benchmark_attention --quick         # the headline shape only
  python -m experiments.benchmark_attention --long          # + 32k/128k-token memory cases

Prints a table (median forward and forward+backward time, GFLOP/s with causal counted as
half, ratio to jax.nn.dot_product_attention) and writes --out (JSON) and --plot (PNG: time
and peak memory against sequence length). Peak memory is the peak resident set size of a
fresh Python process that runs one case, plus XLA's temp-buffer size for the compiled program.
"""

import json
import os
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging

import attnjax
from experiments.benchmarking import machine, peak_rss_mb

_QUICK = flags.DEFINE_bool("quick", False, "Only the headline shape.")
_LONG = flags.DEFINE_bool("long", False, "Add the long-sequence memory cases (slow).")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed repeats per case (median reported).")
_OUT = flags.DEFINE_string("out", "runs/benchmark_attention.json", "Where to write the results.")
_PLOT = flags.DEFINE_string("plot", "runs/benchmark_attention.png", "Where to write the figure.")
_CHILD = flags.DEFINE_string("child", None, "Internal: measure one case (JSON) and exit.")

# (batch, query heads, kv heads, length, head dim, causal, dtype)
HEADLINE = (8, 8, 8, 512, 64, True, "float32")
SHAPES = [
    HEADLINE,
    (8, 8, 8, 512, 64, False, "float32"),
    (8, 8, 8, 512, 64, True, "bfloat16"),
    (4, 8, 2, 1024, 64, True, "float32"),
    (2, 8, 8, 2048, 64, True, "float32"),
]
SWEEP = [(1, 8, 8, t, 64, True, "float32") for t in (256, 512, 1024, 2048, 4096)]
LONG = [(1, 1, 1, 32768, 64, True, "float32", "fwd+bwd"),
        (1, 1, 1, 131072, 64, True, "float32", "fwd")]
IMPLS = ["attnjax:xla", "attnjax:blockwise", "attnjax:auto", "jax.nn", "flax", "torch"]


def attention_fn(impl: str, shape):
  """A function (q, k, v) -> out in the library's own layout, or None if unavailable."""
  _, N, K, T, _, causal, _ = shape
  if impl.startswith("attnjax:"):
    name = impl.split(":")[1]
    return lambda q, k, v: attnjax.dot_product_attention(
        q, k, v, is_causal=causal, implementation=None if name == "auto" else name)
  if impl == "jax.nn":
    return lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=causal)
  if impl == "flax":
    import flax.linen as nn  # noqa: PLC0415
    mask = jnp.tril(jnp.ones((T, T), bool)) if causal else None
    def flax_attention(q, k, v):  # Flax wants as many kv heads as query heads.
      k, v = (jnp.repeat(x, N // K, axis=2) for x in (k, v))
      return nn.dot_product_attention(q, k, v, mask=mask)
    return flax_attention
  try:
    import torch  # noqa: PLC0415
  except ImportError:
    return None
  sdpa = torch.nn.functional.scaled_dot_product_attention
  return lambda q, k, v: sdpa(q, k, v, is_causal=causal, enable_gqa=N != K)


def make_inputs(impl: str, shape):
  B, N, K, T, H, _, dtype = shape
  rng = np.random.default_rng(0)
  arrays = [rng.standard_normal((B, T, n, H), np.float32) for n in (N, K, K)]
  if impl != "torch":
    return [jnp.asarray(a, dtype) for a in arrays]
  import torch  # noqa: PLC0415
  return [torch.tensor(a).transpose(1, 2).contiguous().to(getattr(torch, dtype))
          .requires_grad_() for a in arrays]


def runner(impl: str, shape, mode: str):
  """(run, args, compiled or None): run(*args) does one forward or forward+backward pass."""
  fn = attention_fn(impl, shape)
  if fn is None:
    return None
  args = make_inputs(impl, shape)
  if impl == "torch":
    def run(q, k, v):
      out = fn(q, k, v)
      if mode == "fwd+bwd":
        out.float().sum().backward()
      return out
    return run, args, None
  if mode == "fwd":
    jitted = jax.jit(fn)
  else:
    jitted = jax.jit(jax.grad(lambda *a: jnp.sum(fn(*a).astype(jnp.float32)), (0, 1, 2)))
  compiled = jitted.lower(*args).compile()
  return (lambda *a: jax.block_until_ready(compiled(*a))), args, compiled


def time_cases(impls, shape, mode: str, repeats: int) -> dict:
  """Median seconds per call of each implementation (None if unavailable), after a warm-up.

  The JAX implementations take turns within each repeat, so a busy machine slows them alike.
  Each turn calls the implementation twice and times the second call: the first call after
  another program pays for page-faulting memory that the other program left in a different
  shape (about 3 us per 4 KB page on the VMs this was run on), which repeated calls of one
  program, as in a training loop, do not. A program whose temporary buffer is above glibc's
  mmap threshold (32 MB) pays for fresh pages on every call; its timings include that.
  PyTorch runs on its own afterwards: its OpenMP threads spin for a while after each call and
  would slow whatever runs next.
  """
  runners = {impl: runner(impl, shape, mode) for impl in impls}
  available = [impl for impl, r in runners.items() if r is not None]
  times = {impl: [] for impl in available}

  def timed(impl):
    run, args, _ = runners[impl]
    run(*args)
    start = time.perf_counter()
    run(*args)
    times[impl].append(time.perf_counter() - start)

  turns = [impl for impl in available if impl != "torch"]
  for impl in turns:
    timed(impl)
  for _ in range(repeats):
    for impl in turns:
      timed(impl)
  if "torch" in available:
    for _ in range(repeats + 1):
      timed("torch")
    time.sleep(1.0)  # let its threads go idle
  return {impl: statistics.median(times[impl][-repeats:]) if impl in times else None
          for impl in impls}


def measure_child(spec: dict) -> dict:
  """Runs one case once in this (fresh) process and reports its memory."""
  shape, impl, mode = tuple(spec["shape"]), spec["impl"], spec["mode"]
  run, args, compiled = runner(impl, shape, mode)
  start = time.perf_counter()
  run(*args)
  seconds = time.perf_counter() - start
  temp = None
  if compiled is not None and compiled.memory_analysis() is not None:
    temp = compiled.memory_analysis().temp_size_in_bytes
  return dict(peak_rss_mb=peak_rss_mb(), xla_temp_mb=None if temp is None else temp / 2**20,
              first_call_s=seconds)


def measure_memory(impl: str, shape, mode: str) -> dict:
  spec = json.dumps(dict(impl=impl, shape=list(shape), mode=mode))
  proc = subprocess.run([sys.executable, "-m", "experiments.benchmark_attention",
                         f"--child={spec}"], capture_output=True, text=True, check=False)
  if proc.returncode:
    return dict(error=proc.stderr.strip().splitlines()[-1] if proc.stderr else "failed")
  return json.loads(proc.stdout.strip().splitlines()[-1])


def flops(shape, mode: str) -> float:
  B, N, _, T, H, causal, _ = shape
  forward = 4 * B * N * T * T * H * (0.5 if causal else 1.0)
  return forward * (3.5 if mode == "fwd+bwd" else 1.0)  # backward ~ 2.5 forwards


def describe(shape) -> str:
  B, N, K, T, H, causal, dtype = shape
  heads = f"N{N}" if N == K else f"N{N}/K{K}"
  return f"B{B} T{T} {heads} H{H} {'causal' if causal else 'full'} {dtype}"


def benchmark_shapes(shapes, repeats: int) -> list[dict]:
  rows = []
  for shape in shapes:
    print(f"\n{describe(shape)}")
    print(f"  {'implementation':20s} {'fwd ms':>9s} {'GFLOP/s':>8s} {'x jax.nn':>8s}"
          f" {'fwd+bwd ms':>11s} {'GFLOP/s':>8s} {'x jax.nn':>8s}")
    by_mode = {m: time_cases(IMPLS, shape, m, repeats) for m in ("fwd", "fwd+bwd")}
    results = {impl: {m: by_mode[m][impl] for m in by_mode} for impl in IMPLS}
    for impl, times in results.items():
      row = dict(shape=describe(shape), impl=impl)
      cells = []
      for mode, seconds in times.items():
        reference = results["jax.nn"][mode]
        if seconds is None:
          cells.append(f"{'skipped (not installed)':>29s}")
          continue
        row[mode] = dict(ms=seconds * 1e3, gflops=flops(shape, mode) / seconds / 1e9,
                         speedup_vs_jax_nn=reference / seconds)
        cells.append(f"{seconds * 1e3:9.1f} {row[mode]['gflops']:8.1f}"
                     f" {reference / seconds:8.2f}")
      print(f"  {impl:20s} " + "   ".join(cells))
      rows.append(row)
  return rows


def sweep(repeats: int) -> list[dict]:
  """Time and peak memory against length, causal, 1 x 8 heads of 64."""
  print("\nLength sweep (causal, B1 N8 H64, fp32): forward+backward")
  rows = []
  for shape in SWEEP:
    impls = ("attnjax:xla", "attnjax:blockwise", "jax.nn", "torch")
    for impl, seconds in time_cases(impls, shape, "fwd+bwd", repeats).items():
      if seconds is None:
        continue
      memory = measure_memory(impl, shape, "fwd+bwd") if impl != "torch" else {}
      rows.append(dict(length=shape[3], impl=impl, ms=seconds * 1e3, **memory))
      print(f"  T={shape[3]:6d} {impl:20s} {seconds * 1e3:9.1f} ms  "
            f"peak RSS {memory.get('peak_rss_mb', float('nan')):7.0f} MB  "
            f"XLA temp {memory.get('xla_temp_mb') or float('nan'):8.1f} MB")
  return rows


def long_cases() -> list[dict]:
  print("\nLong sequences, attnjax blockwise (one fresh process each)")
  rows = []
  for *shape, mode in LONG:
    memory = measure_memory("attnjax:blockwise", tuple(shape), mode)
    rows.append(dict(length=shape[3], mode=mode, **memory))
    print(f"  T={shape[3]:6d} {mode:8s} {memory}")
  return rows


def plot(sweep_rows: list[dict], path: str) -> None:
  import matplotlib  # noqa: PLC0415
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415
  fig, (ax_time, ax_mem) = plt.subplots(1, 2, figsize=(11, 4))
  for impl in dict.fromkeys(r["impl"] for r in sweep_rows):
    rows = [r for r in sweep_rows if r["impl"] == impl]
    ax_time.plot([r["length"] for r in rows], [r["ms"] for r in rows], "o-", label=impl)
    rows = [r for r in rows if "peak_rss_mb" in r]
    if rows:
      ax_mem.plot([r["length"] for r in rows], [r["peak_rss_mb"] for r in rows], "o-",
                  label=impl)
  lengths = sorted({r["length"] for r in sweep_rows})
  for ax, label in ((ax_time, "forward+backward time (ms)"), (ax_mem, "peak RSS (MB)")):
    ax.set(xscale="log", yscale="log", xlabel="sequence length", ylabel=label)
    ax.set_xticks(lengths, [str(n) for n in lengths])
    ax.minorticks_off()
    ax.legend()
    ax.grid(alpha=0.3)
  fig.suptitle("Causal attention, batch 1, 8 heads of 64, fp32, CPU")
  fig.tight_layout()
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  fig.savefig(path, dpi=120)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)
  if _CHILD.value:
    print(json.dumps(measure_child(json.loads(_CHILD.value))))
    return
  results = dict(machine=machine())
  print(json.dumps(results["machine"]))
  results["shapes"] = benchmark_shapes([HEADLINE] if _QUICK.value else SHAPES, _REPEATS.value)
  results["headline_memory"] = {
      impl: measure_memory(impl, HEADLINE, "fwd+bwd")
      for impl in ("attnjax:xla", "attnjax:blockwise", "jax.nn")}
  print(f"\nPeak memory, headline shape, fwd+bwd: {results['headline_memory']}")
  if not _QUICK.value:
    results["sweep"] = sweep(max(1, _REPEATS.value // 2))
    plot(results["sweep"], _PLOT.value)
  if _LONG.value:
    results["long"] = long_cases()
  os.makedirs(os.path.dirname(_OUT.value) or ".", exist_ok=True)
  with open(_OUT.value, "w") as f:
    json.dump(results, f, indent=1)
  print(f"\nWrote {_OUT.value}" + ("" if _QUICK.value else f" and {_PLOT.value}"))


if __name__ == "__main__":
  app.run(main)
