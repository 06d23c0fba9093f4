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
import numpy as np

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
      ax_loss.plot(step, loss, label=split)
      ax_acc.plot(step, acc, label=split)
  ax_loss.set(xlabel="step", ylabel="loss per target token", yscale="log")
  ax_acc.set(xlabel="step", ylabel="token accuracy (teacher forced)", ylim=(0, 1.01))
  for ax in (ax_loss, ax_acc):
    ax.grid(alpha=0.3)
    ax.legend()
  fig.tight_layout()
  fig.savefig(out_path, dpi=110)
  plt.close(fig)


def _panel_grid(weights: list[np.ndarray], q_names: list[str], k_names: list[str],
                title: str, out_path: str) -> None:
  """One figure: ``weights[layer]`` is ``[N, T, S]``."""
  num_layers, num_heads = len(weights), weights[0].shape[0]
  size = 0.18 * max(len(q_names), len(k_names)) + 1.0
  fig, axes = plt.subplots(num_layers, num_heads, squeeze=False,
                           figsize=(size * num_heads, size * num_layers + 0.6))
  for layer, w_NTS in enumerate(weights):
    for head in range(num_heads):
      ax = axes[layer, head]
      ax.imshow(w_NTS[head], cmap="viridis", vmin=0.0, vmax=1.0)
      ax.set_xticks(range(len(k_names)), k_names, fontsize=6, rotation=90)
      ax.set_yticks(range(len(q_names)), q_names, fontsize=6)
      ax.set_title(f"layer {layer} head {head}", fontsize=7)
  fig.suptitle(title, fontsize=9)
  fig.tight_layout()
  fig.savefig(out_path, dpi=110)
  plt.close(fig)


def attention_maps(exp: Experiment, params, workdir: str) -> list[str]:
  """Writes ``attention_{i}_{kind}.png`` for ``config.eval.num_attention_examples`` held-out
  examples; returns the paths."""
  num = exp.config.eval.num_attention_examples
  if not num:
    return []
  batch = jax.device_get(exp.eval_batch(exp.task, num, stream=1000))
  example = exp.format(batch)
  _, variables = models.apply_model(exp.model, {"params": params}, example,
                                    sow_weights=True, mutable=["intermediates"])
  sown = jax.device_get(variables["intermediates"])
  paths = []
  for i in range(num):
    dec_tokens = np.asarray(example["decoder_inputs"][i])
    dec_len = int((example["weights"][i] > 0).nonzero()[0].max()) + 1
    dec_names = tasks.token_names(exp.task, dec_tokens[:dec_len])
    groups = []
    if "inputs" in example:
      enc_tokens = np.asarray(example["inputs"][i])
      enc_names = tasks.token_names(exp.task, enc_tokens[enc_tokens != tasks.PAD])
      groups.append(("encoder", "self_attention", enc_names, enc_names))
      groups.append(("decoder", "cross_attention", dec_names, enc_names))
    groups.append(("decoder", "self_attention", dec_names, dec_names))
    for stack, kind, q_names, k_names in groups:
      layers = sorted(sown[stack], key=lambda name: int(name.split("_")[1]))
      weights = [np.asarray(sown[stack][layer][kind]["attention_weights"][0][i])
                 [:, :len(q_names), :len(k_names)] for layer in layers]
      path = os.path.join(workdir, f"attention_{i}_{stack}_{kind}.png")
      _panel_grid(weights, q_names, k_names,
                  f"{exp.task.name}: {stack} {kind.replace('_', '-')}, example {i}", path)
      paths.append(path)
  return paths
