"""Reverse, the length-generalization study's best non-oracle position scheme.

Command:
  python -m experiments.copy_task --config configs/reverse_extrapolate.py \
      --workdir runs/reverse_extrapolate

The study's run (decoder-only, 2 layers, lengths 1-16; see configs/length_generalization.py)
with the scheme of highest exact match at the 1.5x validation length. Results (2x, 4x in
results.json): see the README's "Length generalization" section.
"""

import ml_collections

from configs import length_generalization

SCHEME = "hard_alibi"  # The study's scheme_overrides entry, chosen at 1.5x on copy.


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The reverse run of the study under SCHEME; ``arg="smoke"`` shrinks it to seconds."""
  return length_generalization.extrapolate_config("reverse", SCHEME, arg)
