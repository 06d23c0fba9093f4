# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Attention, explained with attnjax
#
# From one query looking at a handful of keys to the attention maps of a small Transformer
# trained here on the copy task. Each step runs attnjax's functions and checks them against
# a few lines of NumPy.
#
# Shapes follow `jax.nn.dot_product_attention`: queries `[..., T, N, H]` (T queries, N heads,
# H features per head), keys and values `[..., S, K, H]`, weights and masks `[..., N, T, S]`.
# A mask is bool and True means *attend*.
#
# Figures are written to the directory named by the environment variable
# `ATTNJAX_TUTORIAL_FIGURES` (a new temporary directory if it is unset).

# %%
import os
import pathlib
import shutil
import sys
import tempfile

import jax
import matplotlib
import numpy as np

if "ipykernel" not in sys.modules:
  matplotlib.use("Agg")  # Run as a script: figures go to files only.
import matplotlib.pyplot as plt  # noqa: E402

import attnjax  # noqa: E402

FIGURES = pathlib.Path(os.environ.get("ATTNJAX_TUTORIAL_FIGURES") or tempfile.mkdtemp())
FIGURES.mkdir(parents=True, exist_ok=True)
np.set_printoptions(precision=3, suppress=True)
rng = np.random.default_rng(0)


def save(fig, name: str) -> None:
  """Writes the figure to FIGURES/name (and shows it in Jupyter)."""
  fig.savefig(FIGURES / name, dpi=100, bbox_inches="tight")
  print(f"figure: {FIGURES / name}")
  if "ipykernel" in sys.modules:
    plt.show()
  plt.close(fig)


def softmax(x, axis=-1):
  """The softmax written out in NumPy, to check attnjax against."""
  e = np.exp(x - x.max(axis=axis, keepdims=True))
  return e / e.sum(axis=axis, keepdims=True)


# %% [markdown]
# ## 1. One query, a handful of keys: similarity is a dot product
#
# A query is a vector of H numbers, and so is each key. Their similarity is the dot product
# `q.k`: large when they point the same way, negative when they point apart. Here key 2 is
# built to resemble the query.

# %%
H, S = 8, 5
keys = rng.normal(size=(S, H)).astype(np.float32)
query = keys[2] + 0.3 * rng.normal(size=H).astype(np.float32)
scores = keys @ query  # [S]: one similarity per key
print("q.k per key:", scores)
print("most similar key:", scores.argmax())
assert scores.argmax() == 2

# %% [markdown]
# ## 2. Scaling: why divide by sqrt(H)
#
# When the entries of q and k have mean 0 and variance 1, `q.k` is a sum of H products of
# variance 1, so its variance is H: the wider the head, the larger the scores. Large scores
# make the softmax below nearly one-hot (one key takes all the weight, and the gradients
# through the others vanish). Dividing by `sqrt(H)` brings the variance back to 1 at every
# width; it is `attnjax.dot_product_attention`'s default `scale`.

# %%
print(f"{'H':>5} {'var(q.k)':>10} {'var(q.k / sqrt(H))':>20}")
for width in (4, 16, 64, 256):
  q, k = rng.normal(size=(2, 20_000, width))
  dots = (q * k).sum(-1)
  var, var_scaled = dots.var(), (dots / np.sqrt(width)).var()
  print(f"{width:>5} {var:>10.2f} {var_scaled:>20.3f}")
  assert abs(var / width - 1) < 0.1 and abs(var_scaled - 1) < 0.1

# One query against 16 keys, 1,000 times, at H = 256.
q, k = rng.normal(size=(1000, 1, 256)), rng.normal(size=(1000, 16, 256))
logits = (q * k).sum(-1)  # [1000, 16]
top_unscaled = softmax(logits).max(-1).mean()
top_scaled = softmax(logits / np.sqrt(256)).max(-1).mean()
print(f"H = 256, 16 keys: the largest weight averages {top_unscaled:.3f} unscaled and "
      f"{top_scaled:.3f} scaled (uniform: {1 / 16:.3f})")
assert top_unscaled > top_scaled

