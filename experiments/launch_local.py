r"""Runs a command as N processes of one JAX program on this machine (CPU, gloo).

  python -m experiments.launch_local --num_processes=2 -- \
      python -m experiments.copy_task --config configs/copy.py:smoke --workdir runs/mp

Each process gets the coordinator's address, the process count and its index in the
environment (see attnjax.toy.launch); the output of each is prefixed with ``[i]``; if one
fails the others are stopped and the exit status is nonzero.
"""

import sys

from absl import app, flags

from attnjax.toy import launch

_NUM_PROCESSES = flags.DEFINE_integer("num_processes", 2, "Processes to start.")
_PORT = flags.DEFINE_integer("port", None, "Coordinator port on localhost (default: free).")


def main(argv):
  if len(argv) < 2:
    raise app.UsageError("give the command after --, e.g. -- python -m experiments.copy_task ...")
  sys.exit(launch.launch_local(argv[1:], _NUM_PROCESSES.value, port=_PORT.value))


if __name__ == "__main__":
  app.run(main)
