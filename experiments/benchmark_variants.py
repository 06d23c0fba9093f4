r"""Benchmarks attention variants (score modifiers, packed documents, sinks), side by side.

  python -m experiments.benchmark_variants            # about 5 minutes on 2 CPU cores
  python -m experiments.benchmark_variants --quick    # no 32k-token memory cases

Each group of cases takes turns within every repeat (median of --repeats), so a busy machine
slows them alike; ratios are within a group:

* ALiBi at the headline shape (B8 T512 N8 H64, causal): attnjax blockwise with
  ``score_mod=score_mods.ALiBi`` against plain causal blockwise, against
  ``jax.nn.dot_product_attention`` with the dense ALiBi bias, and against the dense path.
* Packed documents: 8 documents in 4,096 tokens (B1 N8 H64, traced segment ids under ``jit``,
  causal within each) against plain causal attention over the same 4,096 tokens.
* Sinks at the headline shape against no sinks.
* Memory (one fresh process each): 32,768 tokens (B1 N1 H64, causal) forward+backward with
  ALiBi and with 16 packed documents; peak resident memory and XLA's temporary buffer.

PyTorch FlexAttention is timed on the ALiBi and documents cases when ``torch`` is installed
(``torch.nn.attention.flex_attention`` compiled with ``torch.compile``); a case it cannot run
is reported with the reason (not installed; on CPU it has no backward pass). Writes --out
(JSON) with the machine's description.
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
from attnjax import masks, score_mods
from experiments.benchmarking import machine, peak_rss_mb

_QUICK = flags.DEFINE_bool("quick", False, "Skip the 32k-token memory cases.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed repeats per case (median reported).")
_OUT = flags.DEFINE_string("out", "runs/benchmark_variants.json", "Where to write results.")
_CHILD = flags.DEFINE_string("child", None, "Internal: measure one memory case and exit.")


def inputs(B, T, N, H, seed=0):
  rng = np.random.default_rng(seed)
  return [jnp.asarray(rng.standard_normal((B, T, N, H)), jnp.float32) for _ in range(3)]


def documents(T: int, n: int, seed: int = 0) -> jax.Array:
  """Segment ids [1, T] of n documents of random lengths (at least T / (4 n) each)."""
  rng = np.random.default_rng(seed)
  cuts = np.sort(rng.choice(np.arange(1, 4 * n), n - 1, replace=False)) * T // (4 * n)
  return jnp.asarray(np.searchsorted(cuts, np.arange(T), side="right")[None], jnp.int32)


def attnjax_fn(impl="blockwise", **options):
  def fn(q, k, v, *data):
    kw = dict(options)
    if data:  # traced segment ids
      kw["mask"] = masks.Segments(data[0], data[0]) & masks.Causal()
    return attnjax.dot_product_attention(q, k, v, implementation=impl, **kw)
  return fn


def compiled(fn, args, mode: str):
  """fn's forward, or forward+backward with respect to q, k, v, compiled for args."""
  if mode == "fwd":
    jitted = jax.jit(fn)
  else:
    jitted = jax.jit(jax.grad(lambda q, k, v, *d: jnp.sum(fn(q, k, v, *d)), (0, 1, 2)))
  program = jitted.lower(*args).compile()
  return (lambda: jax.block_until_ready(program(*args))), program


def torch_flex(B, T, N, H, mode: str, score_mod=None, segments=None):
  """A FlexAttention run for causal attention, or the reason there is none."""
  try:
    import torch  # noqa: PLC0415
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention  # noqa: PLC0415
  except ImportError:
    return "not installed"
  if mode == "fwd+bwd" and not torch.cuda.is_available():
    return "no CPU backward"  # (FlexAttention refuses inputs that require grad on CPU)
  q, k, v = (torch.randn(B, N, T, H, requires_grad=mode != "fwd") for _ in range(3))
  if segments is not None:
    ids = torch.tensor(np.asarray(segments)[0])
    def rule(b, h, i, j):
      return (j <= i) & (ids[i] == ids[j])
  else:
    def rule(b, h, i, j):
      return j <= i
  block_mask = create_block_mask(rule, None, None, T, T, device="cpu")
  flex = torch.compile(flex_attention)

  def run():
    out = flex(q, k, v, score_mod=score_mod, block_mask=block_mask)
    if mode == "fwd+bwd":
      out.sum().backward()
  return run


def time_group(cases: dict, mode: str, repeats: int) -> dict:
  """Median seconds of each case's call, cases taking turns; an unavailable case (its value
  the reason, a string) keeps its reason."""
  runs = {name: c for name, c in cases.items() if callable(c)}
  times = {name: [] for name in runs}
  for _ in range(repeats + 1):  # the first turn warms up
    for name, run in runs.items():
      run()
      start = time.perf_counter()
      run()
      times[name].append(time.perf_counter() - start)
  return {name: statistics.median(times[name][1:]) if name in times else cases[name]
          for name in cases}


