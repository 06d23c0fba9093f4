"""Multi-query associative recall (Zoology, in sequence-to-sequence form), decoder-only.

2-4 key-value pairs (keys and values from disjoint halves of 32 symbols), then 2 queried
keys; the target is their values.

Command:
  python -m experiments.copy_task --config configs/associative_recall.py \
      --workdir runs/associative_recall

Recipe: 2 layers (d_model 64, 4 heads, MLP 128, rotary), a short convolution of kernel 3 over
the token embeddings, Adam at 3e-3 with cosine decay, batch 64, 1,500 steps (70k parameters).

Result (2-core CPU, AMD EPYC, one device): every seed checked reaches greedy exact match
1.000 on 1,000 held-out sequences of 2-4 pairs (token accuracy 1.000); none of them is a seed
used to choose the recipe (100-104).

* Seeds 0 (the default) and 2000-2004, on this code: 6 of 6 reach 1.000 (held-out exact
  match 0.975-0.997 at step 250, >= 0.998 from step 500 on). At 2x (8 pairs) exact match
  0.956-0.995 (token accuracy 0.985-0.998); at 4x (16 pairs) 0.721-0.849 (token accuracy
  0.900-0.948). 204-247 s of wall time per run, inflated by other jobs that kept the load
  average at 5-10 on the 2 cores; process CPU time (user + system) 101-117 s. Seed 0 run
  twice gave the same figures.
* Seeds 0-4 and 1000-1004, in an earlier check on older code: 10 of 10 reach 1.000 (0.99
  by step 250 or 500); 0.952-0.995 at 2x (token accuracy 0.983-0.998), 0.745-0.901 at 4x
  (0.907-0.966); 64-98 s per run at load average 1.4-4.

6-8% of the held-out sequences also occur in the training stream; the exact match on the
others is 1.000 on every seed. Seed 0 gave 0.982 at 2x and 0.756 at 4x here, 0.979 and
0.781 in the earlier check: trajectories differ across machines and with small changes to
the compiled program (floating-point reductions differ), so expect other figures at 2x and
4x, while the training lengths are solved with steps to spare.

Why the convolution: without it, the model must learn two look-ups by position with
attention (each value's key, one token back; each answer slot's query, two back) before any
head can match a query with a key, and it sits on a plateau at exact match ~0.3 (it answers
with some value of the context) until it does. How long varies by seed and machine: the
previous recipe (3 layers, no convolution, 6,000 steps) solved seed 0 on one machine and
ended at 0.596 on another. On seeds 100-104 (500 held-out sequences; runs cut short once the
picture was clear) every variant of it tried left at least one seed below 0.41 exact match: a
peak rate of 1e-2 (after 1,750 steps), 1e-3, 8 heads, 4 layers, or layers without MLPs
(2,500), RoPE base 100 or learned relative-position biases (3,000), a constant rate (3,500),
and batch 256, 4x the compute per step (2,000; the other four seeds passed 0.99 at steps
1,000-2,000). With the convolution, 2 layers pass 0.99 by step 250 on all five.
"""

import ml_collections

from configs import copy


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The associative-recall config; ``arg="smoke"`` shrinks it to a seconds-long run."""
  config = copy.base_config()
  config.task.name = "associative_recall"  # See attnjax/toy/tasks.py for the format.
  config.task.num_symbols = 32  # 16 key symbols, 16 value symbols.
  config.task.min_length = 2  # Fewest key-value pairs (>= num_queries: always 2 queries).
  config.task.max_length = 4  # Most key-value pairs (4x = 16 pairs = every key symbol).
  config.task.num_queries = 2  # Keys queried per example.
  config.model.arch = "decoder_only"  # One causal stack over BOS pairs queries SEP values EOS.
  config.model.num_layers = 2  # Two layers suffice with the short convolution (Zoology's 2).
  config.model.position = "rotary"  # Relative offsets come easier than absolute positions.
  # Each embedding also sees the two before it: a value its key, an answer slot its query.
  # Without it, learning those look-ups is a long plateau whose length varies by seed.
  config.model.short_conv = 3
  config.train.num_steps = 1500  # Training steps (exact match passes 0.99 by step ~250).
  config.train.eval_every = 250  # Steps between held-out evals.
  config.train.checkpoint_every = 500  # Steps between checkpoints.
  return copy.finalize(config, arg)
