"""Greedy autoregressive decoding with the key/value cache.

Each step feeds one token per sequence to the decoder in ``decode=True`` mode, which appends
its keys and values to the cache and attends to everything cached so far: the prefix is never
recomputed. The steps run in one ``lax.while_loop`` that stops early once every sequence has
emitted EOS, inside one jit-compiled function per input shape.

Shapes: B batch, S input length, T target length (EOS included), L = S + T + 2 the length of
a decoder-only sequence ``BOS x SEP y EOS``.
"""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import Array

from attnjax.toy import models
from attnjax.toy.tasks import EOS, PAD, decoder_only_example, encoder_decoder_example


def _decoding_model(model: nn.Module) -> nn.Module:
  return model.clone(config=dataclasses.replace(model.config, decode=True))


def _empty_cache(init_fn):
  shapes = jax.eval_shape(init_fn, jax.random.key(0))["cache"]
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


@functools.partial(jax.jit, static_argnames=("model", "target_len", "stop_at_eos", "prefill"))
def greedy_decode(model: nn.Module, params, batch: dict[str, Array], *, target_len: int,
                  stop_at_eos: bool = True, prefill: int = 0,
                  position_ids: dict[str, Array] | None = None) -> Array:
  """Greedy decoding of the targets of ``batch``.

  Args:
    model: an :class:`~attnjax.toy.models.EncoderDecoder` or
      :class:`~attnjax.toy.models.DecoderOnly` (with ``decode=False``; the cached variant is
      derived from it).
    params: its parameters.
    batch: ``{"inputs": [B, S], "targets": [B, T]}``; the targets are used only for their
      shape (decoder-only: to place the prompt), never as decoder inputs.
    target_len: number of tokens to generate, at most T.
    stop_at_eos: stop once every sequence has produced EOS.
    prefill: decoder-only: how many leading tokens to feed as one chunk before the
      token-by-token loop; less than the shortest prompt (``BOS x SEP``) of the batch.
    position_ids: the example's position ids from :func:`attnjax.toy.tasks.position_ids`
      (decoder-only ``positions [B, L - 1]``; encoder-decoder ``input_positions [B, S]``
      and ``decoder_positions [B, T]``), drawn once for the whole sequence: each step
      feeds its token with its id. None: ``0, 1, ...``.

  Returns:
    int32 ``[B, target_len]``: the generated tokens (after EOS, whatever the model produced,
    or PAD where decoding had stopped).
  """
  position_ids = position_ids or {}
  if isinstance(model, models.EncoderDecoder):
    return _decode_encoder_decoder(model, params, batch, target_len, stop_at_eos,
                                   position_ids)
  return _decode_decoder_only(model, params, batch, target_len, stop_at_eos, prefill,
                              position_ids)


def _init_positions(position_ids, name, length):
  """``{"positions": ids [B, length]}`` for ``init``, which sizes the cache's table of ids
  (the ids under ``name`` cut or padded with their last), or {} without them."""
  if name not in position_ids:
    return {}
  ids_BL = position_ids[name][:, :length]
  return {"positions": jnp.pad(ids_BL, ((0, 0), (0, length - ids_BL.shape[1])), mode="edge")}


def _step_positions(position_ids, name, t, size=1):
  """``{"positions": ids[:, t:t + size]}`` of the ids under ``name``, or {} without them."""
  if name not in position_ids:
    return {}
  return {"positions": jax.lax.dynamic_slice_in_dim(position_ids[name], t, size, axis=1)}


def _decode_encoder_decoder(model, params, batch, target_len, stop_at_eos, position_ids):
  inputs = batch["inputs"]
  B = inputs.shape[0]
  dec = _decoding_model(model)
  encoded = model.apply({"params": params}, inputs, method="encode",
                        positions=position_ids.get("input_positions"))
  tokens_BT = jnp.zeros((B, target_len), jnp.int32)
  init_ids = _init_positions(position_ids, "decoder_positions", target_len)
  cache = _empty_cache(lambda k: dec.init(k, encoded, inputs, tokens_BT, method="decode",
                                          **init_ids))
  first = encoder_decoder_example(batch)["decoder_inputs"][:, 0]

  def body(carry):
    t, token_B, cache, out_BT, done_B = carry
    logits, variables = dec.apply({"params": params, "cache": cache}, encoded, inputs,
                                  token_B[:, None], method="decode", mutable=["cache"],
                                  **_step_positions(position_ids, "decoder_positions", t))
    pred_B = jnp.argmax(logits[:, 0], axis=-1).astype(jnp.int32)
    out_BT = out_BT.at[:, t].set(pred_B)
    return t + 1, pred_B, variables["cache"], out_BT, done_B | (pred_B == EOS)

  def cond(carry):
    t, _, _, _, done_B = carry
    return (t < target_len) & ~(stop_at_eos & jnp.all(done_B))

  carry = (jnp.int32(0), first, cache, jnp.full((B, target_len), PAD, jnp.int32),
           jnp.zeros((B,), bool))
  return jax.lax.while_loop(cond, body, carry)[3]


def _decode_decoder_only(model, params, batch, target_len, stop_at_eos, prefill,
                        position_ids):
  example = decoder_only_example(batch)
  prompt_B = example["prompt_lengths"]
  seq = example["decoder_inputs"]
  B, L = seq.shape[0], seq.shape[1] + 1
  j_L = jnp.arange(L)[None, :]
  # The buffer holds the prompt, then whatever has been generated.
  buf_BL = jnp.where(j_L < prompt_B[:, None], jnp.pad(seq, ((0, 0), (0, 1))), PAD)
  dec = _decoding_model(model)
  init_ids = _init_positions(position_ids, "positions", L)
  cache = _empty_cache(lambda k: dec.init(k, buf_BL, **init_ids))
  if not 0 <= prefill < L:
    raise ValueError(f"prefill must be in [0, {L}), got {prefill}")
  if prefill:
    cache = dec.apply({"params": params, "cache": cache}, buf_BL[:, :prefill],
                      mutable=["cache"],
                      **_step_positions(position_ids, "positions", 0, prefill))[1]["cache"]
  end = jnp.max(prompt_B) + target_len - 1  # last position whose successor is generated

  def body(carry):
    t, cache, buf_BL, done_B = carry
    token_B = jax.lax.dynamic_index_in_dim(buf_BL, t, axis=1, keepdims=False)
    logits, variables = dec.apply({"params": params, "cache": cache}, token_B[:, None],
                                  mutable=["cache"],
                                  **_step_positions(position_ids, "positions", t))
    pred_B = jnp.argmax(logits[:, 0], axis=-1).astype(jnp.int32)
    generating_B = t + 1 >= prompt_B
    old_B = jax.lax.dynamic_index_in_dim(buf_BL, t + 1, axis=1, keepdims=False)
    new_B = jnp.where(generating_B, pred_B, old_B)
    buf_BL = jax.lax.dynamic_update_index_in_dim(buf_BL, new_B, t + 1, axis=1)
    return t + 1, variables["cache"], buf_BL, done_B | (generating_B & (pred_B == EOS))

  def cond(carry):
    t, _, _, done_B = carry
    return (t < jnp.minimum(end, L - 1)) & ~(stop_at_eos & jnp.all(done_B))

  carry = (jnp.int32(prefill), cache, buf_BL, jnp.zeros((B,), bool))
  buf_BL = jax.lax.while_loop(cond, body, carry)[2]
  idx_BT = jnp.clip(prompt_B[:, None] + jnp.arange(target_len)[None, :], 0, L - 1)
  return jnp.take_along_axis(buf_BL, idx_BT, axis=1)
