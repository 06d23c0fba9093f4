"""Multi-process runs: start N processes of one command on this machine, and join them.

:func:`launch_local` starts the processes, each with the coordinator's address, the number of
processes and its own index in the environment (:data:`COORDINATOR_ADDRESS`,
:data:`NUM_PROCESSES`, :data:`PROCESS_ID`); :func:`initialize_from_environment`, called by the
program before it uses JAX, reads them and calls ``jax.distributed.initialize``, with CPU
collectives over gloo. The processes then form one JAX program over every process's devices
(``jax.devices()`` lists them all; ``jax.local_devices()`` this process's).

On a TPU slice or a GPU cluster (SLURM, Open MPI, Kubernetes with JobSet) each host runs the
same command itself and ``jax.distributed.initialize()`` without arguments finds its
coordinator, process count and index in the cluster's environment; this module is only the
single-machine stand-in for that.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence

import jax

# Environment variables that launch_local sets in each process.
COORDINATOR_ADDRESS = "ATTNJAX_COORDINATOR_ADDRESS"
NUM_PROCESSES = "ATTNJAX_NUM_PROCESSES"
PROCESS_ID = "ATTNJAX_PROCESS_ID"


def initialize_from_environment(cluster: bool = False) -> bool:
  """Joins the multi-process run described by the environment, if any.

  Call it before anything else uses JAX. With :data:`COORDINATOR_ADDRESS`,
  :data:`NUM_PROCESSES` and :data:`PROCESS_ID` set (by :func:`launch_local`), selects gloo
  for CPU collectives and calls ``jax.distributed.initialize``; without them does nothing,
  unless ``cluster``.

  Args:
    cluster: without the variables, call ``jax.distributed.initialize()`` with no arguments,
      which reads a TPU slice's or a GPU cluster's own environment (SLURM, Open MPI, ...).

  Returns:
    Whether it initialised a multi-process run.

  Raises:
    ValueError: if only some of the variables are set.
  """
  names = (COORDINATOR_ADDRESS, NUM_PROCESSES, PROCESS_ID)
  values = [os.environ.get(name) for name in names]
  if not any(values):
    if cluster:
      jax.distributed.initialize()
    return cluster
  if not all(values):
    raise ValueError(f"set all of {names} or none, got "
                     f"{dict(zip(names, values, strict=True))}")
  address, count, index = (str(v) for v in values)
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=address, num_processes=int(count),
                             process_id=int(index))
  return True


def free_port() -> int:
  """A TCP port of localhost that is free now."""
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def launch_local(command: Sequence[str], num_processes: int, *,
                 port: int | None = None, grace_seconds: float = 5.0) -> int:
  """Runs ``command`` as ``num_processes`` processes of one JAX program on this machine.

  Each line a process writes (stdout and stderr) is forwarded with the prefix ``[i] `` of
  its index. If a process fails, the others are stopped (SIGTERM, then SIGKILL after
  ``grace_seconds``): a multi-process JAX program cannot go on without one of them.

  Args:
    command: the program and its arguments, e.g. ``["python", "-m",
      "experiments.copy_task", ...]``.
    num_processes: N >= 1.
    port: the coordinator's port on localhost; default a free one.
    grace_seconds: how long a stopped process may take to exit before it is killed.

  Returns:
    0 if every process succeeded, else the exit status of the first that failed (128 + the
    signal for one killed by a signal).

  Raises:
    ValueError: for ``num_processes < 1`` or an empty command.
  """
  if num_processes < 1 or not command:
    raise ValueError(f"need num_processes >= 1 and a command, got {num_processes} and "
                     f"{list(command)!r}")
  address = f"localhost:{port or free_port()}"
  processes, threads = [], []
  for i in range(num_processes):
    env = dict(os.environ, **{COORDINATOR_ADDRESS: address, NUM_PROCESSES: str(num_processes),
                              PROCESS_ID: str(i)})
    p = subprocess.Popen(list(command), env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, start_new_session=True)
    processes.append(p)
    threads.append(threading.Thread(target=_forward, args=(p, f"[{i}] "), daemon=True))
    threads[-1].start()
  failure = 0
  try:
    while any(p.poll() is None for p in processes) and not failure:
      failure = next((_status(p) for p in processes if p.poll()), 0)
      time.sleep(0.1)
    failure = failure or next((_status(p) for p in processes if p.returncode), 0)
  finally:
    _stop([p for p in processes if p.poll() is None], grace_seconds)
    for t in threads:
      t.join(timeout=5)
  return failure


def _status(p: subprocess.Popen) -> int:
  return 128 - p.returncode if p.returncode < 0 else p.returncode


def _forward(p: subprocess.Popen, prefix: str) -> None:
  assert p.stdout is not None
  for line in iter(p.stdout.readline, b""):
    sys.stdout.write(prefix + line.decode(errors="replace").rstrip("\r\n") + "\n")
    sys.stdout.flush()


def _stop(processes: list[subprocess.Popen], grace_seconds: float) -> None:
  """SIGTERM to each process group, then SIGKILL to those still alive after the grace."""
  for p in processes:
    os.killpg(p.pid, signal.SIGTERM)
  deadline = time.time() + grace_seconds
  for p in processes:
    try:
      p.wait(timeout=max(deadline - time.time(), 0))
    except subprocess.TimeoutExpired:
      os.killpg(p.pid, signal.SIGKILL)
      p.wait()
