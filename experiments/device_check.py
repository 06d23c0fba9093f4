r"""Checks attnjax on an accelerator in a few minutes: numerics, speed and a training run.

  python -m experiments.device_check                  # on a GPU or TPU machine: < 5 minutes
  python -m experiments.device_check --smoke          # anywhere (CPU too): tiny shapes, seconds
  python -m experiments.device_check --interpret      # also the Pallas kernels off their
                                                      # hardware, in interpret mode (slow)
  python -m experiments.device_check --parts=numerics  # one part (or several, with commas)

1. Numerics: every implementation that runs here (``xla``, ``blockwise`` and the kernels of
   ``attnjax.kernels`` for this backend) against a dense float32 reference computed at the
   highest matmul precision from the same inputs, output and gradients, for causal
   grouped-query attention in float32 and bfloat16, packed segments and a local window.
2. Benchmark: the headline shapes (B8 T512 N8 H64, and B4 T4096 N16 K4 H128 bfloat16, both
   causal), forward and forward+backward, median of ``--repeats`` timed calls, for attnjax's
   default and each implementation, ``jax.nn.dot_product_attention`` (XLA, and cuDNN on GPU)
   and PyTorch's SDPA where torch is installed (on CUDA when there is a GPU).
3. Training: the copy task (``configs/copy.py``, 300 steps; the smoke variant with
   ``--smoke``) with attnjax's default implementation.

Prints a table per part and writes everything, with the machine and library versions, to
``--out`` (JSON). A part that fails is recorded with its error and the others still run.
"""

import json
import os
import platform
import statistics
import tempfile
import time
import traceback
import warnings

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np
from absl import app, flags

import attnjax
from attnjax import attention, kernels
from attnjax.toy import train as toy_train
from configs import copy as copy_config

_SMOKE = flags.DEFINE_bool("smoke", False, "Tiny shapes and a few training steps (any machine).")
_INTERPRET = flags.DEFINE_bool("interpret", False,
                               "Also check the Pallas kernels in interpret mode off their "
                               "hardware (numerics only).")
_PARTS = flags.DEFINE_list("parts", ["numerics", "benchmark", "training"],
                           "Which parts to run: numerics, benchmark, training.")
_REPEATS = flags.DEFINE_integer("repeats", 10, "Timed calls per benchmark case (median).")
_OUT = flags.DEFINE_string("out", "runs/device_check.json", "Where to write the results.")

# (name, B, T, S, N, K, H, dtype, arguments of dot_product_attention)
NUMERICS = [
    ("causal GQA f32", 2, 256, 256, 4, 2, 64, "float32", dict(is_causal=True)),
    ("causal GQA bf16", 2, 256, 256, 4, 2, 64, "bfloat16", dict(is_causal=True)),
    ("packed segments bf16", 2, 256, 256, 4, 4, 64, "bfloat16", dict(segments=4)),
    ("window bf16", 2, 256, 256, 4, 4, 64, "bfloat16",
     dict(is_causal=True, local_window_size=(64, 0))),
]
# (name, B, T, N, K, H, dtype), all causal self-attention.
BENCHMARK = [
    ("B8 T512 N8 H64 f32", 8, 512, 8, 8, 64, "float32"),
    ("B8 T512 N8 H64 bf16", 8, 512, 8, 8, 64, "bfloat16"),
    ("B4 T4096 N16 K4 H128 bf16", 4, 4096, 16, 4, 128, "bfloat16"),
]
SMOKE_NUMERICS = [
    ("causal GQA f32", 1, 32, 32, 2, 1, 16, "float32", dict(is_causal=True)),
    ("packed window bf16", 1, 32, 32, 2, 2, 16, "bfloat16",
     dict(segments=2, is_causal=True, local_window_size=(8, 0))),
]
SMOKE_BENCHMARK = [("B2 T64 N2 H16 f32", 2, 64, 2, 2, 16, "float32")]
TOLERANCE = {"float32": 2e-2, "bfloat16": 5e-2}  # Max error over max |reference| (TF32 ok).


def machine() -> dict:
  device = jax.devices()[0]
  versions = {"jax": jax.__version__, "jaxlib": jaxlib.__version__, "attnjax":
              attnjax.__version__, "numpy": np.__version__}
  try:
    import torch  # noqa: PLC0415
    versions["torch"] = torch.__version__
  except ImportError:
    pass
  return dict(backend=jax.default_backend(), device=device.device_kind,
              devices=jax.device_count(), platform=platform.platform(),
              processor=platform.processor(), cpus=os.cpu_count(), versions=versions)


def implementations(backend: str, interpret: bool) -> list[str]:
  """The implementations that run on ``backend``: natively, or in interpret mode if asked."""
  return [name for name in attention.IMPLEMENTATIONS
          if name not in kernels.KERNELS or kernels._HARDWARE[name] == backend
          or (interpret and name != "cudnn")]


