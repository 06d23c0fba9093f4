r"""Trains and evaluates a Transformer on a toy task (copy, reverse, duplicate, recall).

  python -m experiments.copy_task --config configs/copy.py --workdir runs/copy
  python -m experiments.copy_task --config configs/copy.py:smoke --workdir /tmp/smoke
  python -m experiments.copy_task --config configs/reverse.py --workdir runs/reverse \
      --config.model.num_layers=4

Writes config.json, metrics.jsonl, checkpoints/, results.json and figures to the workdir;
rerunning resumes from the newest intact checkpoint. One run at a time holds a workdir, and a
rerun that changes how training proceeds (seed, optimizer, batch size, ...) is refused unless
--allow_config_change is given (see attnjax.toy.train). Under experiments.launch_local it
is one process of a multi-process run.
"""

from absl import app, flags, logging
from ml_collections import config_flags

from attnjax.toy import launch, train

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and results.")
_ALLOW_CONFIG_CHANGE = flags.DEFINE_bool(
    "allow_config_change", False,
    "Resume even if the config changes fields that alter training (recorded in "
    "config_history.jsonl).")
_CLUSTER = flags.DEFINE_bool(
    "cluster", False,
    "Join a multi-host run with jax.distributed.initialize() (on each host of a TPU slice or "
    "GPU cluster); under experiments.launch_local the processes join without it.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO.
  launch.initialize_from_environment(cluster=_CLUSTER.value)
  train.train_and_evaluate(_CONFIG.value, _WORKDIR.value,
                           allow_config_change=_ALLOW_CONFIG_CHANGE.value)


if __name__ == "__main__":
  app.run(main)
