r"""Runs the length-generalization study: tasks x position schemes x seeds.

  python -m experiments.length_generalization --config configs/length_generalization.py \
      --workdir runs/lengen
  python -m experiments.length_generalization \
      --config configs/length_generalization.py:quick --workdir runs/lengen_quick

Lists are overridden with Python literals, e.g. a subset of the study::

  python -m experiments.length_generalization --config configs/length_generalization.py \
      --workdir runs/lengen --config.tasks="('copy',)" --config.schemes="('fire', 't5')"

Each run is a copy_task run in ``{workdir}/{task}/{scheme}/seed_{seed}`` (rerunning resumes
and skips finished runs); the summary goes to ``results.json``, ``results.md`` and
``curve_{task}.png`` in the workdir (see attnjax.toy.length_generalization).
"""

from absl import app, flags, logging
from ml_collections import config_flags

from attnjax.toy import length_generalization

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to the study config.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory of the study's runs and results.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO.
  summary = length_generalization.run_study(_CONFIG.value, _WORKDIR.value)
  print(length_generalization.markdown_table(summary), flush=True)


if __name__ == "__main__":
  app.run(main)
