"""The Annotated Transformer's copy task (Rush et al. 2018, "The Annotated Transformer").

Vocabulary 11 (0 = padding), sequences of 10 tokens whose first is the start symbol 1,
source = target; encoder-decoder, 2 layers, d_model 512, 8 heads, d_ff 2048, dropout 0.1;
Adam(0.9, 0.98, eps 1e-9) under the Noam schedule (factor 1, warmup 400); batch 30, 10
"epochs" of 20 steps, evaluating the loss per token after each (every 20 steps).

Command:
  python -m experiments.copy_task --config configs/annotated_copy.py --workdir runs/annotated

Result (2-core CPU): held-out loss per token after each 20-step
"epoch" 1.97, 1.60, 1.12, 0.83, 0.46, 0.26, 0.30, 0.11, 0.15, 0.15 (published: 1.93, 1.66,
1.49, 1.35, 0.99, 0.57, 0.34, 0.26, 0.43, 0.27); greedy decoding of 1..10 gives 1..10; exact
match 0.65 on 1,000 held-out sequences after 200 steps. 318 s of wall time (loaded machine).
With --config.model.norm=post (the paper's LayerNorm placement): 1.88, 1.75, 1.69, 1.48,
1.07, 0.75, 0.43, 0.48, 0.41, 0.35, exact match 0.35, and 1..10 also decodes to 1..10.
"""

import ml_collections

from configs import copy


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The Annotated Transformer copy-task config; ``arg="smoke"`` for a seconds-long run."""
  config = copy.base_config()
  config.task.name = "annotated_copy"  # Tokens 1..10, first = start symbol 1, no EOS.
  config.task.num_symbols = 10  # Symbols 1..10: vocabulary 11 with padding 0.
  config.task.min_length = 10  # Every sequence has 10 tokens, start symbol included.
  config.task.max_length = 10  # (The same: one length.)
  config.model.arch = "encoder_decoder"  # As the Annotated Transformer.
  config.model.num_layers = 2  # N = 2.
  config.model.d_model = 512  # d_model = 512.
  config.model.num_heads = 8  # h = 8.
  config.model.mlp_dim = 2048  # d_ff = 2048.
  config.model.dropout_rate = 0.1  # Dropout on embeddings and sublayer outputs.
  config.model.attention_dropout_rate = 0.1  # Their attention() drops attention weights too.
  # Their code normalises first ("for code simplicity the norm is first as opposed to last"),
  # with a final LayerNorm per stack: pre-LN. --config.model.norm=post gives the paper's.
  config.model.norm = "pre"
  config.model.tie_embeddings = False  # Separate source/target embeddings and generator.
  config.model.kernel_init = "xavier_uniform"  # They re-initialise every matrix Xavier-uniform.
  config.optimizer.name = "adam"  # torch.optim.Adam.
  config.optimizer.schedule = "noam"  # lr = factor * d^-0.5 * min(s^-0.5, s * warmup^-1.5).
  config.optimizer.learning_rate = 1.0  # The Noam factor.
  config.optimizer.warmup_steps = 400  # Noam warmup.
  config.optimizer.b1 = 0.9  # Adam betas and epsilon as theirs.
  config.optimizer.b2 = 0.98  # (idem)
  config.optimizer.eps = 1e-9  # (idem)
  config.optimizer.grad_clip_norm = 0.0  # No clipping.
  config.train.num_steps = 200  # 10 epochs of 20 batches.
  config.train.batch_size = 30  # Batch 30.
  config.train.label_smoothing = 0.0  # Their copy example sets smoothing 0.
  config.train.log_every = 20  # Log once per "epoch".
  config.train.eval_every = 20  # Evaluate once per "epoch" (they used 5 batches of 30).
  config.train.checkpoint_every = 100  # Two checkpoints.
  config.eval.length_multipliers = (2,)  # Length 20 as well (sinusoidal: expect failure).
  config.eval.decode_examples = (tuple(range(1, 11)),)  # Their example: decode 1..10.
  return copy.finalize(config, arg)
