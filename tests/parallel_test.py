"""Tests for attnjax.parallel against single-device dense attention, on 8 forced CPU devices.

The tests marked ``eight_devices`` need ``XLA_FLAGS=--xla_force_host_platform_device_count=8``
before JAX starts, which would change the device count of every other test in the process:
``test_on_eight_devices`` runs them in a subprocess of their own (or run this file alone with
that flag and ``ATTNJAX_EIGHT_DEVICES=1``).
"""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

import attnjax
from attnjax import parallel

_CHILD = os.environ.get("ATTNJAX_EIGHT_DEVICES") == "1"
eight_devices = pytest.mark.skipif(not _CHILD, reason="runs in test_on_eight_devices")
N_DEV = 8


one_device = pytest.mark.skipif(_CHILD, reason="runs in the parent process")


@one_device
def test_on_eight_devices(run_on_eight_devices):
  run_on_eight_devices(__file__)


# ----------------------------------------------------------------------------- one device


def test_zigzag_permute_order_and_inverse():
  x = np.arange(2 * 16 * 3).reshape(2, 16, 3)  # [B, T, ...]; 4 devices: 8 chunks of 2
  y = parallel.zigzag_permute(x, 4, axis=1)
  chunks = [0, 7, 1, 6, 2, 5, 3, 4]  # device d holds chunks d and 7 - d
  np.testing.assert_array_equal(y, np.concatenate([x[:, 2 * c:2 * c + 2] for c in chunks], 1))
  np.testing.assert_array_equal(parallel.zigzag_unpermute(y, 4, axis=1), x)
  ids = np.arange(8)[None]  # one device: the first half, then the second
  np.testing.assert_array_equal(parallel.zigzag_permute(ids, 1, axis=-1), ids)


def test_zigzag_permute_errors():
  with pytest.raises(ValueError, match=r"multiple of 2 \* num_devices = 8, got 12"):
    parallel.zigzag_permute(jnp.zeros((12, 2, 4)), 4)
  with pytest.raises(ValueError, match="num_devices must be a positive int"):
    parallel.zigzag_unpermute(jnp.zeros((12, 2, 4)), 0)


def test_ring_attention_outside_shard_map():
  q = jnp.zeros((8, 2, 4))
  with pytest.raises(ValueError, match="inside jax.shard_map.*'seq'"):
    parallel.ring_attention(q, q, q, axis_name="seq")


@one_device
def test_one_device_mesh_equals_dot_product_attention():
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.normal(size=(2, 32, 2, 8)), jnp.float32) for _ in range(3))
  mesh = Mesh(np.array(jax.devices()[:1]), ("seq",))
  out = jax.jit(functools.partial(parallel.sharded_ring_attention, mesh=mesh, axis_name="seq",
                                  is_causal=True))(q, k, v)
  want = attnjax.dot_product_attention(q, k, v, is_causal=True, implementation="xla")
  np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)


