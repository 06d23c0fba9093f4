"""Forward-mode autodiff (jvp, linearize, jacfwd, Hessian-vector products) of attention.

The blockwise path is checked against the dense implementation="xla" path, against central
finite differences and against its own reverse mode; attnjax._linear_call's rules against
closed forms on a toy linear function.
"""

import collections
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.custom_derivatives import linear_call

import attnjax
from attnjax import _linear_call, blockwise

# Each case: keyword overrides of the default problem below.
CASES = {
    "causal_T_ne_S": dict(is_causal=True, T=13, S=10),
    "window_segments_gqa": dict(window=(3, 1), segments=True),
    "mask_bias_cap_mqa": dict(K=1, mask=True, bias=(1, 4, 11, 12), soft_cap=2.0),
}
PLANS = ["unrolled", "lax_loops"]


def _problem(B=2, T=11, S=12, N=4, K=2, H=8, is_causal=False, window=None, segments=False,
             mask=False, bias=None, soft_cap=None, seed=0):
  """(primals, tangents, options): q, k, v (and bias) with random tangents; the mask, when
  asked for, hides every key from query 3 and, for head 1, from query 7 on."""
  rng = np.random.default_rng(seed)
  shapes = [(B, T, N, H), (B, S, K, H), (B, S, K, H)] + ([bias] if bias else [])
  primals = tuple(jnp.asarray(rng.normal(size=s), jnp.float32) for s in shapes)
  tangents = tuple(jnp.asarray(rng.normal(size=s), jnp.float32) for s in shapes)
  opts = dict(is_causal=is_causal, local_window_size=window, logits_soft_cap=soft_cap)
  if segments:
    opts["q_segment_ids"] = jnp.asarray(np.sort(rng.integers(0, 3, (B, T)), -1), jnp.int32)
    opts["kv_segment_ids"] = jnp.asarray(np.sort(rng.integers(0, 3, (B, S)), -1), jnp.int32)
  if mask:
    m = rng.random((1, N, T, S)) < 0.7
    m[:, :, 3] = False
    m[:, 1, 7:] = False
    opts["mask"] = jnp.asarray(m)
  return primals, tangents, opts


def _attention(impl, opts, plan="unrolled"):
  """(q, k, v[, bias]) -> (out, lse) by ``impl``; blockwise with 2 x 2 blocks unrolled, or
  small blocks in lax loops."""
  block_sizes = (8, 8) if plan == "unrolled" else (4, 4)
  def attention(q, k, v, bias=None):
    return attnjax.dot_product_attention(q, k, v, bias, return_lse=True, implementation=impl,
                                         block_sizes=block_sizes if impl == "blockwise" else None,
                                         **opts)
  return attention


@pytest.fixture(params=PLANS)
def plan(request, monkeypatch):
  if request.param == "lax_loops":
    monkeypatch.setattr(blockwise, "_MAX_UNROLLED_PAIRS", 0)
  return request.param


def _finite_lse(outputs):
  """(out, lse) with lse's -inf entries (rows that see no key) set to 0."""
  out, lse = outputs
  return out, jnp.where(jnp.isfinite(lse), lse, 0.0)


def _assert_close(actual, expected, tol, err_msg=""):
  for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
    assert a.shape == e.shape and a.dtype == e.dtype, err_msg
    scale = max(1.0, float(np.max(np.abs(e), where=np.isfinite(e), initial=0.0)))
    np.testing.assert_allclose(a, e, atol=tol * scale, rtol=tol, err_msg=err_msg)


def _loss(attention, cotangent):
  """A scalar that touches every output and every finite lse, non-linearly."""
  def loss(*args):
    out, lse = _finite_lse(attention(*args))
    return jnp.sum(out * cotangent) + 0.3 * jnp.sum(jnp.sin(lse))
  return loss


@pytest.mark.parametrize("case,plan", [("causal_T_ne_S", "unrolled"),
                                       ("window_segments_gqa", "lax_loops"),
                                       ("mask_bias_cap_mqa", "unrolled"),
                                       ("mask_bias_cap_mqa", "lax_loops")], indirect=["plan"])
