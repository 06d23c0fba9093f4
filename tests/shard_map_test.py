"""attnjax under jax.shard_map on a mesh of 8 CPU devices (run in a subprocess)."""

import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import functools
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, PartitionSpec as P
    import attnjax

    assert jax.device_count() == 8, jax.devices()
    mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "seq"))
    kq, kk, kv = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(kq, (4, 16, 4, 8))
    k = jax.random.normal(kk, (4, 32, 2, 8))
    v = jax.random.normal(kv, (4, 32, 2, 8))
    kv_valid = jnp.arange(32) < jnp.array([32, 20, 9, 3])[:, None]
    mask = kv_valid[:, None, None, :]
    full = attnjax.dot_product_attention(q, k, v, mask=mask, implementation="xla")

    # Data parallel: the batch is split over "data", every device attends to its own rows.
    @functools.partial(jax.shard_map, mesh=mesh, in_specs=(P("data"),) * 4, out_specs=P("data"))
    def data_parallel(q, k, v, mask):
      return attnjax.dot_product_attention(q, k, v, mask=mask)
    np.testing.assert_allclose(jax.jit(data_parallel)(q, k, v, mask), full, atol=1e-5)

    # Sequence parallel over the keys: each device attends to its quarter of the keys and the
    # partial results merge by their log-sum-exp (keys 24.. are masked out for some rows, so
    # some parts are empty).
    @functools.partial(jax.shard_map, mesh=mesh,
                       in_specs=(P("data"), P("data", "seq"), P("data", "seq"),
                                 P("data", None, None, "seq")),
                       out_specs=P("data"), check_vma=False)  # all_gather makes it replicated
    def key_parallel(q, k, v, mask):
      out, lse = attnjax.dot_product_attention(q, k, v, mask=mask, return_lse=True)
      outs = jax.lax.all_gather(out, "seq")
      lses = jax.lax.all_gather(lse, "seq")
      merged, _ = attnjax.merge_attention(list(outs), list(lses))
      return merged
    np.testing.assert_allclose(jax.jit(key_parallel)(q, k, v, mask), full, atol=1e-5)

    # Packed documents on the blockwise path, which skips the blocks between documents at run
    # time (lax.cond), under shard_map's type checks: values and gradients match one device.
    from attnjax import masks
    T = 256
    kq, kk, kv = jax.random.split(jax.random.key(1), 3)
    q, k, v = (jax.random.normal(key, (4, T, 2, 8)) for key in (kq, kk, kv))
    ids = jnp.cumsum(jax.random.uniform(jax.random.key(2), (4, T)) < 0.02, axis=1)
    for block_sizes in [(128, 128), (16, 16)]:  # unrolled, then lax loops
      def attend(q, k, v, ids):
        return attnjax.dot_product_attention(
            q, k, v, mask=masks.Segments(ids, ids) & masks.Causal(),
            implementation="blockwise", block_sizes=block_sizes)
      grads = jax.grad(lambda *a: jnp.sum(jnp.sin(attend(*a))), (0, 1, 2))
      sharded = jax.shard_map(lambda *a: (attend(*a), grads(*a)), mesh=mesh,
                              in_specs=P("data"), out_specs=P("data"))
      got = jax.jit(sharded)(q, k, v, ids)
      want = (attend(q, k, v, ids), grads(q, k, v, ids))
      for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(g, w, atol=2e-6)
    print("ok")
""")


def test_data_and_key_parallel_attention_under_shard_map():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu")
  result = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True,
                          text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-4000:]
  assert result.stdout.strip().endswith("ok")
