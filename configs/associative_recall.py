"""Multi-query associative recall (Zoology, in sequence-to-sequence form), decoder-only.

2-8 key-value pairs (keys and values from disjoint halves of 64 symbols), then up to 4
queried keys; the target is their values.

Command:
  python -m experiments.copy_task --config configs/associative_recall.py \
      --workdir runs/associative_recall

Result (2-core CPU, one device): RESULT_PLACEHOLDER
"""

import ml_collections

from configs import copy


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The associative-recall config; ``arg="smoke"`` shrinks it to a seconds-long run."""
  config = copy.base_config()
  config.task.name = "associative_recall"  # See attnjax/toy/tasks.py for the format.
  config.task.num_symbols = 64  # 32 key symbols, 32 value symbols.
  config.task.min_length = 2  # Fewest key-value pairs.
  config.task.max_length = 8  # Most key-value pairs (4x = 32 pairs = every key symbol).
  config.task.num_queries = 4  # Most keys queried per example.
  config.model.arch = "decoder_only"  # One causal stack over BOS pairs queries SEP values EOS.
  config.model.num_layers = 2  # Recall needs two layers (an induction-head circuit).
  config.train.num_steps = 3000  # Training steps.
  config.train.eval_every = 1000  # Steps between held-out evals.
  config.train.checkpoint_every = 1000  # Steps between checkpoints.
  return copy.finalize(config, arg)