def test_jvp_matches_dense_and_finite_differences(case, plan):
  primals, tangents, opts = _problem(**CASES[case])
  blockwise_fn = _attention("blockwise", opts, plan)
  eps = 1e-3

  @jax.jit
  def run(p, t):
    f = lambda *p: _finite_lse(blockwise_fn(*p))  # noqa: E731
    differences = jax.tree.map(
        lambda a, b: (a - b) / (2 * eps), f(*(x + eps * d for x, d in zip(p, t))),
        f(*(x - eps * d for x, d in zip(p, t))))
    return jax.jvp(blockwise_fn, p, t), jax.jvp(_attention("xla", opts), p, t), differences

  ((out, lse), (d_out, d_lse)), (dense, d_dense), differences = run(primals, tangents)
  _assert_close((out, _finite_lse((out, lse))[1]), _finite_lse(dense), 2e-5)
  _assert_close((d_out, d_lse), d_dense, 2e-5)
  if "mask" in opts:  # Rows that see no key have zero output, lse -inf and zero tangents.
    assert np.all(np.isneginf(lse[:, :, 3])) and np.all(np.isneginf(lse[:, 1, 7:]))
    np.testing.assert_array_equal(d_out[:, 3], 0.0)
    np.testing.assert_array_equal(d_lse[:, 1, 7:], 0.0)
  # Central differences in float32: a step of 1e-3 leaves errors of about 1e-4.
  _assert_close((d_out, d_lse), differences, 2e-3)


def test_jvp_and_hvp_through_score_mod_arrays_and_sinks(plan):
  # The arrays a score modifier closes over and the sinks are inputs of the custom derivative
  # like q, k and v (with segment ids, integer inputs, alongside).
  primals, tangents, opts = _problem(segments=True, is_causal=True)
  rng = np.random.default_rng(3)
  table, sinks = (jnp.asarray(rng.normal(size=s), jnp.float32) for s in ((4, 5), (4,)))
  primals, tangents = primals + (table, sinks), tangents + (-table, sinks)
  cotangent = jnp.asarray(rng.normal(size=primals[0].shape), jnp.float32)

  def attention(impl):
    def fn(q, k, v, table, sinks):
      return _attention(impl, dict(
          opts, sinks=sinks, score_mod=lambda s, b, h, i, j: s + table[h, jnp.clip(i - j, 0, 4)]),
          plan)(q, k, v)
    return fn

  def derivatives(impl):
    grad = jax.grad(_loss(attention(impl), cotangent), tuple(range(5)))
    return jax.jvp(attention(impl), primals, tangents)[1], jax.jvp(grad, primals, tangents)[1]

  actual, expected = jax.jit(lambda: (derivatives("blockwise"), derivatives("xla")))()
  _assert_close(actual, expected, 1e-4)
  assert all(np.any(np.asarray(h) != 0) for h in actual[1][3:])


def test_jacfwd_matches_jacrev_and_dense(plan):
  primals, _, opts = _problem(B=1, T=5, S=6, N=2, K=1, H=4, is_causal=True, bias=(1, 2, 5, 6))
  args = (0, 1, 2, 3)
  fwd, rev, dense = jax.jit(lambda *p: (
      jax.jacfwd(_attention("blockwise", opts, plan), args)(*p),
      jax.jacrev(_attention("blockwise", opts, plan), args)(*p),
      jax.jacfwd(_attention("xla", opts), args)(*p)))(*primals)
  _assert_close(fwd, dense, 2e-5)
  _assert_close(fwd, rev, 2e-5)


def test_linearize_and_its_transpose(plan):
  primals, tangents, opts = _problem(**CASES["mask_bias_cap_mqa"])
  attention, dense = _attention("blockwise", opts, plan), _attention("xla", opts)

  @jax.jit
  def run(p, t):
    out, f_jvp = jax.linearize(attention, *p)
    # The linearized function transposes (to the hand-written backward pass) into the vjp.
    cotangents = jax.tree.map(lambda x: jnp.where(jnp.isfinite(x), x, 0.0) * 0.5 + 1.0, out)
    transposed = jax.linear_transpose(f_jvp, *p)(cotangents)
    return (out, f_jvp(*t), transposed), (jax.jvp(dense, p, t), jax.vjp(dense, *p)[1](cotangents))

  (out, tangents_out, transposed), ((dense_out, dense_tangents), dense_vjp) = run(
      primals, tangents)
  _assert_close(_finite_lse(out), _finite_lse(dense_out), 2e-5)
  _assert_close(tangents_out, dense_tangents, 2e-5)
  _assert_close(transposed, dense_vjp, 2e-5)


