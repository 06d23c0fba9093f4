r"""Benchmarks ring attention on 8 forced CPU devices against the single-device blockwise path.

  python -m experiments.benchmark_ring                    # about 30 minutes on 2 CPU cores
  python -m experiments.benchmark_ring --lengths=16384    # a few minutes
  python -m experiments.benchmark_ring --lengths=131072 --paths=single  # one case

For causal attention with one head of 64 (batch 1, float32), at the same total length, it
reports per-device XLA temporary memory (``compile().memory_analysis()`` of the per-device
program) and the median time of forward+backward, for the one-device blockwise path and for
ring attention on 1, 2, 4 and 8 devices (at 131,072 tokens, time on 8 devices x 16,384 tokens
and on one device only, once each). Last, the work of each device in blocks of logits
(:func:`attnjax.parallel.ring_work`) for the contiguous and zigzag layouts, against full-mask
work divided by two.

The 8 devices are forced host devices sharing this machine's cores: times measure the total
work, not the parallel speed-up that 8 real devices would give, and a device that waits does
not slow the others here (so the contiguous layout's imbalance shows in the work counts, not
in the times). Writes --out (JSON) with the machine.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import functools  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from jax.sharding import Mesh  # noqa: E402

import attnjax  # noqa: E402
from attnjax import parallel  # noqa: E402

_LENGTHS = flags.DEFINE_list("lengths", ["16384", "131072"], "Total sequence lengths.")
_PATHS = flags.DEFINE_list("paths", ["single", "ring"],
                           "single: the one-device blockwise path; ring: ring attention.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed repeats per case (median reported).")
_OUT = flags.DEFINE_string("out", "runs/benchmark_ring.json", "Where to write the results.")

HEAD_DIM = 64


def loss_and_grads(attend):
  """jit(value_and_grad) of sum(attend(q, k, v) * dout) over q, k, v."""
  def loss(q, k, v, dout):
    return jnp.sum(attend(q, k, v) * dout)
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))


def single_device(q, k, v):
  return attnjax.dot_product_attention(q, k, v, is_causal=True, implementation="blockwise")


def ring(devices: int, layout: str):
  mesh = Mesh(np.array(jax.devices()[:devices]), ("seq",))
  return functools.partial(parallel.sharded_ring_attention, mesh=mesh, axis_name="seq",
                           layout=layout, is_causal=True)


def measure(name: str, attend, length: int, devices: int, timed: bool, repeats: int) -> dict:
  """Per-device temporary memory of the compiled fwd+bwd, and its median time."""
  shape = (1, length, 1, HEAD_DIM)
  args = [jnp.asarray(np.random.default_rng(i).normal(size=shape), jnp.float32)
          for i in range(4)]
  fn = loss_and_grads(attend)
  start = time.perf_counter()
  compiled = fn.lower(*args).compile()
  row = dict(name=name, length=length, devices=devices, tokens_per_device=length // devices,
             compile_s=round(time.perf_counter() - start, 2),
             temp_mb=round(compiled.memory_analysis().temp_size_in_bytes / 2**20, 1))
  if timed:
    times = []
    for _ in range(repeats):
      start = time.perf_counter()
      jax.block_until_ready(compiled(*args))
      times.append(time.perf_counter() - start)
    row.update(fwd_bwd_s=round(statistics.median(times), 3),
               fwd_bwd_s_range=[round(min(times), 3), round(max(times), 3)])
  print(json.dumps(row), flush=True)
  return row


def work_balance(length: int, devices: int) -> dict:
  """Blocks of logits per device, causal, for both layouts, against full work / 2."""
  block = attnjax.blockwise.default_block_sizes(1, length // devices, length // devices)
  full = int(parallel.ring_work(devices, length, block_sizes=block).max())
  result = dict(length=length, devices=devices, block_sizes=list(block), full_work=full)
  for layout in ("contiguous", "zigzag"):
    work = parallel.ring_work(devices, length, layout=layout, is_causal=True,
                              block_sizes=block)
    result[layout] = dict(per_device=work.tolist(),
                          max_over_half_full=round(float(work.max()) / (full / 2), 3))
  print(json.dumps(result), flush=True)
  return result


def machine() -> dict:
  """The machine and versions the figures were measured with."""
  try:
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    model = next(line.split(":", 1)[1].strip() for line in lscpu.splitlines()
                 if line.startswith("Model name"))
  except (OSError, subprocess.CalledProcessError, StopIteration):
    model = None
  return dict(cpu=model, cores=os.cpu_count(), devices=jax.device_count(),
              jax=jax.__version__, load_average=os.getloadavg()[0])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if jax.device_count() < 8:
    raise app.UsageError(f"needs 8 devices, got {jax.device_count()}: set XLA_FLAGS="
                         "--xla_force_host_platform_device_count=8 or leave XLA_FLAGS unset")
  results = dict(machine=machine(), cases=[], work=[])
  print(json.dumps(results["machine"]), flush=True)
  repeats = _REPEATS.value
  for length in map(int, _LENGTHS.value):
    long = length > 16384  # Long cases are timed once; ring on fewer than 8 devices is not.
    if "single" in _PATHS.value:
      results["cases"].append(measure("single-device blockwise", single_device, length, 1,
                                      timed=True, repeats=1 if long else repeats))
    if "ring" in _PATHS.value:
      for devices in (1, 2, 4, 8):
        for layout in ("contiguous", "zigzag") if devices == 8 else ("contiguous",):
          timed = not long or devices == 8
          results["cases"].append(measure(f"ring {layout}", ring(devices, layout), length,
                                          devices, timed, 1 if long else repeats))
      results["work"].append(work_balance(length, 8))
  results["machine"]["load_average_end"] = os.getloadavg()[0]
  os.makedirs(os.path.dirname(_OUT.value) or ".", exist_ok=True)
  with open(_OUT.value, "w") as f:
    json.dump(results, f, indent=1)
  print(f"Wrote {_OUT.value}")


if __name__ == "__main__":
  app.run(main)
