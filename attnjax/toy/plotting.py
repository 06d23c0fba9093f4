"""Figures of a run: learning curves and attention maps (every layer and head).

Attention maps come from the weights the attention layers sow (``sow_weights=True``), on
held-out examples under teacher forcing, with the tokens on the axes: rows are queries,
columns keys, one panel per head, one row of panels per layer.
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING

import jax
import matplotlib

from attnjax.toy import models, tasks

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

if TYPE_CHECKING:
  from attnjax.toy.train import Experiment


def learning_curves(metrics_path: str, out_path: str) -> None:
  """Loss and token accuracy against step, train and held-out, from ``metrics.jsonl``."""
  with open(metrics_path) as f:
    records = [json.loads(line) for line in f]
  fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.6))
  for split in ("train", "eval"):
    points = [(r["step"], r[f"{split}_loss"], r[f"{split}_token_accuracy"])
              for r in records if f"{split}_loss" in r]
    if points:
      step, loss, acc = zip(*points, strict=True)
      style = {"marker": "o", "markersize": 3} if split == "eval" else {}
      ax_loss.plot(step, loss, label=split, **style)
      ax_acc.plot(step, acc, label=split, **style)
  ax_loss.set(xlabel="step", ylabel="loss per target token", yscale="log")
  ax_acc.set(xlabel="step", ylabel="token accuracy (teacher forced)", ylim=(0, 1.01))
  for ax in (ax_loss, ax_acc):
    ax.grid(alpha=0.3)
    ax.legend()
  fig.tight_layout()
  fig.savefig(out_path, dpi=110)
  plt.close(fig)


def attention_maps(exp: Experiment, params, workdir: str) -> list[str]:
  """Writes ``attention_{i}.png`` for ``config.eval.num_attention_examples`` held-out
  examples (one row of heads per attention layer: encoder self-, decoder self- and
  cross-attention); returns the paths."""
  num = exp.config.eval.num_attention_examples
  if not num:
    return []

  @jax.jit
  def sow(params):
    example = exp.format(exp.eval_batch(exp.task, num, stream=1000), stream=1000,
                         held_out=True)
    _, variables = models.apply_model(exp.model, {"params": params}, example,
                                      sow_weights=True, mutable=["intermediates"])
    return example, variables["intermediates"]

  example, sown = jax.device_get(sow(params))
  paths = []
  for i in range(num):
    dec_tokens = example["decoder_inputs"][i]
    dec_len = int((example["weights"][i] > 0).nonzero()[0].max()) + 1
    dec_names = tasks.token_names(exp.task, dec_tokens[:dec_len])
    groups = []  # (stack, attention kind, query names, key names)
    if "inputs" in example:
      enc_tokens = example["inputs"][i]
      enc_names = tasks.token_names(exp.task, enc_tokens[enc_tokens != tasks.PAD])
      groups.append(("encoder", "self_attention", enc_names, enc_names))
      groups.append(("decoder", "self_attention", dec_names, dec_names))
      groups.append(("decoder", "cross_attention", dec_names, enc_names))
    else:
      groups.append(("decoder", "self_attention", dec_names, dec_names))
    panels = []  # (title, [N, T, S] weights, query names, key names)
    for stack, kind, q_names, k_names in groups:
      for layer in sorted(sown[stack], key=lambda name: int(name.split("_")[1])):
        w_NTS = sown[stack][layer][kind]["attention_weights"][0][i]
        panels.append((f"{stack} {layer} {kind.replace('_', '-')}",
                       w_NTS[:, :len(q_names), :len(k_names)], q_names, k_names))
    path = os.path.join(workdir, f"attention_{i}.png")
    _draw(panels, f"{exp.task.name}: held-out example {i} (rows: queries, columns: keys)",
          path)
    paths.append(path)
  return paths


def _draw(panels, title: str, out_path: str) -> None:
  num_heads = panels[0][1].shape[0]
  cell = 0.16 * max(max(len(q), len(k)) for _, _, q, k in panels) + 0.8
  fig, axes = plt.subplots(len(panels), num_heads, squeeze=False,
                           figsize=(cell * num_heads, cell * len(panels) + 0.5))
  for row, (name, w_NTS, q_names, k_names) in enumerate(panels):
    for head in range(num_heads):
      ax = axes[row, head]
      ax.imshow(w_NTS[head], cmap="viridis", vmin=0.0, vmax=1.0)
      ax.set_xticks(range(len(k_names)), k_names, fontsize=5, rotation=90)
      ax.set_yticks(range(len(q_names)), q_names, fontsize=5)
      ax.set_title(f"{name}, head {head}", fontsize=6)
  fig.suptitle(title, fontsize=8)
  fig.subplots_adjust(hspace=0.5, wspace=0.4)
  fig.savefig(out_path, dpi=100)
  plt.close(fig)