# %% [markdown]
# ## 3. Softmax: the saliency map
#
# The softmax turns the scaled scores into weights that are positive and sum to 1: how much
# the query looks at each key. The output is the weighted average of the values.
# `attnjax.attention_weights` computes the same weights and `attnjax.dot_product_attention`
# the same output, with a head axis: the query is `[T=1, N=1, H]`, the keys `[S, K=1, H]`,
# the weights `[N=1, T=1, S]`.

# %%
values = rng.normal(size=(S, H)).astype(np.float32)
weights = softmax(scores / np.sqrt(H))  # [S]
output = weights @ values  # [H]
print("weights:", weights, "sum:", weights.sum())

w_attnjax = attnjax.attention_weights(query[None, None], keys[:, None])  # [1, 1, S]
out_attnjax = attnjax.dot_product_attention(query[None, None], keys[:, None],
                                            values[:, None])  # [1, 1, H]
np.testing.assert_allclose(w_attnjax[0, 0], weights, rtol=1e-5, atol=1e-6)
np.testing.assert_allclose(out_attnjax[0, 0], output, rtol=1e-5, atol=1e-5)

# %% [markdown]
# With T queries at once the weights form a `[T, S]` map, one row per query. In
# self-attention the queries and the keys come from the same T tokens.

# %%
T = 6
x = rng.normal(size=(T, 1, H)).astype(np.float32)  # T tokens, one head; q = k = v = x here
logits = x[:, 0] @ x[:, 0].T / np.sqrt(H)  # [T, T]
w_map = attnjax.attention_weights(x, x)[0]  # [T, T]
np.testing.assert_allclose(w_map, softmax(logits), rtol=1e-5, atol=1e-6)

fig, (ax_bar, ax_map) = plt.subplots(1, 2, figsize=(9, 3.2))
ax_bar.bar(range(S), weights)
ax_bar.set(title="one query over 5 keys", xlabel="key", ylabel="weight")
ax_map.imshow(w_map, cmap="viridis", vmin=0, vmax=1)
ax_map.set(title="self-attention over 6 tokens", xlabel="key", ylabel="query")
save(fig, "01_saliency.png")

# %% [markdown]
# ## 4. Masks: what a query may not look at
#
# A mask removes keys before the softmax: their logits become a large negative number, so
# their weights are 0 and the others still sum to 1.
#
# * **Causal**: query i sees the keys `j <= i` (a decoder must not read the future):
#   `attnjax.causal_mask(T)`, or `is_causal=True`.
# * **Padding**: sequences of different lengths share one padded array, and the padding must
#   get no weight. `attnjax.lengths_mask(q_lengths, kv_lengths, T, S)` builds the
#   `[B, 1, T, S]` mask (the 1 broadcasts over heads); `attnjax.combine_masks` ANDs masks.
#   A padded query sees no key at all, and its row of weights is all zeros.

# %%
causal = attnjax.causal_mask(T)  # [T, T] bool
np.testing.assert_array_equal(causal, np.tril(np.ones((T, T), bool)))
w_causal = attnjax.attention_weights(x, x, is_causal=True)[0]
np.testing.assert_allclose(w_causal, softmax(np.where(causal, logits, -np.inf)), rtol=1e-5,
                           atol=1e-6)
np.testing.assert_allclose(attnjax.attention_weights(x, x, mask=causal)[0], w_causal)
print("causal weights (row i: query i):\n", np.asarray(w_causal))

lengths = np.array([6, 4])  # two sequences padded to 6
xb = np.stack([x, x])  # [B=2, T, 1, H]
padding = attnjax.lengths_mask(lengths, lengths, T, T)  # [2, 1, T, T]
mask = attnjax.combine_masks(padding, causal)
w_pad = np.asarray(attnjax.attention_weights(xb, xb, mask=mask))  # [2, 1, T, T]
print("row sums for the sequence of length 4:", w_pad[1, 0].sum(-1))
np.testing.assert_allclose(w_pad[1, 0].sum(-1), [1, 1, 1, 1, 0, 0], atol=1e-6)
np.testing.assert_array_equal(w_pad[1, 0][:, 4:], 0)  # padded keys get no weight
np.testing.assert_allclose(w_pad[0, 0], w_causal, rtol=1e-6)  # the full-length one: unchanged

