"""Helpers shared by the benchmark scripts: the machine a figure was measured on, and memory."""

import json
import os
import platform
import resource

import jax


def peak_rss_mb() -> float:
  """Peak resident memory of this process. (ru_maxrss would count the parent's RSS at fork.)"""
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith("VmHWM:"):
        return int(line.split()[1]) / 1024
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # not Linux


def machine() -> dict:
  """The machine and library versions the figures were measured with."""
  cpu = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo") as f:
      cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
  except (OSError, StopIteration):
    pass
  try:
    import torch  # noqa: PLC0415
    torch_version = torch.__version__
  except ImportError:
    torch_version = None
  import flax  # noqa: PLC0415
  return dict(cpu=cpu, cores=os.cpu_count(), device=jax.devices()[0].device_kind,
              python=platform.python_version(), jax=jax.__version__, flax=flax.__version__,
              torch=torch_version, load_average=os.getloadavg()[0])


def write_results(path: str, results: dict) -> None:
  """Writes a benchmark's results as JSON to ``path``, creating its folder, and says so."""
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  with open(path, "w") as f:
    json.dump(results, f, indent=1)
  print(f"\nWrote {path}")