def _brute_force_work(n, length, layout, block, causal, window):
  """Blocks of size ``block`` with a visible logit that each device computes: from the dense
  global mask and the chunks each device holds."""
  i, j = np.arange(length)[:, None], np.arange(length)[None, :]
  visible = np.ones((length, length), bool)
  if causal:
    visible &= j <= i
  if window is not None:
    visible &= (j - i >= -window[0]) & (j - i <= window[1])
  chunks = 1 if layout == "contiguous" else 2
  size = length // (n * chunks)
  held = [[d] if chunks == 1 else [d, 2 * n - 1 - d] for d in range(n)]
  work = np.zeros(n, int)
  for d in range(n):
    for cq in held[d]:
      for src in range(n):
        for ck in held[src]:
          tile = visible[cq * size:(cq + 1) * size, ck * size:(ck + 1) * size]
          b = min(block, size)
          work[d] += tile.reshape(size // b, b, size // b, b).any((1, 3)).sum()
  return work


@pytest.mark.parametrize("layout,causal,window", [
    ("contiguous", True, None), ("zigzag", True, None), ("zigzag", False, (40, 8)),
    ("contiguous", True, (100, 0)), ("zigzag", False, None)])
def test_ring_work_counts_visible_blocks(layout, causal, window):
  work = parallel.ring_work(4, 256, layout=layout, is_causal=causal, local_window_size=window,
                            block_sizes=(8, 8))
  np.testing.assert_array_equal(work, _brute_force_work(4, 256, layout, 8, causal, window))


def test_zigzag_balances_causal_work():
  kwargs = dict(is_causal=True, block_sizes=(512, 512))
  full = parallel.ring_work(8, 131072, block_sizes=(512, 512))
  contiguous = parallel.ring_work(8, 131072, layout="contiguous", **kwargs)
  zigzag = parallel.ring_work(8, 131072, layout="zigzag", **kwargs)
  assert zigzag.max() <= 1.25 * full.max() / 2
  assert zigzag.max() == zigzag.min()
  assert contiguous.max() > 1.8 * full.max() / 2


# ----------------------------------------------------------------------------- eight devices

# Each case: the problem (global lengths) and the options of ring_attention.
CASES = {
    "full_batch_dims": dict(batch=(2, 1)),
    "causal": dict(is_causal=True),
    "causal_zigzag": dict(is_causal=True, layout="zigzag"),
    "window": dict(local_window_size=(5, 3)),
    "packed_documents_causal_window_zigzag": dict(is_causal=True, local_window_size=(12, 0),
                                                  layout="zigzag", segments=True),
    "mqa_soft_cap_scale": dict(is_causal=True, K=1, logits_soft_cap=1.5, scale=0.2),
    "cross_causal": dict(is_causal=True, T=32, S=64),
    # 128 keys: the blockwise path with positions known at run time.
    "all_gather_causal_window": dict(strategy="all_gather", T=128, is_causal=True,
                                     local_window_size=(40, 0), block_sizes=(16, 64)),
    "all_gather_zigzag_documents": dict(strategy="all_gather", layout="zigzag",
                                        is_causal=True, segments=True),
}


def _problem(batch=(2,), T=64, S=None, N=4, K=2, H=8, segments=False, **options):
  S = T if S is None else S
  rng = np.random.default_rng(0)
  q, k, v, dout = (jnp.asarray(rng.normal(size=batch + shape), jnp.float32)
                   for shape in ((T, N, H), (S, K, H), (S, K, H), (T, N, H)))
  if segments:  # documents of random lengths, packed
    ids = jnp.asarray(np.sort(rng.integers(0, 5, batch + (max(T, S),)), -1), jnp.int32)
    options.update(q_segment_ids=ids[..., :T], kv_segment_ids=ids[..., :S])
  return (q, k, v, dout), options


def _results(attend, q, k, v, dout):
  """Output, lse and the gradients of q, k, v of sum(out * dout) + sum(finite lse) / 10."""
  (out, lse), vjp = jax.vjp(attend, q, k, v)
  return (out, lse) + vjp((dout, jnp.where(jnp.isfinite(lse), 0.1, 0.0)))


def _dense(q, k, v, dout, layout=None, strategy=None, block_sizes=None, **options):
  attend = functools.partial(attnjax.dot_product_attention, implementation="xla",
                             return_lse=True, **options)
  return _results(attend, q, k, v, dout)


def _sharded(mesh, q, k, v, dout, layout="contiguous", q_segment_ids=None,
             kv_segment_ids=None, **options):
  """sharded_ring_attention on global arrays in natural order (permuted in and out)."""
  n = mesh.shape["seq"]
  perm = unperm = lambda x, axis=-3: x  # noqa: E731
  if layout == "zigzag":
    perm = functools.partial(parallel.zigzag_permute, num_devices=n)
    unperm = functools.partial(parallel.zigzag_unpermute, num_devices=n)
  segments = {}
  if q_segment_ids is not None:
    segments = dict(q_segment_ids=perm(q_segment_ids, axis=-1),
                    kv_segment_ids=perm(kv_segment_ids, axis=-1))

  def attend(q, k, v):
    out, lse = parallel.sharded_ring_attention(
        perm(q), perm(k), perm(v), mesh=mesh, axis_name="seq", layout=layout,
        return_lse=True, **segments, **options)
    return unperm(out), unperm(lse, axis=-1)
  return jax.jit(lambda q, k, v, dout: _results(attend, q, k, v, dout))(q, k, v, dout)


def _assert_close(got, want):
  names = ("out", "lse", "dq", "dk", "dv")
  for name, g, w in zip(names, got, want):
    assert g.shape == w.shape, (name, g.shape, w.shape)
    if name == "lse":  # -inf for queries that see no key
      np.testing.assert_array_equal(np.isneginf(g), np.isneginf(w))
      g, w = (jnp.where(jnp.isfinite(w), x, 0.0) for x in (g, w))
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=2e-5, err_msg=name)