fig, axes = plt.subplots(1, 3, figsize=(10, 3.2))
for ax, m, title in zip(axes, (causal, padding[1, 0], w_pad[1, 0]),
                        ("causal mask", "padding mask (length 4)", "weights under both")):
  ax.imshow(m, cmap="viridis", vmin=0, vmax=1)
  ax.set(title=title, xlabel="key", ylabel="query")
save(fig, "02_masks.png")

# %% [markdown]
# ## 5. Queries, keys and values are learned projections; heads run side by side
#
# In a Transformer the tokens `x [T, D]` are not compared directly. Each head n has its own
# learned projections `W_q[n], W_k[n], W_v[n]` (D features to H), so each head can look for
# something else; the N heads' outputs are concatenated (`N * H` features) and projected back
# to D by `W_o`. `attnjax.init_multi_head_attention` creates these parameters (with Flax's
# names and shapes) and `attnjax.multi_head_attention` applies them. By hand:

# %%
D, N, Hh = 32, 4, 8
tokens = rng.normal(size=(T, D)).astype(np.float32)
params = attnjax.init_multi_head_attention(jax.random.key(0), in_features=D, num_heads=N,
                                           head_dim=Hh)
params = jax.tree.map(np.asarray, params)
print({name: {k: v.shape for k, v in p.items()} for name, p in params.items()})


def project(p, x):
  """x [L, D] -> [L, N, H] by a kernel [D, N, H] and a bias [N, H]."""
  return np.einsum("ld,dnh->lnh", x, p["kernel"]) + p["bias"]


q, k, v = (project(params[name], tokens) for name in ("query", "key", "value"))
logits = np.einsum("tnh,snh->nts", q, k) / np.sqrt(Hh)  # [N, T, T]
w_by_hand = softmax(np.where(causal, logits, -np.inf))
heads = np.einsum("nts,snh->tnh", w_by_hand, v)  # [T, N, H]
concat = heads.reshape(T, N * Hh)  # the heads side by side
by_hand = concat @ params["out"]["kernel"].reshape(N * Hh, D) + params["out"]["bias"]

out, w_heads = attnjax.multi_head_attention(params, tokens, is_causal=True,
                                            return_weights=True)
np.testing.assert_allclose(w_heads, w_by_hand, rtol=1e-4, atol=1e-6)
np.testing.assert_allclose(out, by_hand, rtol=1e-4, atol=1e-5)
print("output", out.shape, "weights", w_heads.shape, "(one [T, T] map per head)")

fig, axes = plt.subplots(1, N, figsize=(2.6 * N, 2.8))
for n, ax in enumerate(axes):
  ax.imshow(w_heads[n], cmap="viridis", vmin=0, vmax=1)
  ax.set(title=f"head {n} (untrained)", xlabel="key", ylabel="query")
save(fig, "03_heads.png")

# %% [markdown]
# ## 6. Positions
#
# Attention by itself ignores order: permute the tokens and, without a causal mask, the
# outputs are permuted the same way, so "the token two places back" means nothing to it.
# Position encodings put the order back in.

# %%
perm = np.array([3, 0, 5, 1, 4, 2])
y = attnjax.multi_head_attention(params, tokens)
y_perm = attnjax.multi_head_attention(params, tokens[perm])
np.testing.assert_allclose(y_perm, np.asarray(y)[perm], rtol=1e-5, atol=1e-5)
print("permuting the inputs permutes the outputs: attention alone is blind to order")

# %% [markdown]
# **Sinusoidal** encodings (Vaswani et al. 2017) are *absolute*: position p gets a fixed
# vector of sines and cosines of p at geometrically spaced frequencies,
# `attnjax.sinusoidal_position_encoding(L, D)`, added to the token embeddings. Every position
# gets a vector of its own. (The dot product of two encodings depends only on their offset,
# but once they are added to the tokens and projected, the scores depend on both positions.)
#
# **Rotary** embeddings (RoPE, Su et al. 2021), `attnjax.apply_rotary(x, positions)`, instead
# rotate each pair of query and key features by an angle proportional to the position. A
# rotation by m against a rotation by n leaves a rotation by `m - n`, so the score of a query
# at m and a key at n depends only on the *relative offset* `m - n`: below, with the same
# query and key vectors placed at every position, each diagonal of the rotary score matrix is
# constant.