def make_inputs(B, T, S, N, K, H, dtype, seed=0):
  rng = np.random.default_rng(seed)
  return [jnp.asarray(rng.standard_normal(shape), dtype)
          for shape in ((B, T, N, H), (B, S, K, H), (B, S, K, H))]


def attention_kwargs(arguments: dict, B: int, T: int) -> dict:
  kwargs = dict(arguments)
  if "segments" in kwargs:  # That many packed sequences of equal length.
    ids = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32) * kwargs.pop("segments") // T,
                           (B, T))
    kwargs.update(q_segment_ids=ids, kv_segment_ids=ids)
  return kwargs


def out_and_grads(fn, q, k, v):
  """Jitted ``(out, grads of sum(out * w) w.r.t. q, k, v)`` in float32."""
  w = jnp.cos(jnp.arange(q.size, dtype=jnp.float32)).reshape(q.shape)

  def loss(q, k, v):
    out = fn(q, k, v)
    return jnp.sum(out.astype(jnp.float32) * w), out

  (_, out), grads = jax.jit(jax.value_and_grad(loss, (0, 1, 2), has_aux=True))(q, k, v)
  return [np.asarray(x, np.float32) for x in (out, *grads)]


def check_numerics(cases, names) -> list[dict]:
  rows = []
  for case, B, T, S, N, K, H, dtype, arguments in cases:
    q, k, v = make_inputs(B, T, S, N, K, H, dtype)
    kwargs = attention_kwargs(arguments, B, T)
    reference = out_and_grads(lambda q, k, v, kwargs=kwargs: attnjax.dot_product_attention(
        q, k, v, implementation="xla", precision="highest", **kwargs),
        *(x.astype(jnp.float32) for x in (q, k, v)))
    for name in names:
      row = dict(case=case, implementation=name)
      try:
        got = out_and_grads(lambda q, k, v, name=name, kwargs=kwargs:
                            attnjax.dot_product_attention(q, k, v, implementation=name,
                                                          **kwargs), q, k, v)
        for label, x, ref in zip(("out", "dq", "dk", "dv"), got, reference):
          row[label] = float(np.max(np.abs(x - ref)) / max(np.max(np.abs(ref)), 1e-30))
        row["ok"] = max(row[x] for x in ("out", "dq", "dk", "dv")) <= TOLERANCE[dtype]
      except ValueError as error:  # Arguments the implementation does not support.
        row["unsupported"] = str(error).split(";")[0]
      except Exception as error:  # noqa: BLE001 (record it; check the rest)
        row["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"
      rows.append(row)
  return rows


def jax_runner(fn, args, mode: str):
  if mode == "fwd":
    compiled = jax.jit(fn).lower(*args).compile()
  else:
    grad = jax.grad(lambda *a: jnp.sum(fn(*a).astype(jnp.float32)), (0, 1, 2))
    compiled = jax.jit(grad).lower(*args).compile()
  return lambda: jax.block_until_ready(compiled(*args))


def torch_runner(B, T, N, K, H, dtype, mode: str):
  try:
    import torch  # noqa: PLC0415
  except ImportError:
    return None
  device = "cuda" if torch.cuda.is_available() else "cpu"
  rng = np.random.default_rng(0)
  q, k, v = (torch.tensor(rng.standard_normal((B, n, T, H)), dtype=getattr(torch, dtype),
                          device=device, requires_grad=mode != "fwd") for n in (N, K, K))
  sdpa = torch.nn.functional.scaled_dot_product_attention

  def run():
    out = sdpa(q, k, v, is_causal=True, enable_gqa=N != K)
    if mode != "fwd":
      out.float().sum().backward()
    if device == "cuda":
      torch.cuda.synchronize()
  return run


def median_seconds(run, repeats: int) -> float:
  run()
  run()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    run()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def benchmark(cases, names, repeats: int) -> list[dict]:
  rows = []
  for case, B, T, N, K, H, dtype in cases:
    args = make_inputs(B, T, T, N, K, H, dtype)
    fns = {"attnjax:default": lambda q, k, v: attnjax.dot_product_attention(
        q, k, v, is_causal=True)}
    for name in names:
      fns[f"attnjax:{name}"] = lambda q, k, v, name=name: attnjax.dot_product_attention(
          q, k, v, is_causal=True, implementation=name)
    fns["jax.nn:xla"] = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True)
    if jax.default_backend() == "gpu":
      fns["jax.nn:cudnn"] = lambda q, k, v: jax.nn.dot_product_attention(
          q, k, v, is_causal=True, implementation="cudnn")
    chosen = attention._choose_implementation(
        attention._canonicalize(*args, None, None, True, None, None, None, None, None), 0.0,
        False)
    for mode in ("fwd", "fwd+bwd"):
      runners = {}
      for impl, fn in fns.items():
        try:
          runners[impl] = jax_runner(fn, args, mode)
        except Exception as error:  # noqa: BLE001 (unsupported here; recorded)
          runners[impl] = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
      torch_run = torch_runner(B, T, N, K, H, dtype, mode)
      if torch_run is not None:
        runners["torch:sdpa"] = torch_run
      for impl, run in runners.items():
        row = dict(case=case, mode=mode, implementation=impl, chosen_by_default=chosen)
        if isinstance(run, str):
          row["error"] = run
        else:
          try:
            row["ms"] = 1e3 * median_seconds(run, repeats)
          except Exception as error:  # noqa: BLE001
            row["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
        rows.append(row)
      reference = next((r.get("ms") for r in rows if r["case"] == case and r["mode"] == mode
                        and r["implementation"] == "jax.nn:xla"), None)
      for row in rows:
        if row["case"] == case and row["mode"] == mode and "ms" in row and reference:
          row["x_jax_nn"] = reference / row["ms"]
  return rows


def train(smoke: bool) -> dict:
  config = copy_config.get_config("smoke" if smoke else None)
  with config.unlocked():  # (Unlocking lets existing fields change, not new ones appear.)
    config.plots = False
    config.eval.check_overlap = False
    if not smoke:
      config.train.num_steps = 300
      config.train.eval_every = 0
      config.train.checkpoint_every = 300
      config.eval.num_sequences = 200
  start = time.perf_counter()
  with tempfile.TemporaryDirectory() as workdir:
    results = toy_train.train_and_evaluate(config, workdir)
  return dict(steps=int(results["step"]), seconds=time.perf_counter() - start,
              buckets=results["buckets"])


def print_tables(report: dict) -> None:
  print(f"\n{report['machine']['device']} ({report['machine']['backend']}), "
        f"jax {report['machine']['versions']['jax']}")
  print(f"\nNumerics (max |error| / max |reference|, against dense float32 at highest "
        f"precision):\n  {'case':22s} {'implementation':12s} {'out':>9s} {'dq':>9s} "
        f"{'dk':>9s} {'dv':>9s}  ok")
  for row in report["numerics"]:
    if "out" in row:
      cells = " ".join(f"{row[x]:9.2e}" for x in ("out", "dq", "dk", "dv"))
      print(f"  {row['case']:22s} {row['implementation']:12s} {cells}  {row['ok']}")
    else:
      print(f"  {row['case']:22s} {row['implementation']:12s} "
            f"{row.get('unsupported') or row.get('error')}")
  print(f"\nBenchmark (causal, median ms; x jax.nn = jax.nn's XLA time over this one):\n"
        f"  {'case':26s} {'mode':8s} {'implementation':22s} {'ms':>9s} {'x jax.nn':>8s}")
  for row in report["benchmark"]:
    if "ms" in row:
      ratio = f"{row['x_jax_nn']:8.2f}" if "x_jax_nn" in row else ""
      print(f"  {row['case']:26s} {row['mode']:8s} {row['implementation']:22s} "
            f"{row['ms']:9.2f} {ratio}")
    else:
      print(f"  {row['case']:26s} {row['mode']:8s} {row['implementation']:22s} "
            f"{row['error'][:60]}")
  training = report.get("training")
  if training is None:
    return
  if "error" in training:
    print(f"\nTraining: {training['error']}")
  else:
    exact = {name: round(m.get("exact_match", float("nan")), 3)
             for name, m in training["buckets"].items()}
    print(f"\nTraining (copy task, default implementation): {training['steps']} steps in "
          f"{training['seconds']:.1f} s; exact match per bucket {exact}")


def main(argv):
  del argv
  start = time.perf_counter()
  backend = jax.default_backend()
  names = implementations(backend, _INTERPRET.value)
  report = dict(machine=machine(), smoke=_SMOKE.value, numerics=[], benchmark=[])
  if "numerics" in _PARTS.value:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", kernels.InterpretModeWarning)
      report["numerics"] = check_numerics(SMOKE_NUMERICS if _SMOKE.value else NUMERICS, names)
  if "benchmark" in _PARTS.value:
    native = [n for n in names if n not in kernels.KERNELS or kernels._HARDWARE[n] == backend]
    native = [] if _SMOKE.value else native  # (smoke: attnjax's default and jax.nn only)
    report["benchmark"] = benchmark(SMOKE_BENCHMARK if _SMOKE.value else BENCHMARK, native,
                                    1 if _SMOKE.value else _REPEATS.value)
  if "training" in _PARTS.value:
    try:
      report["training"] = train(_SMOKE.value)
    except Exception:  # noqa: BLE001 (recorded in the report)
      report["training"] = dict(error=traceback.format_exc(limit=3))
  report["seconds"] = time.perf_counter() - start
  os.makedirs(os.path.dirname(os.path.abspath(_OUT.value)), exist_ok=True)
  with open(_OUT.value, "w") as f:
    json.dump(report, f, indent=1)
  print_tables(report)
  print(f"\nWrote {_OUT.value} ({report['seconds']:.0f} s)")


if __name__ == "__main__":
  app.run(main)