@eight_devices
@pytest.mark.parametrize("case", list(CASES))
def test_matches_single_device(case):
  arrays, options = _problem(**CASES[case])
  mesh = Mesh(np.array(jax.devices()), ("seq",))
  _assert_close(_sharded(mesh, *arrays, **options), _dense(*arrays, **options))


@eight_devices
def test_inside_shard_map_on_a_2d_mesh():
  """ring_attention called in the user's own shard_map (default checks), batch and sequence
  sharded."""
  (q, k, v, dout), _ = _problem(batch=(2,), T=32)
  mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "seq"))
  spec = P("data", "seq")
  attend = jax.shard_map(
      functools.partial(parallel.ring_attention, axis_name="seq", layout="zigzag",
                        is_causal=True, return_lse=True),
      mesh=mesh, in_specs=(spec,) * 3, out_specs=(spec, P("data", None, "seq")))

  def zigzag(q, k, v):
    out, lse = attend(*(parallel.zigzag_permute(x, 4) for x in (q, k, v)))
    return parallel.zigzag_unpermute(out, 4), parallel.zigzag_unpermute(lse, 4, axis=-1)
  want = _dense(q, k, v, dout, is_causal=True)
  _assert_close(jax.jit(lambda *a: _results(zigzag, *a))(q, k, v, dout), want)


@eight_devices
def test_heads_and_batch_sharded_too():
  """On a mesh with explicit axes, which the wrapper reshards its inputs for."""
  (q, k, v, dout), options = _problem(batch=(2,), T=32, N=4, K=2, segments=True)
  mesh = jax.make_mesh((2, 2, 2), ("data", "tensor", "seq"),
                       axis_types=(jax.sharding.AxisType.Explicit,) * 3)
  attend = functools.partial(parallel.sharded_ring_attention, mesh=mesh, axis_name="seq",
                             batch_axis_name="data", head_axis_name="tensor", is_causal=True,
                             return_lse=True, **options)
  got = jax.jit(lambda *a: _results(attend, *a))(q, k, v, dout)
  _assert_close(got, _dense(q, k, v, dout, is_causal=True, **options))


@eight_devices
def test_sharded_errors():
  mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "seq"))
  x = jnp.zeros((2, 36, 2, 8))
  with pytest.raises(ValueError, match="query length 36 must be a multiple of 8"):
    parallel.sharded_ring_attention(x, x, x, mesh=mesh, axis_name="seq", layout="zigzag")
  with pytest.raises(ValueError, match="query length 30 must be a multiple of 4"):
    y = jnp.zeros((2, 30, 2, 8))
    parallel.sharded_ring_attention(y, y, y, mesh=mesh, axis_name="seq")
  with pytest.raises(ValueError, match="heads must be multiples of the 2 devices"):
    z = jnp.zeros((2, 32, 3, 8))
    parallel.sharded_ring_attention(z, z, z, mesh=mesh, axis_name="seq", head_axis_name="data")
  with pytest.raises(ValueError, match="layout must be one of"):
    parallel.sharded_ring_attention(x[:, :32], x[:, :32], x[:, :32], mesh=mesh,
                                    axis_name="seq", layout="striped")
  with pytest.raises(ValueError, match="strategy must be one of"):
    parallel.sharded_ring_attention(x[:, :32], x[:, :32], x[:, :32], mesh=mesh,
                                    axis_name="seq", strategy="tree")
  odd = jax.shard_map(functools.partial(parallel.ring_attention, axis_name="seq",
                                        layout="zigzag"),
                      mesh=mesh, in_specs=(P(None, "seq"),) * 3, out_specs=P(None, "seq"))
  with pytest.raises(ValueError, match="even local lengths.*got query length 3"):
    odd(*(jnp.zeros((2, 12, 2, 8)),) * 3)