# %%
L = 32
pe = np.asarray(attnjax.sinusoidal_position_encoding(L, D))  # [L, D]
distances = np.linalg.norm(pe[:, None] - pe[None, :], axis=-1)
print(f"the closest two positions are {distances[~np.eye(L, dtype=bool)].min():.3f} apart")
gram = pe @ pe.T
for offset in range(L):
  np.testing.assert_allclose(np.diagonal(gram, -offset), gram[offset, 0], rtol=1e-4,
                             atol=1e-4)


def diagonal_spread(s):
  """The widest range of the scores along a diagonal (0 iff they depend on m - n only)."""
  return max(np.ptp(np.diagonal(s, d)) for d in range(-len(s) + 1, len(s)))


# Rotary: the same query vector at every position m, the same key vector at every n.
qv, kv = rng.normal(size=(2, 1, 1, Hh)).astype(np.float32)
positions = np.arange(L)
q_rot = np.asarray(attnjax.apply_rotary(np.tile(qv, (L, 1, 1)), positions))  # [L, 1, H]
k_rot = np.asarray(attnjax.apply_rotary(np.tile(kv, (L, 1, 1)), positions))
rope_scores = q_rot[:, 0] @ k_rot[:, 0].T  # [m, n]

# Sinusoidal: the same token at every position, plus its encoding, then projected.
x_pos = tokens[:1] + pe
sin_scores = project(params["query"], x_pos)[:, 0] @ project(params["key"], x_pos)[:, 0].T
spread_rope, spread_sin = diagonal_spread(rope_scores), diagonal_spread(sin_scores)
print(f"widest spread of the scores along a diagonal: rotary {spread_rope:.1e}, sinusoidal "
      f"{spread_sin:.2f} (range of all its scores: {np.ptp(sin_scores):.2f})")
assert spread_rope < 1e-4 < spread_sin

fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
axes[0].imshow(pe.T, cmap="RdBu", aspect="auto")
axes[0].set(title="sinusoidal encodings", xlabel="position", ylabel="feature")
axes[1].imshow(sin_scores, cmap="viridis")
axes[1].set(title="scores, sinusoidal (added, projected)", xlabel="key position n",
            ylabel="query position m")
axes[2].imshow(rope_scores, cmap="viridis")
axes[2].set(title="scores, rotary: a function of m - n", xlabel="key position n",
            ylabel="query position m")
save(fig, "04_positions.png")

# %% [markdown]
# ## 7. A trained model: copying
#
# `attnjax.toy` trains small Transformers built from `attnjax.linen.MultiHeadAttention`.
# `configs/copy.py` trains a one-layer encoder-decoder with sinusoidal positions to copy
# 1-16 symbols; here its `smoke` variant (width 32, 2 heads) trains for 400 steps into a
# temporary directory. `train_and_evaluate` then decodes held-out inputs greedily, at the
# training lengths and at twice the longest one (the `2x` bucket), and draws the learning
# curves and the attention maps (`attnjax.toy.plotting`) of a held-out example.

# %%
from attnjax.toy import models, train  # noqa: E402

sys.path.insert(0, str(pathlib.Path(attnjax.__file__).resolve().parents[1]))  # for configs/
from configs import copy as copy_config  # noqa: E402

config = copy_config.get_config("smoke")
config.train.num_steps = 400
config.train.batch_size = 64
config.optimizer.warmup_steps = 50
config.train.log_every = 100
config.train.eval_every = 0
config.train.checkpoint_every = 400
config.eval.num_sequences = 256
config.eval.check_overlap = False
workdir = tempfile.mkdtemp()
results = train.train_and_evaluate(config, workdir)
buckets = results["buckets"]
print(f"greedy exact match: {buckets['train']['exact_match']:.3f} at lengths "
      f"{config.task.min_length}-{config.task.max_length}, {buckets['2x']['exact_match']:.3f}"
      f" at length {2 * config.task.max_length}")
for name in ("curves.png", "attention_0.png"):
  shutil.copy(os.path.join(workdir, name), FIGURES / f"05_copy_{name}")
  print(f"figure: {FIGURES / f'05_copy_{name}'}")