def test_hvp_forward_over_reverse(plan):
  primals, tangents, opts = _problem(**CASES["mask_bias_cap_mqa"])
  cotangent = jnp.asarray(np.random.default_rng(2).normal(size=primals[0].shape), jnp.float32)
  args = tuple(range(len(primals)))

  def hvp(attention):
    grad = jax.grad(_loss(attention, cotangent), args)
    return jax.jvp(grad, primals, tangents)

  (grads, hvps), (dense_grads, dense_hvps) = jax.jit(lambda: (
      hvp(_attention("blockwise", opts, plan)), hvp(_attention("xla", opts))))()
  _assert_close(grads, dense_grads, 2e-5)
  _assert_close(hvps, dense_hvps, 1e-4)


def test_hessian(plan):
  # jacfwd of jacrev: vmap over forward-over-reverse.
  primals, _, opts = _problem(B=1, T=3, S=4, N=2, K=1, H=2, window=(1, 1))
  cotangent = jnp.asarray(np.random.default_rng(2).normal(size=primals[0].shape), jnp.float32)

  def hessian(attention):
    return jax.hessian(lambda q: _loss(attention, cotangent)(q, *primals[1:]))(primals[0])

  actual, expected = jax.jit(lambda: (hessian(_attention("blockwise", opts, plan)),
                                      hessian(_attention("xla", opts))))()
  _assert_close(actual, expected, 1e-4)


def _composed(attention, cotangent, primals, tangents):
  """jvp and grad of ``attention`` composed with vmap and jit."""
  loss = _loss(attention, cotangent)
  return dict(
      jit_vmap_jvp_jit=jax.jit(jax.vmap(lambda p, t: jax.jvp(jax.jit(attention), p, t)))(
          primals, tangents),
      vmap_grad=jax.vmap(jax.grad(loss, (0, 1, 2)))(*primals),
      grad_vmap=jax.grad(lambda *p: jnp.sum(jax.vmap(loss)(*p)), (0, 1, 2))(*primals))


def test_transformations_compose(plan):
  # Unbatched inputs [T, N, H] under vmap, with jit inside and outside.
  primals, tangents, opts = _problem(T=10, S=10, is_causal=True)
  cotangent = jnp.asarray(np.random.default_rng(2).normal(size=primals[0].shape[1:]),
                          jnp.float32)
  expected, actual = jax.jit(lambda p, t: [_composed(_attention(impl, opts, plan), cotangent, p, t)
                                           for impl in ("xla", "blockwise")])(primals, tangents)
  for name in expected:
    _assert_close(actual[name], expected[name], 1e-4, err_msg=name)


def _primitive_counts(jaxpr) -> collections.Counter:
  """How often each primitive occurs in the printed jaxpr, nested jaxprs included."""
  return collections.Counter(re.findall(r"= ([a-z_]+)\[", str(jaxpr)) +
                             re.findall(r"= ([a-z_]+) ", str(jaxpr)))


def test_reverse_mode_runs_the_hand_written_backward(plan, monkeypatch):
  # jax.grad must run the forward sweep once and transpose the tangent into the
  # FlashAttention-2 backward, as a plain custom_vjp of the two would: the same matmuls and
  # loops, and no transposed copy of the forward sweep.
  primals, _, opts = _problem(**CASES["mask_bias_cap_mqa"])
  loss = _loss(_attention("blockwise", opts, plan), jnp.ones_like(primals[0]))
  new = _primitive_counts(jax.make_jaxpr(jax.grad(loss, (0, 1, 2, 3)))(*primals))

  def reference_fwd(plan, *args):
    out5, lse4 = blockwise._forward(plan, *args)
    return (out5, lse4), (*args, out5, lse4)

  reference = jax.custom_vjp(blockwise._forward, nondiff_argnums=(0,))
  reference.defvjp(reference_fwd, blockwise._attend_bwd)
  monkeypatch.setattr(blockwise, "_attend", reference)
  old = _primitive_counts(jax.make_jaxpr(jax.grad(loss, (0, 1, 2, 3)))(*primals))
  for primitive in ("dot_general", "exp", "while", "scan", "cond"):
    assert new[primitive] == old[primitive], (primitive, new[primitive], old[primitive])
  assert old["dot_general"] > 0


