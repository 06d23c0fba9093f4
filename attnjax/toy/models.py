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
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Literal, get_args

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import Array

from attnjax import linen as attn_linen
from attnjax import positional
from attnjax.attention import Implementation, dot_product_attention
from attnjax.linen import with_logical_axes
from attnjax.toy.tasks import PAD

Position = Literal["sinusoidal", "rotary", "none"]
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
    position: ``"sinusoidal"`` (added to the embeddings), ``"rotary"`` (applied to q and k)
      or ``"none"``.
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


class Embed(nn.Module):
  """Token embedding scaled by sqrt(D), then the short convolution and sinusoidal positions
  when configured.

  In decode mode the position counter lives in ``'cache'`` under ``'position'``, and the
  last ``short_conv - 1`` token embeddings under ``'previous_embeddings'``.
  """

  config: TransformerConfig

  @nn.compact
  def __call__(self, tokens: Array, *, deterministic: bool) -> Array:
    cfg = self.config
    x = self.embedding(tokens) * jnp.sqrt(cfg.d_model).astype(jnp.float32)
    if cfg.short_conv is not None:
      x = self._short_conv(x)
    if cfg.position == "sinusoidal":
      length = tokens.shape[-1]
      positions = jnp.arange(length)
      if cfg.decode:
        counter = self.variable("cache", "position", lambda: jnp.zeros((), jnp.int32))
        if not self.is_initializing():
          positions = positions + counter.value
          counter.value = counter.value + length
      pe = positional.sinusoidal_position_encoding(positions, cfg.d_model)
      x = x + jnp.broadcast_to(pe, x.shape)
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
  def __call__(self, x: Array, *, mask: Array | None, encoded: Array | None = None,
               cross_mask: Array | None = None, deterministic: bool,
               sow_weights: bool = False) -> Array:
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

    rotary = cfg.position == "rotary"
    decode = cfg.decode and self.causal
    self_attn = attention("self_attention", decode, rotary,
                          None if decode else cfg.self_attention_fn)
    x = sublayer("self_attention", lambda h: self_attn(
        h, mask=mask, is_causal=self.causal and not decode, deterministic=deterministic,
        sow_weights=sow_weights), x)
    if self.cross:
      cross_attn = attention("cross_attention", False, False)
      x = sublayer("cross_attention", lambda h: cross_attn(
          h, encoded, mask=cross_mask, deterministic=deterministic,
          sow_weights=sow_weights), x)
    x = sublayer("mlp", lambda h: Mlp(cfg, name="mlp")(h, deterministic=deterministic), x)
    return nn.with_logical_constraint(x, ACTIVATION_AXES)


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
    self.encoder_embed = Embed(cfg)
    self.decoder_embed = Embed(cfg)
    self.encoder = Stack(dataclasses.replace(cfg, decode=False), causal=False, cross=False)
    self.decoder = Stack(cfg, causal=True, cross=True)
    if not cfg.tie_embeddings:
      self.logits_dense = _dense(cfg.vocab_size, KERNEL_INITS[cfg.kernel_init],
                                 ("embed", "vocab"))

  def encode(self, inputs: Array, *, deterministic: bool = True,
             sow_weights: bool = False) -> Array:
    """Encoder outputs ``[B, S, D]`` for ``inputs [B, S]``."""
    x = self.encoder_embed(inputs, deterministic=deterministic)
    return self.encoder(x, mask=_key_padding_mask(inputs), deterministic=deterministic,
                        sow_weights=sow_weights)

  def decode(self, encoded: Array, inputs: Array, decoder_inputs: Array, *,
             deterministic: bool = True, sow_weights: bool = False) -> Array:
    """Logits ``[B, T, V]`` for ``decoder_inputs [B, T]`` given ``encoded [B, S, D]``.

    ``inputs [B, S]`` (the source tokens) give the cross-attention padding mask.
    """
    y = self.decoder_embed(decoder_inputs, deterministic=deterministic)
    y = self.decoder(y, mask=None, encoded=encoded, cross_mask=_key_padding_mask(inputs),
                     deterministic=deterministic, sow_weights=sow_weights)
    return _output_logits(self, self.decoder_embed, y)

  def __call__(self, inputs: Array, decoder_inputs: Array, *, deterministic: bool = True,
               sow_weights: bool = False) -> Array:
    encoded = self.encode(inputs, deterministic=deterministic, sow_weights=sow_weights)
    return self.decode(encoded, inputs, decoder_inputs, deterministic=deterministic,
                       sow_weights=sow_weights)


class DecoderOnly(nn.Module):
  """Causal Transformer over one sequence: logits ``[B, L, V]`` for ``decoder_inputs [B, L]``."""

  config: TransformerConfig

  def setup(self):
    cfg = self.config
    self.embed = Embed(cfg)
    self.decoder = Stack(cfg, causal=True, cross=False)
    if not cfg.tie_embeddings:
      self.logits_dense = _dense(cfg.vocab_size, KERNEL_INITS[cfg.kernel_init],
                                 ("embed", "vocab"))

  def __call__(self, decoder_inputs: Array, *, deterministic: bool = True,
               sow_weights: bool = False) -> Array:
    y = self.embed(decoder_inputs, deterministic=deterministic)
    y = self.decoder(y, mask=None, deterministic=deterministic, sow_weights=sow_weights)
    return _output_logits(self, self.embed, y)


ARCHITECTURES: dict[Arch, type[nn.Module]] = {"encoder_decoder": EncoderDecoder,
                                              "decoder_only": DecoderOnly}


def make_model(arch: Arch, config: TransformerConfig) -> nn.Module:
  """The module for ``arch`` (``"encoder_decoder"`` or ``"decoder_only"``)."""
  if arch not in ARCHITECTURES:
    raise ValueError(f"arch must be one of {tuple(ARCHITECTURES)}, got {arch!r}")
  return ARCHITECTURES[arch](config)


def apply_model(model: nn.Module, variables, example: dict[str, Array], **kwargs) -> Any:
  """Logits for an example from :func:`attnjax.toy.tasks.encoder_decoder_example` or
  :func:`attnjax.toy.tasks.decoder_only_example`; with ``mutable=...`` among ``kwargs``,
  the pair ``(logits, mutated variables)`` of ``model.apply``."""
  if isinstance(model, EncoderDecoder):
    return model.apply(variables, example["inputs"], example["decoder_inputs"], **kwargs)
  return model.apply(variables, example["decoder_inputs"], **kwargs)


def init_params(model: nn.Module, key: Array, example: dict[str, Array]):
  """Initial parameters for an example batch (shapes only matter)."""
  return jax.jit(lambda k: apply_init(model, k, example))(key)


def apply_init(model: nn.Module, key: Array, example: dict[str, Array]):
  """Like :func:`init_params`, unjitted (to call inside another jitted function)."""
  if isinstance(model, EncoderDecoder):
    return model.init(key, example["inputs"], example["decoder_inputs"])["params"]
  return model.init(key, example["decoder_inputs"])["params"]