# %% [markdown]
# In `05_copy_attention_0.png` (rows are queries, columns keys, one panel per head), look at
# the decoder's cross-attention, where each output position reads the input. To emit target
# token t, the decoder, fed `<s>` and the targets before t, must find input symbol t: a head
# that copies puts its weight on the diagonal.
#
# ## 8. Why copying fails at twice the length
#
# The model was trained on inputs of at most 16 symbols, so in training its sinusoidal
# positions ran from 0 to 15 in the encoder and 0 to 16 in the decoder. At length 32 the
# positions past those are vectors it never saw, and nothing in training made its projections
# map them to matching queries and keys. Below, the trained parameters (from the run's
# checkpoint) run over held-out inputs of length 32 under teacher forcing, with every
# attention layer's weights sown (`sow_weights=True`).

# %%
import orbax.checkpoint as ocp  # noqa: E402

exp = train.Experiment(config)
with ocp.CheckpointManager(os.path.join(workdir, "checkpoints")) as manager:
  state = manager.restore(manager.latest_step(),
                          args=ocp.args.StandardRestore(exp.abstract_state()))


@jax.jit
def forward(params, example):
  """Logits and the sown attention weights of the trained model."""
  return models.apply_model(exp.model, {"params": params}, example, sow_weights=True,
                            mutable=["intermediates"])


n_max = config.task.max_length
long = exp.format(exp.eval_batch(exp.task.with_lengths(2 * n_max, 2 * n_max), 256, 3000))
logits, sown = forward(state.params, long)
cross = sown["intermediates"]["decoder"]["layer_0"]["cross_attention"]["attention_weights"][0]
cross = np.asarray(cross)[:, :, :2 * n_max, :]  # [B, N, t, s]; target position t reads input t
labels, valid = np.asarray(long["labels"]), np.asarray(long["weights"]) > 0
correct = (np.asarray(logits).argmax(-1) == labels)[:, :2 * n_max]
on_diagonal = cross.argmax(-1) == np.arange(2 * n_max)  # [B, N, t]
best_head = int(on_diagonal[:, :, :n_max].mean((0, 2)).argmax())
seen, unseen = slice(0, n_max), slice(n_max, 2 * n_max)
for part in (seen, unseen):
  copies = on_diagonal[:, best_head, part].mean()
  print(f"target positions {part.start + 1}-{part.stop}: token accuracy "
        f"{correct[:, part].mean():.3f}; head {best_head} puts its largest weight on the input "
        f"being copied at {copies:.3f} of them")
assert correct[:, seen].mean() > correct[:, unseen].mean()
assert on_diagonal[:, best_head, seen].mean() > on_diagonal[:, best_head, unseen].mean()

fig, (ax_map, ax_acc) = plt.subplots(1, 2, figsize=(11, 4.2))
ax_map.imshow(cross[0, best_head], cmap="viridis", vmin=0, vmax=1)
ax_map.axvline(n_max - 0.5, color="white", linestyle="--")
ax_map.axhline(n_max - 0.5, color="white", linestyle="--")
ax_map.set(title=f"cross-attention, head {best_head}, an input of length {2 * n_max}",
           xlabel="input position (key)", ylabel="target position (query)")
ax_acc.plot(np.arange(1, 2 * n_max + 1), correct.mean(0), marker="o", markersize=3,
            label="token accuracy")
ax_acc.plot(np.arange(1, 2 * n_max + 1), on_diagonal[:, best_head].mean(0), marker="s",
            markersize=3, label=f"head {best_head} looks at the right input")
ax_acc.axvline(n_max + 0.5, color="gray", linestyle="--", label="longest training input")
ax_acc.set(xlabel="target position", ylim=(0, 1.02), title="copying at twice the length")
ax_acc.legend(fontsize=8)
save(fig, "06_copy_at_2x.png")

# %% [markdown]
# Rotary positions make every score a function of the offset `m - n` alone (section 6). To
# train the same model with them, set `config.model.position = "rotary"` in section 7 (or
# pass `--config.model.position=rotary` to `python -m experiments.copy_task`). The API
# reference documents every function used here.
