"""Transformers for the toy tasks, built from :class:`attnjax.linen.MultiHeadAttention`.

Shapes: tokens ``[B, L]`` int32 (B batch, L length; S encoder length, T decoder length),
activations ``[B, L, D]``, logits ``[B, T, V]`` (V vocabulary). Attention masks are bool,
True = attend, broadcastable to ``[B, N, T, S]``.

Two architectures share one layer stack:

* :class:`EncoderDecoder`: Vaswani et al. 2017, an encoder (self-attention) and a decoder
  (causal self-attention, then cross-attention to the encoder's outputs).
* :class:`DecoderOnly`: one causal stack over ``BOS x SEP y EOS``.

With ``decode=True`` the decoder keeps a key/value cache (collection ``'cache'``), its own
position counter and the last embeddings its short convolution reads, so it can be stepped
one token at a time (see :mod:`attnjax.toy.decoding`). With ``sow_weights=True`` every
attention layer sows its probabilities ``[B, N, T, S]`` into ``'intermediates'``.

References:
  Vaswani et al. 2017, "Attention Is All You Need".
  Xiong et al. 2020, "On Layer Normalization in the Transformer Architecture" (pre-LN).
  Su et al. 2021, "RoFormer" (rotary position embedding).
  Arora et al. 2023, "Zoology: Measuring and Improving Recall in Efficient Language Models"
  (a short convolution beside attention for associative recall).
  Kazemnejad et al. 2023, "The Impact of Positional Encoding on Length Generalization in
  Transformers" (NoPE: a causal decoder without position encodings).
  Press et al. 2022, "Train Short, Test Long" (ALiBi).
  Jelassi et al. 2024, "Repeat After Me: Transformers are Better than State Space Models at
  Copying" (hard-ALiBi).
  Raffel et al. 2020, "Exploring the Limits of Transfer Learning with a Unified Text-to-Text
  Transformer" (T5 relative position buckets).
  Li et al. 2024, "Functional Interpolation for Relative Positions Improves Long Context
  Transformers" (FIRE).

Position schemes (``TransformerConfig.position``; each one entry of :data:`POSITION_SCHEMES`):
``sinusoidal`` and ``learned`` add an absolute encoding of each token's position id to its
embedding; ``rotary`` rotates queries and keys by their position ids; ``none`` and ``nope``
use no positions (``nope`` is for causal decoders, where the causal mask alone orders the
tokens); ``alibi``, ``t5`` and ``fire`` add a bias of the distance to the self-attention
logits through a score modifier (:mod:`attnjax.score_mods`), ``t5`` and ``fire`` with
learned parameters per layer; ``hard_alibi`` limits head h of every self-attention layer
to the last ``hard_alibi_windows[h]`` keys (None: no limit, a NoPE head) through a mask
object, and the same windows may be set with ``alibi``, ``t5`` and ``fire`` (the bias then
applies inside them). The bias and window schemes read the attention's own indices, so they keep
blockwise attention's linear memory and work unchanged with the cache. Position ids are
``0, 1, ...`` unless the caller passes its own (``positions``; see
:func:`attnjax.toy.tasks.position_ids` for randomized and coupled ids), which every scheme
but ``none`` and ``nope`` reads (``reads_position_ids``): the bias and window schemes then
take the distance between ids (:class:`attnjax.score_mods.AtPositions`; in decode mode the
ids of the cached tokens stay in the cache) in their two-sided form, since given ids need
not increase along the sequence.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Literal, get_args

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import Array

from attnjax import linen as attn_linen
from attnjax import masks, positional, score_mods
from attnjax.attention import Implementation, dot_product_attention
from attnjax.linen import with_logical_axes
from attnjax.toy.tasks import PAD

Position = Literal["sinusoidal", "learned", "rotary", "none", "nope", "alibi", "hard_alibi",
                   "t5", "fire"]
Norm = Literal["pre", "post"]
Arch = Literal["encoder_decoder", "decoder_only"]
# Logical axes of the residual stream [B, L, D] (parameters and activations carry logical
# axis names: see attnjax.toy.sharding for the rules that map them to mesh axes).
ACTIVATION_AXES = ("batch", "length", "embed")
POSITIONS: tuple[Position, ...] = get_args(Position)
NORMS: tuple[Norm, ...] = get_args(Norm)
KERNEL_INITS = {
    "lecun_normal": nn.initializers.lecun_normal(),
    "xavier_uniform": nn.initializers.xavier_uniform(),
}


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
  """Hyperparameters of both architectures.

  Attributes:
    vocab_size: V.
    num_layers: layers per stack (the encoder and the decoder have this many each).
    d_model: D, the residual width.
    num_heads: N.
    num_kv_heads: K key/value heads (grouped-query attention); None means N.
    mlp_dim: hidden width of the position-wise MLP.
    dropout_rate: dropout on the embeddings and on each sublayer's output.
    attention_dropout_rate: dropout on the attention probabilities.
    norm: ``"pre"`` (LayerNorm inside the residual branch, plus a final one per stack) or
      ``"post"`` (LayerNorm after each residual sum, as in Vaswani et al.).
    position: a key of :data:`POSITION_SCHEMES` (see the module docstring).
    max_position: the number of learned position embeddings (``"learned"`` only; position
      ids past it are clipped to the last).
    hard_alibi_windows: per head, the number of most recent keys it sees (itself included),
      or None for a head without limit; length ``num_heads``. Required by ``"hard_alibi"``
      (whose heads see no other position signal); optional with ``"alibi"``, ``"t5"`` and
      ``"fire"``, whose biases then apply inside the windows.
    t5_max_distance: ``"t5"`` only: the distance from which T5's buckets stop growing
      (Raffel et al. use 128); every longer distance shares the last bucket of its side.
      Above 8 (the exact buckets of a side), and above 16 in a causal stack over
      sequential ids.
    tie_embeddings: use the decoder's input embedding as its output projection.
    short_conv: kernel size k of a causal depthwise convolution over the token embeddings:
      each position's embedding gets ``w_j * e[t - j]`` added for ``j = 1 .. k - 1`` (learned
      ``w_j [D]``; zeros before the first token), so one position sees its predecessors
      without an attention head learning to look there (Zoology's short convolution). None:
      no convolution.
    kernel_init: ``"lecun_normal"`` or ``"xavier_uniform"`` for every dense kernel.
    implementation: attention implementation passed to attnjax (None = fastest correct).
    decode: build the cached one-token-at-a-time decoder.
    self_attention_fn: replaces :func:`attnjax.dot_product_attention` in self-attention
      outside decoding (the ``attention_fn`` of :class:`attnjax.linen.MultiHeadAttention`),
      e.g. :func:`attnjax.parallel.ring_attention_fn` over a mesh's sequence axis; None:
      the default.
  """

  vocab_size: int
  num_layers: int = 2
  d_model: int = 64
  num_heads: int = 4
  num_kv_heads: int | None = None
  mlp_dim: int = 256
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  norm: Norm = "pre"
  position: Position = "sinusoidal"
  max_position: int | None = None
  hard_alibi_windows: tuple[int | None, ...] | None = None
  t5_max_distance: int = 128
  tie_embeddings: bool = True
  short_conv: int | None = None
  kernel_init: str = "lecun_normal"
  implementation: Implementation | None = None
  decode: bool = False
  self_attention_fn: Callable | None = None

  def __post_init__(self):
    if self.norm not in NORMS:
      raise ValueError(f"norm must be one of {NORMS}, got {self.norm!r}")
    if self.position not in POSITIONS:
      raise ValueError(f"position must be one of {POSITIONS}, got {self.position!r}")
    if self.position == "learned" and (self.max_position is None or self.max_position < 1):
      raise ValueError(f"position='learned' needs max_position >= 1, got {self.max_position!r}")
    windows = self.hard_alibi_windows
    if self.position == "hard_alibi" and (
        windows is None or len(windows) != self.num_heads
        or any(w is not None and (isinstance(w, bool) or not isinstance(w, int) or w < 1)
               for w in windows)):
      raise ValueError(f"position='hard_alibi' needs hard_alibi_windows: one window >= 1 or "
                       f"None per head ({self.num_heads}), got {windows!r}")
    if windows is not None and self.position not in WINDOWED:
      raise ValueError(f"hard_alibi_windows apply to positions {WINDOWED} only, got "
                       f"position={self.position!r}")
    if isinstance(self.t5_max_distance, bool) or not isinstance(self.t5_max_distance, int) \
        or self.t5_max_distance <= T5_NUM_BUCKETS // 4:
      raise ValueError(f"t5_max_distance must be an int above the {T5_NUM_BUCKETS // 4} exact "
                       f"buckets of a two-sided direction (a causal stack needs above "
                       f"{T5_NUM_BUCKETS // 2}), got {self.t5_max_distance!r}")
    if self.kernel_init not in KERNEL_INITS:
      raise ValueError(f"kernel_init must be one of {tuple(KERNEL_INITS)}, got "
                       f"{self.kernel_init!r}")
    if self.short_conv is not None and self.short_conv < 2:
      raise ValueError(f"short_conv must be None or a kernel size >= 2, got {self.short_conv}")
    if self.d_model % self.num_heads:
      raise ValueError(f"d_model={self.d_model} is not a multiple of num_heads={self.num_heads}")
    if self.num_kv_heads is not None and (self.num_kv_heads < 1
                                          or self.num_heads % self.num_kv_heads):
      raise ValueError(f"num_kv_heads must be None or a positive divisor of num_heads="
                       f"{self.num_heads}, got {self.num_kv_heads}")


def _dense(features: int, kernel_init, axes: tuple[str, str], name: str | None = None):
  """``nn.Dense`` whose kernel and bias carry the logical ``axes`` of its kernel."""
  return nn.Dense(features, kernel_init=with_logical_axes(kernel_init, axes),
                  bias_init=with_logical_axes(nn.initializers.zeros, axes[1:]), name=name)


class PositionIds(nn.Module):
  """Position ids of a chunk of tokens, and the table of ids the attention's indices map to.

  Returns ``(positions, table)``: ``positions [B|1, L]`` are the given ids, or ``0..L-1``
  (in decode mode ``t..t+L-1`` for the t tokens seen before, counted in ``'cache'`` under
  ``'position'``). ``table`` is None without given ids; with them, the ids at every index
  the self-attention sees: the given ids, or in decode mode the ids of every cache slot
  (``'cache'`` under ``'ids'``, as long as the ids given at ``init``).
  """

  config: TransformerConfig

  @nn.compact
  def __call__(self, tokens: Array, positions: Array | None = None
               ) -> tuple[Array, Array | None]:
    length = tokens.shape[-1]
    offset: int | Array = 0
    if self.config.decode:
      counter = self.variable("cache", "position", lambda: jnp.zeros((), jnp.int32))
      if not self.is_initializing():
        offset = counter.value
        counter.value = counter.value + length
    if positions is None:
      return jnp.arange(length)[None, :] + offset, None
    table = positions
    if self.config.decode:
      ids = self.variable("cache", "ids", lambda: jnp.zeros(positions.shape, jnp.int32))
      if not self.is_initializing():
        ids.value = jax.lax.dynamic_update_slice_in_dim(
            ids.value, positions.astype(jnp.int32), offset, axis=-1)
      table = ids.value
    return positions, table


class Embed(nn.Module):
  """Token embedding scaled by sqrt(D), then the short convolution and the absolute position
  encoding (sinusoidal or learned) when configured.

  In decode mode the last ``short_conv - 1`` token embeddings live in ``'cache'`` under
  ``'previous_embeddings'``.
  """

  config: TransformerConfig

  @nn.compact
  def __call__(self, tokens: Array, *, positions: Array | None = None,
               deterministic: bool) -> Array:
    """Embeddings ``[B, L, D]`` of ``tokens [B, L]`` at position ids ``positions [B|1, L]``
    (default ``0..L-1``)."""
    cfg = self.config
    x = self.embedding(tokens) * jnp.sqrt(cfg.d_model).astype(jnp.float32)
    if cfg.short_conv is not None:
      x = self._short_conv(x)
    if positions is None:
      positions = jnp.arange(tokens.shape[-1])[None, :]
    embedding = POSITION_SCHEMES[cfg.position].embedding
    if embedding == "sinusoidal":
      pe = positional.sinusoidal_position_encoding(positions, cfg.d_model)
      x = x + jnp.broadcast_to(pe, x.shape)
    elif embedding == "learned":
      assert cfg.max_position is not None  # Checked by TransformerConfig.
      table = self.param("position_embedding", with_logical_axes(
          nn.initializers.normal(stddev=cfg.d_model**-0.5), (None, "embed")),
                         (cfg.max_position, cfg.d_model))
      x = x + jnp.broadcast_to(table[jnp.clip(positions, 0, cfg.max_position - 1)], x.shape)
    x = nn.Dropout(cfg.dropout_rate)(x, deterministic=deterministic)
    return nn.with_logical_constraint(x, ACTIVATION_AXES)

  def setup(self):
    cfg = self.config
    self.embedding = nn.Embed(
        cfg.vocab_size, cfg.d_model, embedding_init=with_logical_axes(
            nn.initializers.normal(stddev=cfg.d_model**-0.5), ("vocab", "embed")))
    if cfg.short_conv is not None:
      # Row j - 1 weighs the embedding j positions back.
      self.conv_weights = self.param(
          "short_conv", with_logical_axes(nn.initializers.normal(stddev=cfg.short_conv**-0.5),
                                          (None, "embed")),
          (cfg.short_conv - 1, cfg.d_model))

  def _short_conv(self, x_BLD: Array) -> Array:
    """``x + sum_j w_j * x[t - j]`` over ``[B, L, D]`` (in decode mode, continuing the
    cached previous embeddings)."""
    k, L = self.config.short_conv, x_BLD.shape[-2]
    assert k is not None  # Called only with a convolution.
    prev_BKD = jnp.zeros(x_BLD.shape[:-2] + (k - 1, x_BLD.shape[-1]), x_BLD.dtype)
    if self.config.decode:
      cached = self.variable("cache", "previous_embeddings", lambda: prev_BKD)
      if not self.is_initializing():
        prev_BKD = cached.value
        cached.value = jnp.concatenate([prev_BKD, x_BLD], axis=-2)[..., L:, :]
    padded = jnp.concatenate([prev_BKD, x_BLD], axis=-2)  # [B, k - 1 + L, D]
    per_feature = (1,) * (x_BLD.ndim - 1) + (x_BLD.shape[-1],)  # Explicit broadcasting.
    out_BLD = x_BLD
    for j in range(1, k):
      w_j = self.conv_weights[j - 1].reshape(per_feature)
      out_BLD = out_BLD + w_j * padded[..., k - 1 - j:k - 1 - j + L, :]
    return out_BLD

  def attend(self, x: Array) -> Array:
    """Logits ``[..., V]`` from the transposed embedding."""
    return self.embedding.attend(x)


class LayerNorm(nn.Module):
  """LayerNorm over the last axis (Ba et al. 2016), in float32; a lean equivalent of
  ``flax.linen.LayerNorm`` that compiles to fewer XLA ops."""

  epsilon: float = 1e-6

  @nn.compact
  def __call__(self, x: Array) -> Array:
    d = x.shape[-1]
    scale = self.param("scale", with_logical_axes(nn.initializers.ones, ("embed",)), (d,))
    bias = self.param("bias", with_logical_axes(nn.initializers.zeros, ("embed",)), (d,))
    h = x.astype(jnp.float32)
    h = h - h.mean(axis=-1, keepdims=True)
    h = h * jax.lax.rsqrt((h * h).mean(axis=-1, keepdims=True) + self.epsilon)
    per_feature = (1,) * (h.ndim - 1) + (d,)  # Explicit broadcasting over the leading dims.
    return (h * scale.reshape(per_feature) + bias.reshape(per_feature)).astype(x.dtype)


class Mlp(nn.Module):
  """Position-wise feed-forward: Dense, ReLU, dropout, Dense."""

  config: TransformerConfig

  @nn.compact
  def __call__(self, x: Array, *, deterministic: bool) -> Array:
    cfg = self.config
    init = KERNEL_INITS[cfg.kernel_init]
    h = nn.relu(_dense(cfg.mlp_dim, init, ("embed", "mlp"), "wi")(x))
    h = nn.with_logical_constraint(h, ("batch", "length", "mlp"))
    h = nn.Dropout(cfg.dropout_rate)(h, deterministic=deterministic)
    return _dense(cfg.d_model, init, ("mlp", "embed"), "wo")(h)


class Block(nn.Module):
  """One layer: self-attention, optional cross-attention, MLP, each a residual sublayer."""

  config: TransformerConfig
  causal: bool
  cross: bool

  @nn.compact
  def __call__(self, x: Array, *, mask: Array | None, positions: Array | None = None,
               position_table: Array | None = None, encoded: Array | None = None,
               cross_mask: Array | None = None,
               deterministic: bool, sow_weights: bool = False) -> Array:
    cfg = self.config

    def sublayer(name, fn, x):
      drop = nn.Dropout(cfg.dropout_rate)
      if cfg.norm == "pre":
        return x + drop(fn(LayerNorm(name=f"{name}_norm")(x)), deterministic=deterministic)
      return LayerNorm(name=f"{name}_norm")(x + drop(fn(x), deterministic=deterministic))

    def attention(name, decode, rotary, attention_fn=None):
      return attn_linen.MultiHeadAttention(
          num_heads=cfg.num_heads,
          num_kv_heads=cfg.num_kv_heads,
          dropout_rate=cfg.attention_dropout_rate,
          kernel_init=KERNEL_INITS[cfg.kernel_init],
          implementation=cfg.implementation,
          rotary=rotary,
          decode=decode,
          attention_fn=attention_fn or dot_product_attention,
          name=name,
      )

    scheme = POSITION_SCHEMES[cfg.position]
    decode = cfg.decode and self.causal
    self_attn = attention("self_attention", decode, scheme.rotary,
                          None if decode else cfg.self_attention_fn)
    score_mod = None
    self_mask: Array | masks.Mask | None = mask
    if scheme.attention is not None:
      # Given ids (position_table) need not increase along the sequence: two-sided forms.
      score_mod, visible = scheme.attention(self, self.causal and position_table is None)
      if position_table is not None:
        score_mod, visible = _at_positions(score_mod, visible, position_table)
      if visible is not None:
        scheme_mask = masks.MaskFn(visible)
        self_mask = scheme_mask if mask is None else scheme_mask & masks.as_mask(mask)
    rotary_positions = {"query_positions": positions, "key_positions": positions} if (
        scheme.rotary and positions is not None) else {}
    x = sublayer("self_attention", lambda h: self_attn(
        h, mask=self_mask, is_causal=self.causal and not decode, deterministic=deterministic,
        sow_weights=sow_weights, score_mod=score_mod, **rotary_positions), x)
    if self.cross:
      cross_attn = attention("cross_attention", False, False)
      x = sublayer("cross_attention", lambda h: cross_attn(
          h, encoded, mask=cross_mask, deterministic=deterministic,
          sow_weights=sow_weights), x)
    x = sublayer("mlp", lambda h: Mlp(cfg, name="mlp")(h, deterministic=deterministic), x)
    return nn.with_logical_constraint(x, ACTIVATION_AXES)


def _alibi(block: Block, causal: bool):
  """ALiBi's fixed slopes (symmetric in a bidirectional stack)."""
  return score_mods.ALiBi(score_mods.alibi_slopes(block.config.num_heads),
                          symmetric=not causal), _windows(block, causal)


T5_NUM_BUCKETS = 32


def _t5(block: Block, causal: bool):
  """T5's relative bias, a learned table ``[buckets, N]`` per layer (zeros at init)."""
  table = block.param("t5_relative_bias", nn.initializers.zeros,
                      (T5_NUM_BUCKETS, block.config.num_heads))
  return score_mods.T5RelativeBias(table, T5_NUM_BUCKETS, block.config.t5_max_distance,
                                   bidirectional=not causal), _windows(block, causal)


FIRE_FIELDS = ("kernel_in", "bias_in", "kernel_out", "bias_out", "c", "threshold_multiplier")


def _fire(block: Block, causal: bool):
  """FIRE with the paper's initialization; its MLP, c and L multiplier are parameters."""
  N = block.config.num_heads
  init = score_mods.init_fire(jax.random.key(0), N)  # For the static fields.
  fields = {name: block.param(f"fire_{name}",
                              lambda rng, name=name: getattr(score_mods.init_fire(rng, N), name))
            for name in FIRE_FIELDS}
  return score_mods.FIRE(**fields, init_threshold=init.init_threshold,
                         eps=init.eps), _windows(block, causal)


def _hard_alibi(block: Block, causal: bool):
  """Per-head windows alone (no bias): Jelassi et al.'s hard-ALiBi."""
  return None, _windows(block, causal)


def _windows(block: Block, causal: bool):
  """The rule of the per-head windows: head h sees keys at distance below ``windows[h]`` (on
  both sides in a bidirectional stack); None means every key. None without windows."""
  windows = block.config.hard_alibi_windows
  if windows is None:
    return None
  limit = np.array([np.iinfo(np.int32).max if w is None else w for w in windows], np.int32)

  def visible(batch, head, q_idx, kv_idx):
    distance = q_idx - kv_idx if causal else jnp.abs(q_idx - kv_idx)
    return distance < jnp.asarray(limit)[head]
  return visible


def _at_positions(score_mod, visible, table: Array):
  """The scheme's score modifier and mask rule read at the position ids ``table [B|1, L]``
  of the attention's indices instead of at the indices."""
  if score_mod is not None:
    score_mod = score_mods.AtPositions(score_mod, table, table)
  if visible is not None:
    rule = visible

    def visible(batch, head, q_idx, kv_idx):
      return rule(batch, head, score_mods.lookup_positions(table, batch, q_idx),
                  score_mods.lookup_positions(table, batch, kv_idx))
  return score_mod, visible


@dataclasses.dataclass(frozen=True)
class PositionScheme:
  """How one position scheme enters the model (one entry of :data:`POSITION_SCHEMES`).

  Attributes:
    embedding: ``"sinusoidal"`` or ``"learned"`` absolute encodings added to the token
      embeddings, or None.
    rotary: rotate queries and keys by their position ids.
    attention: ``fn(block, causal) -> (score_mod, visible)`` for every self-attention layer,
      called inside the layer (so it may create parameters), or None; ``visible(batch, head,
      q_idx, kv_idx) -> bool`` is a mask rule (see :class:`attnjax.masks.MaskFn`) or None.
      With given position ids, the layer reads both at the ids (``causal=False``: the ids
      need not increase along the sequence).
    reads_position_ids: whether given position ids change anything (randomized and coupled
      ids apply only to such schemes).
    causal_only: needs a causal decoder-only model (without positions, a bidirectional
      encoder cannot tell orders apart).
  """

  embedding: Literal["sinusoidal", "learned"] | None = None
  rotary: bool = False
  attention: Callable[[Block, bool], tuple[Callable | None, Callable | None]] | None = None
  reads_position_ids: bool = False
  causal_only: bool = False


POSITION_SCHEMES: dict[str, PositionScheme] = {
    "sinusoidal": PositionScheme(embedding="sinusoidal", reads_position_ids=True),
    "learned": PositionScheme(embedding="learned", reads_position_ids=True),
    "rotary": PositionScheme(rotary=True, reads_position_ids=True),
    "none": PositionScheme(),
    "nope": PositionScheme(causal_only=True),
    "alibi": PositionScheme(attention=_alibi, reads_position_ids=True),
    "hard_alibi": PositionScheme(attention=_hard_alibi, reads_position_ids=True),
    "t5": PositionScheme(attention=_t5, reads_position_ids=True),
    "fire": PositionScheme(attention=_fire, reads_position_ids=True),
}
"""Every position scheme by name (the values of ``TransformerConfig.position``)."""
WINDOWED = tuple(name for name, s in POSITION_SCHEMES.items() if s.attention is not None)
"""The schemes that take ``hard_alibi_windows`` (those that act inside the attention)."""
assert set(POSITION_SCHEMES) == set(get_args(Position))


class Stack(nn.Module):
  """``num_layers`` blocks, with a final LayerNorm for pre-LN."""

  config: TransformerConfig
  causal: bool
  cross: bool

  @nn.compact
  def __call__(self, x: Array, **kwargs) -> Array:
    for i in range(self.config.num_layers):
      x = Block(self.config, self.causal, self.cross, name=f"layer_{i}")(x, **kwargs)
    if self.config.norm == "pre":
      x = LayerNorm(name="final_norm")(x)
    return x


def _key_padding_mask(tokens: Array) -> Array:
  """bool ``[B, 1, 1, S]``: True where the key is not padding."""
  return (tokens != PAD)[:, None, None, :]


def _output_logits(model: nn.Module, embed: nn.Module, y: Array) -> Array:
  """Logits ``[B, L, V]``: the tied input embedding, or the model's own output layer."""
  logits = embed.attend(y) if model.config.tie_embeddings else model.logits_dense(y)
  return nn.with_logical_constraint(logits, ("batch", "length", "vocab"))


class EncoderDecoder(nn.Module):
  """Encoder-decoder Transformer (Vaswani et al. 2017).

  Call with ``inputs [B, S]`` and ``decoder_inputs [B, T]`` for logits ``[B, T, V]``; or use
  :meth:`encode` once and :meth:`decode` per step.
  """

  config: TransformerConfig

  def setup(self):
    cfg = self.config
    self.encoder_positions = PositionIds(dataclasses.replace(cfg, decode=False))
    self.decoder_positions = PositionIds(cfg)
    self.encoder_embed = Embed(cfg)
    self.decoder_embed = Embed(cfg)
    self.encoder = Stack(dataclasses.replace(cfg, decode=False), causal=False, cross=False)
    self.decoder = Stack(cfg, causal=True, cross=True)
    if not cfg.tie_embeddings:
      self.logits_dense = _dense(cfg.vocab_size, KERNEL_INITS[cfg.kernel_init],
                                 ("embed", "vocab"))

  def encode(self, inputs: Array, *, positions: Array | None = None,
             deterministic: bool = True, sow_weights: bool = False) -> Array:
    """Encoder outputs ``[B, S, D]`` for ``inputs [B, S]`` (position ids ``[B, S]``
    optional)."""
    positions, table = self.encoder_positions(inputs, positions)
    x = self.encoder_embed(inputs, positions=positions, deterministic=deterministic)
    return self.encoder(x, mask=_key_padding_mask(inputs), positions=positions,
                        position_table=table, deterministic=deterministic,
                        sow_weights=sow_weights)

  def decode(self, encoded: Array, inputs: Array, decoder_inputs: Array, *,
             positions: Array | None = None, deterministic: bool = True,
             sow_weights: bool = False) -> Array:
    """Logits ``[B, T, V]`` for ``decoder_inputs [B, T]`` given ``encoded [B, S, D]``.

    ``inputs [B, S]`` (the source tokens) give the cross-attention padding mask;
    ``positions [B, T]`` are the decoder tokens' position ids (optional).
    """
    positions, table = self.decoder_positions(decoder_inputs, positions)
    y = self.decoder_embed(decoder_inputs, positions=positions, deterministic=deterministic)
    y = self.decoder(y, mask=None, positions=positions, position_table=table, encoded=encoded,
                     cross_mask=_key_padding_mask(inputs), deterministic=deterministic,
                     sow_weights=sow_weights)
    return _output_logits(self, self.decoder_embed, y)

  def __call__(self, inputs: Array, decoder_inputs: Array, *,
               input_positions: Array | None = None, decoder_positions: Array | None = None,
               deterministic: bool = True, sow_weights: bool = False) -> Array:
    encoded = self.encode(inputs, positions=input_positions, deterministic=deterministic,
                          sow_weights=sow_weights)
    return self.decode(encoded, inputs, decoder_inputs, positions=decoder_positions,
                       deterministic=deterministic, sow_weights=sow_weights)


class DecoderOnly(nn.Module):
  """Causal Transformer over one sequence: logits ``[B, L, V]`` for ``decoder_inputs [B, L]``
  (position ids ``positions [B, L]`` optional)."""

  config: TransformerConfig

  def setup(self):
    cfg = self.config
    self.positions = PositionIds(cfg)
    self.embed = Embed(cfg)
    self.decoder = Stack(cfg, causal=True, cross=False)
    if not cfg.tie_embeddings:
      self.logits_dense = _dense(cfg.vocab_size, KERNEL_INITS[cfg.kernel_init],
                                 ("embed", "vocab"))

  def __call__(self, decoder_inputs: Array, *, positions: Array | None = None,
               deterministic: bool = True, sow_weights: bool = False) -> Array:
    positions, table = self.positions(decoder_inputs, positions)
    y = self.embed(decoder_inputs, positions=positions, deterministic=deterministic)
    y = self.decoder(y, mask=None, positions=positions, position_table=table,
                     deterministic=deterministic, sow_weights=sow_weights)
    return _output_logits(self, self.embed, y)


ARCHITECTURES: dict[Arch, type[nn.Module]] = {"encoder_decoder": EncoderDecoder,
                                              "decoder_only": DecoderOnly}


def make_model(arch: Arch, config: TransformerConfig) -> nn.Module:
  """The module for ``arch`` (``"encoder_decoder"`` or ``"decoder_only"``)."""
  if arch not in ARCHITECTURES:
    raise ValueError(f"arch must be one of {tuple(ARCHITECTURES)}, got {arch!r}")
  if POSITION_SCHEMES[config.position].causal_only and arch != "decoder_only":
    raise ValueError(f"position={config.position!r} needs arch='decoder_only' (a "
                     f"bidirectional encoder without positions cannot tell orders apart), got "
                     f"arch={arch!r}")
  return ARCHITECTURES[arch](config)


def position_kwargs(model: nn.Module, example: dict[str, Array]) -> dict[str, Any]:
  """The position ids of ``example`` (see :func:`attnjax.toy.tasks.position_ids`) as keyword
  arguments of the model's ``__call__``."""
  names = (("input_positions", "decoder_positions") if isinstance(model, EncoderDecoder)
           else ("positions",))
  return {name: example[name] for name in names if name in example}


def apply_model(model: nn.Module, variables, example: dict[str, Array], **kwargs) -> Any:
  """Logits for an example from :func:`attnjax.toy.tasks.encoder_decoder_example` or
  :func:`attnjax.toy.tasks.decoder_only_example` (with its position ids, if any); with
  ``mutable=...`` among ``kwargs``, the pair ``(logits, mutated variables)`` of
  ``model.apply``."""
  kwargs = {**position_kwargs(model, example), **kwargs}
  if isinstance(model, EncoderDecoder):
    return model.apply(variables, example["inputs"], example["decoder_inputs"], **kwargs)
  return model.apply(variables, example["decoder_inputs"], **kwargs)


def init_params(model: nn.Module, key: Array, example: dict[str, Array]):
  """Initial parameters for an example batch (shapes only matter)."""
  return jax.jit(lambda k: apply_init(model, k, example))(key)


def apply_init(model: nn.Module, key: Array, example: dict[str, Array]):
  """Like :func:`init_params`, unjitted (to call inside another jitted function)."""
  kwargs = position_kwargs(model, example)
  if isinstance(model, EncoderDecoder):
    return model.init(key, example["inputs"], example["decoder_inputs"], **kwargs)["params"]
  return model.init(key, example["decoder_inputs"], **kwargs)["params"]