def alibi_group(mode: str, repeats: int) -> dict:
  B, T, N, H = 8, 512, 8, 64
  args = inputs(B, T, N, H)
  alibi = score_mods.ALiBi(score_mods.alibi_slopes(N))
  bias = score_mods.materialize(alibi, 1, N, T, T)
  causal = jnp.tril(jnp.ones((T, T), bool))
  cases = {
      "attnjax causal": compiled(attnjax_fn(is_causal=True), args, mode)[0],
      "attnjax causal + ALiBi score_mod": compiled(
          attnjax_fn(is_causal=True, score_mod=alibi), args, mode)[0],
      "attnjax xla + ALiBi score_mod": compiled(
          attnjax_fn("xla", is_causal=True, score_mod=alibi), args, mode)[0],
      "jax.nn + dense ALiBi bias": compiled(
          lambda q, k, v: jax.nn.dot_product_attention(q, k, v, bias=bias, mask=causal),
          args, mode)[0],
  }
  cases["torch FlexAttention + ALiBi"] = torch_flex(B, T, N, H, mode, score_mod=_torch_alibi(N))
  return time_group(cases, mode, repeats)


def _torch_alibi(N):
  try:
    import torch  # noqa: PLC0415
  except ImportError:
    return None
  slopes = torch.tensor(np.asarray(score_mods.alibi_slopes(N)))
  return lambda score, b, h, i, j: score + slopes[h] * (j - i)


def documents_group(mode: str, repeats: int) -> dict:
  B, T, N, H = 1, 4096, 8, 64
  args = inputs(B, T, N, H)
  ids = documents(T, 8)
  cases = {
      "attnjax causal": compiled(attnjax_fn(is_causal=True), args, mode)[0],
      "attnjax 8 documents (traced ids)": compiled(attnjax_fn(), args + [ids], mode)[0],
  }
  cases["torch FlexAttention 8 documents"] = torch_flex(B, T, N, H, mode, segments=ids)
  return time_group(cases, mode, repeats)


def sinks_group(mode: str, repeats: int) -> dict:
  B, T, N, H = 8, 512, 8, 64
  args = inputs(B, T, N, H)
  sinks = jnp.zeros((N,))
  return time_group({
      "attnjax causal": compiled(attnjax_fn(is_causal=True), args, mode)[0],
      "attnjax causal + sinks": compiled(attnjax_fn(is_causal=True, sinks=sinks), args,
                                         mode)[0],
  }, mode, repeats)


MEMORY_CASES = {"32k ALiBi": 0, "32k 16 documents": 16}


def measure_child(name: str) -> dict:
  T, N, H = 32768, 1, 64
  args = inputs(1, T, N, H)
  if MEMORY_CASES[name]:
    fn, args = attnjax_fn(), args + [documents(T, MEMORY_CASES[name])]
  else:
    fn = attnjax_fn(is_causal=True, score_mod=score_mods.ALiBi(score_mods.alibi_slopes(N)))
  run, program = compiled(fn, args, "fwd+bwd")
  start = time.perf_counter()
  run()
  seconds = time.perf_counter() - start
  temp = program.memory_analysis().temp_size_in_bytes / 2**20
  return dict(peak_rss_mb=peak_rss_mb(), xla_temp_mb=temp, first_call_s=seconds)


def measure_memory(name: str) -> dict:
  proc = subprocess.run([sys.executable, "-m", "experiments.benchmark_variants",
                         f"--child={name}"], capture_output=True, text=True, check=False)
  if proc.returncode:
    return dict(error=proc.stderr.strip().splitlines()[-1] if proc.stderr else "failed")
  return json.loads(proc.stdout.strip().splitlines()[-1])


def report(title: str, group, repeats: int, reference: str) -> dict:
  print(f"\n{title}")
  print(f"  {'case':36s} {'fwd ms':>9s} {'ratio':>6s} {'fwd+bwd ms':>11s} {'ratio':>6s}")
  by_mode = {mode: group(mode, repeats) for mode in ("fwd", "fwd+bwd")}
  rows = {}
  for name in by_mode["fwd"]:
    cells, row = [], {}
    for mode, times in by_mode.items():
      seconds = times[name]
      if isinstance(seconds, str):
        row[mode] = dict(unavailable=seconds)
        cells.append(f"{seconds:>17s}")
        continue
      ratio = seconds / times[reference]
      row[mode] = dict(ms=seconds * 1e3, ratio_to_reference=ratio)
      cells.append(f"{seconds * 1e3:9.1f} {ratio:6.2f}")
    print(f"  {name:36s} " + "  ".join(cells))
    rows[name] = row
  print(f"  (ratio: time over {reference!r})")
  return rows


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)
  if _CHILD.value:
    print(json.dumps(measure_child(_CHILD.value)))
    return
  results = dict(machine=machine())
  print(json.dumps(results["machine"]))
  repeats = _REPEATS.value
  results["alibi"] = report("ALiBi, B8 T512 N8 H64 causal, fp32", alibi_group, repeats,
                            "attnjax causal")
  results["documents"] = report("8 packed documents in 4,096 tokens, B1 N8 H64, fp32",
                                documents_group, repeats, "attnjax causal")
  results["sinks"] = report("Sinks, B8 T512 N8 H64 causal, fp32", sinks_group, repeats,
                            "attnjax causal")
  if not _QUICK.value:
    print("\nMemory, 32,768 tokens, B1 N1 H64, forward+backward (one fresh process each)")
    results["memory"] = {name: measure_memory(name) for name in MEMORY_CASES}
    for name, memory in results["memory"].items():
      print(f"  {name:20s} {memory}")
  os.makedirs(os.path.dirname(_OUT.value) or ".", exist_ok=True)
  with open(_OUT.value, "w") as f:
    json.dump(results, f, indent=1)
  print(f"\nWrote {_OUT.value}")


if __name__ == "__main__":
  app.run(main)
