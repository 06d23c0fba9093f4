"""Tests for `attnjax.kernels`: the cuDNN, Pallas GPU and Splash implementations.

On CPU the two Pallas kernels run in interpret mode and are compared, values and gradients
(of the output and of the lse), with the dense "xla" path; cuDNN's mapping of the arguments
onto `jax.nn.dot_product_attention` is checked through jax.nn's own XLA path. Dispatch of
`implementation=None` is tested with the backend passed explicitly.

Shapes: query `[B, T, N, H]`, key/value `[B, S, K, H]`, lse `[B, N, T]`.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attnjax
from attnjax import attention, kernels, masks

TOL = dict(rtol=2e-5, atol=2e-5)

# The Pallas kernels run in interpret mode here; the tests that check the warning say so.
pytestmark = pytest.mark.filterwarnings("ignore::attnjax.kernels.InterpretModeWarning")


def inputs(B, T, S, N, K, H, dtype=jnp.float32, seed=0):
  rng = np.random.default_rng(seed)
  q, k, v = (jnp.asarray(rng.standard_normal(shape), dtype)
             for shape in ((B, T, N, H), (B, S, K, H), (B, S, K, H)))
  return q, k, v


def value_and_grads(implementation, q, k, v, **kwargs):
  """Jitted (out, lse) and the gradients of a loss that weighs both, w.r.t. q, k, v."""
  rng = np.random.default_rng(1)
  w_out = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)
  w_lse = jnp.asarray(rng.standard_normal((q.shape[0], q.shape[2], q.shape[1])), jnp.float32)

  def loss(q, k, v):
    out, lse = attnjax.dot_product_attention(q, k, v, implementation=implementation,
                                             return_lse=True, **kwargs)
    finite_lse = jnp.where(jnp.isfinite(lse), lse, 0.0)
    return jnp.sum(out.astype(jnp.float32) * w_out) + jnp.sum(finite_lse * w_lse), (out, lse)

  (_, (out, lse)), grads = jax.jit(jax.value_and_grad(loss, (0, 1, 2), has_aux=True))(q, k, v)
  return out, lse, grads


def assert_matches_dense(implementation, q, k, v, tol=TOL, **kwargs):
  out, lse, grads = value_and_grads(implementation, q, k, v, **kwargs)
  ref_out, ref_lse, ref_grads = value_and_grads("xla", q, k, v, **kwargs)
  np.testing.assert_allclose(out.astype(np.float32), ref_out.astype(np.float32), **tol)
  np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(ref_lse))
  np.testing.assert_allclose(lse, ref_lse, **tol)
  for name, g, ref in zip("qkv", grads, ref_grads):
    np.testing.assert_allclose(g.astype(np.float32), ref.astype(np.float32), err_msg=name, **tol)
  return out, lse


def packed_ids(B, L, seed):
  """Sorted segment ids of packed sequences, some negative."""
  return jnp.asarray(np.sort(np.random.default_rng(seed).integers(-3, 3, (B, L))), jnp.int32)


# ------------------------------------------------------------------ Splash (interpret mode)


def test_splash_causal_gqa_packed_segments_and_mask_objects():
  # Causal with a head-dependent MaskFn and Chunked (mask blocks loaded, one Splash mask per
  # head), grouped-query heads, and packed segment ids that differ between queries and keys.
  q, k, v = inputs(2, 128, 128, 4, 2, 16)
  mask = masks.Chunked(32) | masks.MaskFn(lambda b, h, i, j: (h % 2 == 0) & (j <= i + 40))
  with pytest.warns(kernels.InterpretModeWarning, match="interpret mode"):
    assert_matches_dense("splash", q, k, v, is_causal=True, mask=mask,
                         q_segment_ids=packed_ids(2, 128, 3),
                         kv_segment_ids=packed_ids(2, 128, 4))


def test_splash_window_soft_cap_lengths_padding():
  # T and S not multiples of 128 (padded), cross-attention lengths, and rows that see no key
  # (the second sequence's queries past 37, and those whose window ends before key 5).
  q, k, v = inputs(2, 100, 200, 4, 4, 16)
  lengths = masks.Lengths(jnp.array([100, 37]), jnp.array([200, 5]))
  out, lse = assert_matches_dense("splash", q, k, v, local_window_size=(16, 8),
                                  logits_soft_cap=5.0, mask=lengths)
  assert np.isneginf(lse[1, :, 37:]).all() and not np.asarray(out[1, 37:]).any()
  assert np.isneginf(lse[1, :, 30]).all()  # Its window [14, 38] misses the 5 keys.


def test_splash_sinks_match_an_extra_key_of_that_logit():
  # A sink is a logit with no value: dense attention over one more key, whose value is zero
  # and whose logit is the sink (a zero key plus a bias), computes the same function.
  B, T, N, H = 1, 128, 2, 16
  q, k, v = inputs(B, T, T, N, N, H)
  sinks = jnp.array([0.5, -1.0])

  def splash(q, k, v, sinks):
    return kernels.attention(attention._canonicalize(
        q, k, v, None, None, True, None, None, None, None, None), "splash", return_lse=True,
        sinks=sinks)

  def dense(q, k, v, sinks):
    zero = jnp.zeros((B, 1, N, H))
    bias = jnp.concatenate([jnp.broadcast_to(sinks[:, None, None], (N, T, 1)),
                            jnp.zeros((N, T, T))], axis=-1)
    visible = jnp.concatenate([jnp.ones((T, 1), bool), jnp.tril(jnp.ones((T, T), bool))], 1)
    return attnjax.dot_product_attention(
        q, jnp.concatenate([zero, k], 1), jnp.concatenate([zero, v], 1), bias=bias,
        mask=visible, implementation="xla", return_lse=True)

  def loss(fn):
    def f(q, k, v, sinks):
      out, lse = fn(q, k, v, sinks)
      return jnp.sum(out * jnp.cos(jnp.arange(H)).reshape(1, 1, 1, H)) + jnp.sum(jnp.sin(lse)), (
          out, lse)
    return jax.jit(jax.value_and_grad(f, (0, 1, 2, 3), has_aux=True))

  (_, (out, lse)), grads = loss(splash)(q, k, v, sinks)
  (_, (ref_out, ref_lse)), ref_grads = loss(dense)(q, k, v, sinks)
  np.testing.assert_allclose(out, ref_out, **TOL)
  np.testing.assert_allclose(lse, ref_lse.reshape(lse.shape), **TOL)
  for g, ref in zip(grads, ref_grads):
    np.testing.assert_allclose(g, ref, **TOL)


# ------------------------------------------------------------- Pallas GPU (interpret mode)


def test_pallas_gpu_causal_gqa_packed_segments():
  q, k, v = inputs(2, 64, 64, 4, 2, 24)  # The kernel pads the head dim to 32.
  ids = packed_ids(2, 64, seed=5)
  with pytest.warns(kernels.InterpretModeWarning, match="no GPU"):
    assert_matches_dense("pallas_gpu", q, k, v, is_causal=True, scale=0.3, q_segment_ids=ids,
                         kv_segment_ids=ids)


# ------------------------------------------------------------------- cuDNN's mapping


@pytest.mark.parametrize("kwargs", [
    dict(is_causal=True, local_window_size=(3, 9)),
    dict(local_window_size=(2, 0), mask=masks.Lengths(jnp.array([6, 3]), jnp.array([4, 12]))),
    dict(is_causal=True, mask=masks.Lengths(jnp.array([8, 2]), jnp.array([12, 1]))),
])
def test_cudnn_arguments_mean_the_same_in_jax_nn(kwargs):
  # The cuDNN path passes its arguments to jax.nn.dot_product_attention; through jax.nn's XLA
  # implementation (same arguments, same meaning) it must equal attnjax's dense path,
  # including rows that see no key (zeros), values and gradients.
  q, k, v = inputs(2, 8, 12, 4, 2, 8)

  def cudnn_via_xla(q, k, v):
    c = attention._canonicalize(q, k, v, None, kwargs.get("mask"), kwargs.get("is_causal",
                                False), None, kwargs.get("local_window_size"), None, None, None)
    reason = kernels.unsupported(c, "cudnn")
    assert reason is None or "float16 or bfloat16" in reason  # (cuDNN takes no float32.)
    return kernels._cudnn(c, jax_nn_implementation="xla")

  def dense(q, k, v):
    return attnjax.dot_product_attention(q, k, v, implementation="xla", **kwargs)

  def value_and_grad(fn):
    def loss(*args):
      out = fn(*args)
      return jnp.sum(jnp.sin(out)), out
    return jax.jit(jax.value_and_grad(loss, (0, 1, 2), has_aux=True))

  ((_, out), grads), ((_, ref_out), ref_grads) = (value_and_grad(f)(q, k, v)
                                                  for f in (cudnn_via_xla, dense))
  np.testing.assert_allclose(out, ref_out, **TOL)
  for g, ref in zip(grads, ref_grads):
    np.testing.assert_allclose(g, ref, **TOL)


# ------------------------------------------------------------------------- dispatch


def canonical(B=2, T=256, S=256, N=4, K=4, H=64, dtype=jnp.bfloat16, **kwargs):
  q, k, v = (jnp.zeros(shape, dtype) for shape in ((B, T, N, H), (B, S, K, H), (B, S, K, H)))
  args = dict(bias=None, mask=None, is_causal=False, scale=None, local_window_size=None,
              q_segment_ids=None, kv_segment_ids=None, logits_soft_cap=None)
  args.update(kwargs)
  return attention._canonicalize(q, k, v, *args.values())


IDS = jnp.zeros((2, 256), jnp.int32)
LENGTHS = masks.Lengths(jnp.array([256, 100]), jnp.array([256, 50]))
GIB = 1 << 30

# (backend, shapes and arguments, options of dot_product_attention, memory, expected choice)
DISPATCH = [
    ("gpu", dict(is_causal=True), {}, GIB, "cudnn"),
    ("gpu", dict(is_causal=True, K=1), {}, GIB, "cudnn"),
    ("gpu", dict(is_causal=True, local_window_size=(32, 0)), {}, GIB, "cudnn"),
    ("gpu", dict(mask=LENGTHS), {}, GIB, "cudnn"),
    ("gpu", dict(is_causal=True, dtype=jnp.float32), {}, GIB, "pallas_gpu"),
    ("gpu", dict(is_causal=True), dict(return_lse=True), GIB, "pallas_gpu"),
    ("gpu", dict(q_segment_ids=IDS, kv_segment_ids=IDS), {}, GIB, "pallas_gpu"),
    ("gpu", dict(is_causal=True, H=256), {}, GIB, "pallas_gpu"),
    ("gpu", dict(local_window_size=(4, 4)), {}, GIB, "xla"),
    ("gpu", dict(is_causal=True, T=128, dtype=jnp.float32), {}, GIB, "xla"),
    ("gpu", dict(is_causal=True, T=100, S=100, dtype=jnp.float32), {}, GIB, "xla"),
    ("gpu", dict(logits_soft_cap=30.0), {}, GIB, "xla"),
    ("gpu", dict(bias=jnp.zeros((256, 256))), {}, GIB, "xla"),
    ("gpu", dict(bias=jnp.zeros((256, 256))), {}, 1 << 20, "blockwise"),
    ("gpu", dict(is_causal=True), dict(dropout_rate=0.1), GIB, "xla"),
    ("gpu", dict(is_causal=True), dict(return_weights=True), 1 << 20, "xla"),
    ("tpu", dict(is_causal=True), {}, GIB, "splash"),
    ("tpu", dict(is_causal=True, dtype=jnp.float32, K=1), {}, GIB, "splash"),
    ("tpu", dict(local_window_size=(4, 4), logits_soft_cap=30.0), dict(return_lse=True), GIB,
     "splash"),
    ("tpu", dict(mask=LENGTHS, q_segment_ids=IDS, kv_segment_ids=IDS), {}, GIB, "splash"),
    ("tpu", dict(mask=masks.Chunked(64)), {}, GIB, "splash"),
    ("tpu", dict(is_causal=True, T=100, S=100), {}, GIB, "xla"),
    ("tpu", dict(is_causal=True, T=100, S=100), {}, 1 << 20, "blockwise"),
    ("tpu", dict(mask=masks.PrefixLM(jnp.array([3, 5]))), {}, GIB, "xla"),
    ("tpu", dict(bias=jnp.zeros((256, 256))), {}, GIB, "xla"),
    ("tpu", dict(is_causal=True), dict(dropout_rate=0.1), GIB, "xla"),
    ("cpu", dict(is_causal=True, S=64), {}, GIB, "xla"),
    ("cpu", dict(is_causal=True), {}, GIB, "blockwise"),
    ("cpu", dict(is_causal=True), dict(return_weights=True), GIB, "xla"),
]


@pytest.mark.parametrize("backend,arguments,options,memory,expected", DISPATCH)
def test_default_implementation_per_backend(backend, arguments, options, memory, expected):
  c = canonical(**arguments)
  chosen = attention._choose_implementation(
      c, options.get("dropout_rate", 0.0), options.get("return_weights", False),
      options.get("return_lse", False), backend=backend, memory_bytes=memory)
  assert chosen == expected


@pytest.mark.parametrize("backend", ["gpu", "tpu"])
def test_symbolic_batch_on_accelerators_picks_a_pure_jax_path(backend):
  # Under shape-polymorphic export the kernels (static shapes only) are passed over.
  b, = jax.export.symbolic_shape("b")
  chosen = []

  def choose(q, k, v):
    c = attention._canonicalize(q, k, v, None, None, True, None, None, None, None, None)
    chosen.append(attention._choose_implementation(c, 0.0, False, backend=backend,
                                                   memory_bytes=GIB))
    return q

  jax.eval_shape(choose, *(jax.ShapeDtypeStruct((b, 256, 4, 64), jnp.bfloat16),) * 3)
  assert chosen == ["xla"]


def test_default_on_this_cpu_is_unchanged():
  q, k, v = inputs(1, 8, 8, 2, 2, 4)
  fn = jax.jit(attnjax.dot_product_attention, static_argnames=("is_causal", "implementation"))
  np.testing.assert_allclose(fn(q, k, v, is_causal=True),
                             fn(q, k, v, is_causal=True, implementation="xla"), **TOL)


# (implementation, arguments, options, words the error must contain)
ERRORS = [
    ("splash", dict(bias=jnp.zeros((256, 256))), {}, ["bias", "xla, blockwise"]),
    ("splash", dict(mask=masks.PrefixLM(jnp.array([3, 5]))), {},
     ["PrefixLM", "xla, blockwise"]),
    ("splash", dict(mask=jnp.ones((256, 256), bool)), {}, ["bool mask array", "xla"]),
    ("splash", dict(is_causal=True), dict(dropout_rate=0.1), ["dropout_rate=0.1", "xla"]),
    ("splash", dict(is_causal=True), dict(return_weights=True), ["return_weights", "xla"]),
    ("splash", dict(is_causal=True), dict(score_mod=lambda s, *_: s),
     ["score_mod", "xla, blockwise"]),
    ("pallas_gpu", dict(local_window_size=(4, 4)), {},
     ["local_window_size=(4, 4)", "xla, blockwise, cudnn, splash"]),
    ("pallas_gpu", dict(logits_soft_cap=30.0), {}, ["logits_soft_cap", "splash"]),
    ("pallas_gpu", dict(is_causal=True), dict(sinks=jnp.zeros(4)), ["sinks", "splash"]),
    ("pallas_gpu", dict(mask=LENGTHS), {}, ["Lengths", "cudnn, splash"]),
    ("pallas_gpu", dict(q_segment_ids=IDS, kv_segment_ids=IDS + 1), {},
     ["same array", "splash"]),
    ("pallas_gpu", dict(T=128), {}, ["T=128, S=256"]),
    ("pallas_gpu", dict(T=96, S=96), {}, ["multiple of 128"]),
    ("pallas_gpu", dict(mask=masks.Causal(offset=2)), {}, ["Causal(offset=2)", "splash"]),
    ("splash", dict(B=0), {}, ["non-empty", "(0, 256, 4, 64)"]),
    ("cudnn", dict(is_causal=True), dict(return_lse=True), ["return_lse", "pallas_gpu"]),
    ("cudnn", dict(dtype=jnp.float32), {}, ["float16 or bfloat16", "float32"]),
    ("cudnn", dict(local_window_size=(4, 4)), {}, ["right side", "is_causal"]),
    ("cudnn", dict(q_segment_ids=IDS, kv_segment_ids=IDS), {}, ["segment", "pallas_gpu"]),
]


@pytest.mark.parametrize("implementation,arguments,options,words", ERRORS)
def test_kernel_refuses_what_it_cannot_honour(implementation, arguments, options, words):
  with pytest.raises(ValueError) as error:
    kernels.attention(canonical(**arguments), implementation, backend=kernels._HARDWARE[
        implementation], **options)
  for word in words:
    assert word in str(error.value)


def test_splash_refuses_a_mask_fn_of_traced_data():
  q, k, v = inputs(1, 128, 128, 2, 2, 8)

  @jax.jit
  def attend(q, k, v, limit):
    mask = masks.MaskFn(lambda b, h, i, j: j <= limit)
    return attnjax.dot_product_attention(q, k, v, mask=mask, implementation="splash")

  with pytest.raises(ValueError, match="MaskFn.*reads traced data.*xla, blockwise"):
    attend(q, k, v, jnp.int32(3))


def test_refusal_through_dot_product_attention():
  q, k, v = inputs(1, 8, 8, 2, 2, 4)
  with pytest.raises(ValueError, match="bias is not supported by implementation='splash'"):
    attnjax.dot_product_attention(q, k, v, bias=jnp.zeros((8, 8)), implementation="splash")
  with pytest.raises(ValueError, match="needs a GPU"):
    attnjax.dot_product_attention(q.astype(jnp.bfloat16), k.astype(jnp.bfloat16),
                                  v.astype(jnp.bfloat16), implementation="cudnn")


def test_support_table_names_only_implementations():
  for feature, names in kernels.SUPPORT.items():
    assert set(names) <= set(attention.IMPLEMENTATIONS), feature
    assert "xla" in names, feature


def test_public_function_passes_sinks_and_score_mod_to_the_kernels():
  q, k, v = inputs(1, 128, 128, 2, 2, 16)
  sinks = jnp.array([0.5, -1.0])
  out, lse = attnjax.dot_product_attention(q, k, v, is_causal=True, sinks=sinks,
                                           implementation="splash", return_lse=True)
  ref, ref_lse = attnjax.dot_product_attention(q, k, v, is_causal=True, sinks=sinks,
                                               implementation="xla", return_lse=True)
  np.testing.assert_allclose(out, ref, **TOL)
  np.testing.assert_allclose(lse, ref_lse, **TOL)
  with pytest.raises(ValueError, match="score_mod"):
    attnjax.dot_product_attention(q, k, v, score_mod=lambda s, *_: s, implementation="splash")
  # None never picks a kernel that would drop the modifier.
  c = attention._canonicalize(q, k, v, None, None, True, None, None, None, None, None,
                              lambda s, *_: s, None)
  for backend in ("gpu", "tpu"):
    assert attention._choose_implementation(c, 0.0, False, False, backend=backend,
                                            memory_bytes=2**34) in ("xla", "blockwise")