def test_jvp_memory_is_linear_in_length(plan, assert_no_quadratic_buffers):
  T = S = 512
  primals, tangents, opts = _problem(B=1, T=T, S=S, N=1, K=1, H=32, is_causal=True)
  attention = lambda *p: attnjax.dot_product_attention(  # noqa: E731
      *p, is_causal=True, implementation="blockwise", block_sizes=(128, 128))
  compiled = jax.jit(lambda p, t: jax.jvp(attention, p, t)).lower(primals, tangents).compile()
  assert_no_quadratic_buffers(compiled, T, S)


# ----------------------------------------------------------------------------- linear_call rules
#
# A toy linear function r * x whose custom "transpose" is deliberately not its transpose
# (7 r ct), so that a result shows which of the two ran.


def _scaled(r, x):
  return linear_call(lambda r, x: r * x, lambda r, ct: 7.0 * r * ct, r, x)


def test_linear_call_rules_are_registered():
  from jax._src.interpreters import ad, batching  # noqa: PLC0415
  assert batching.fancy_primitive_batchers[_linear_call.linear_call_p] is _linear_call._batch
  assert ad.primitive_jvps[_linear_call.linear_call_p] is _linear_call._jvp


def test_linear_call_vmap_keeps_the_custom_transpose():
  r, x, ct = jnp.arange(1.0, 4.0), jnp.arange(2.0, 5.0), jnp.arange(3.0, 6.0)
  np.testing.assert_allclose(jax.vmap(_scaled)(r, x), r * x)
  np.testing.assert_allclose(jax.vmap(_scaled, (0, None))(r, 2.0), r * 2.0)  # x broadcast
  np.testing.assert_allclose(jax.vmap(_scaled, (None, 0))(2.0, x), 2.0 * x)
  # vmap of the transpose, and the transpose of the vmapped call.
  transpose = lambda r, ct: jax.linear_transpose(lambda x: _scaled(r, x), 1.0)(ct)[0]  # noqa: E731
  np.testing.assert_allclose(jax.vmap(transpose)(r, ct), 7.0 * r * ct)
  vmapped = jax.linear_transpose(lambda x: jax.vmap(_scaled)(r, x), x)(ct)[0]
  np.testing.assert_allclose(vmapped, 7.0 * r * ct)
  np.testing.assert_allclose(jax.jit(jax.vmap(jax.grad(_scaled, 1)))(r, x), 7.0 * r)


def test_linear_call_jvp_with_residual_tangents():
  r, x, dr, dx = 3.0, 2.0, 0.5, -1.5
  _, t = jax.jvp(_scaled, (r, x), (dr, dx))
  np.testing.assert_allclose(t, r * dx + dr * x)
  # The linear part keeps its custom transpose: d/dx of the tangent is 7 r.
  np.testing.assert_allclose(jax.grad(lambda x: jax.jvp(_scaled, (r, x), (dr, x))[1])(x),
                             7.0 * r + dr)
  # Forward over reverse: grad_x = 7 r ct, whose derivative along r is 7 dr ct.
  hvp = jax.jvp(lambda r: jax.grad(_scaled, 1)(r, x), (r,), (dr,))[1]
  np.testing.assert_allclose(hvp, 7.0 * dr)
  np.testing.assert_allclose(jax.vmap(lambda r: jax.jvp(_scaled, (r, x), (dr, dx))[1])(
      jnp.arange(3.0)), jnp.arange(3.0) * dx + dr * x)


def test_linear_call_hessian():
  # jacfwd(jacrev): the vmapped JVP rule binds calls on unbatched values, which stay unbatched.
  def f(x, transpose):
    call = linear_call(lambda r, x: r * x, transpose, jnp.sin(x), x)
    return jnp.sum(jnp.sin(call))
  x = jnp.arange(3.0)
  np.testing.assert_allclose(jax.hessian(f)(x, lambda r, ct: r * ct),
                             jax.hessian(lambda x: jnp.sum(jnp.sin(jnp.sin(x) * x)))(x),
                             rtol=1e-6)
