"""Tests for attnjax.toy.sharding, the logical axes of the modules and the trainer on a
(data, tensor, sequence) mesh, against the same computations on one device.

The tests marked ``eight_devices`` need ``XLA_FLAGS=--xla_force_host_platform_device_count=8``
before JAX starts: ``test_on_eight_devices`` runs them in a subprocess of their own (or run
this file alone with that flag and ``ATTNJAX_EIGHT_DEVICES=1``).
"""

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import attnjax
from attnjax import linen, parallel
from attnjax import nnx as attn_nnx
from attnjax.toy import sharding, train

_CHILD = os.environ.get("ATTNJAX_EIGHT_DEVICES") == "1"
eight_devices = pytest.mark.skipif(not _CHILD, reason="runs in test_on_eight_devices")
one_device = pytest.mark.skipif(_CHILD, reason="runs in the parent process")


def smoke_config(mesh_shape=None):
  import configs.copy as copy_config  # (configs/ is importable from the repository root)
  config = copy_config.get_config("smoke")
  with config.unlocked():
    config.mesh.shape = mesh_shape
    config.plots = False
  return config


@one_device
def test_on_eight_devices(run_on_eight_devices):
  run_on_eight_devices(__file__)


# ----------------------------------------------------------------------------- one device


def test_params_are_plain_arrays_without_rules_and_boxed_with_them():
  module = linen.MultiHeadAttention(num_heads=4, num_kv_heads=2, sinks=True)
  x = jnp.ones((2, 3, 8))
  plain = module.init(jax.random.key(0), x)
  assert all(isinstance(leaf, jax.Array) for leaf in jax.tree.leaves(
      plain, is_leaf=lambda v: isinstance(v, nn.LogicallyPartitioned)))
  with nn.logical_axis_rules(sharding.DEFAULT_RULES):
    boxed = module.init(jax.random.key(0), x)
  specs = nn.get_partition_spec(boxed)["params"]
  assert specs["query"]["kernel"] == P("embed", "heads", "head_dim")
  assert specs["key"]["bias"] == P("kv_heads", "head_dim")
  assert specs["out"]["kernel"] == P("heads", "head_dim", "embed")
  assert specs["sinks"] == P("heads")
  jax.tree.map(np.testing.assert_array_equal, nn.unbox(boxed), plain)
  np.testing.assert_array_equal(module.apply(boxed, x), module.apply(plain, x))


def test_nnx_params_carry_the_same_logical_axes():
  module = attn_nnx.MultiHeadAttention(8, 4, num_kv_heads=2, rngs=nnx.Rngs(0))
  with nn.logical_axis_rules(sharding.DEFAULT_RULES):
    specs = nnx.get_partition_spec(nnx.state(module, nnx.Param))
  assert specs["query"]["kernel"].get_value() == P(None, "tensor", None)
  assert specs["key"]["bias"].get_value() == P("tensor", None)
  assert specs["out"]["kernel"].get_value() == P("tensor", None, None)


@pytest.mark.parametrize("shape, message", [
    ((3, 1, 1), "does not fit the 1 devices"), ((1, 2), "sizes >= 1"),
    ((1, -1, 1), "sizes >= 1")])
def test_make_mesh_errors(shape, message):
  with pytest.raises(ValueError, match=message):
    sharding.make_mesh(shape, jax.devices()[:1])


# ----------------------------------------------------------------------------- eight devices


def assert_same_sharding(a, b):
  assert (a.mesh, a.spec) == (b.mesh, b.spec), (a, b)


@eight_devices
@pytest.mark.parametrize("num_kv_heads, kv_spec", [(2, P(None, "tensor", None)),
                                                   (1, P(None, None, None))])
def test_logical_shardings_of_grouped_query_heads(num_kv_heads, kv_spec):
  mesh = sharding.make_mesh((2, 2, 2))
  module = linen.MultiHeadAttention(num_heads=4, num_kv_heads=num_kv_heads)
  with nn.logical_axis_rules(sharding.DEFAULT_RULES):
    boxed = jax.eval_shape(module.init, jax.random.key(0), jnp.ones((2, 6, 8)))
  shardings = sharding.logical_shardings(boxed, mesh)["params"]
  assert shardings["query"]["kernel"].spec == P(None, "tensor", None)
  assert shardings["key"]["kernel"].spec == kv_spec  # one head cannot split over two
  assert shardings["out"]["bias"].spec == P(None)


@eight_devices
def test_nnx_params_are_sharded_at_creation_under_a_mesh_and_rules():
  mesh = sharding.make_mesh((2, 2, 2))
  with jax.set_mesh(mesh):
    plain = attn_nnx.MultiHeadAttention(8, 4, num_kv_heads=2, rngs=nnx.Rngs(0))
    with nn.logical_axis_rules(sharding.DEFAULT_RULES):
      sharded = attn_nnx.MultiHeadAttention(8, 4, num_kv_heads=2, rngs=nnx.Rngs(0))
  assert sharded.key.kernel[...].sharding.spec == P(None, "tensor", None)
  assert plain.key.kernel[...].sharding.is_fully_replicated  # no rules: not sharded
  np.testing.assert_array_equal(sharded.key.kernel[...], plain.key.kernel[...])


@eight_devices
@pytest.mark.parametrize("length, options", [
    (17, dict(is_causal=True)), (12, dict()), (9, dict(mask="padding"))])
def test_ring_attention_fn_matches_dense_attention(length, options):
  mesh = sharding.make_mesh((2, 2, 2))
  fn = parallel.ring_attention_fn(mesh, "sequence", batch_axis_name="data",
                                  head_axis_name="tensor")
  rng = np.random.default_rng(0)
  q = rng.standard_normal((4, length, 4, 8)).astype(np.float32)
  k, v = (rng.standard_normal((4, length, 2, 8)).astype(np.float32) for _ in range(2))
  if options.get("mask") == "padding":
    mask = rng.random((4, 1, 1, length)) < 0.6
    mask[..., 0] = True
    options = dict(mask=mask)
  expected = attnjax.dot_product_attention(q, k, v, **options)
  np.testing.assert_allclose(jax.jit(lambda q, k, v: fn(q, k, v, **options))(q, k, v),
                             expected, rtol=1e-5, atol=1e-5)
  first = {name: x[:1] if name == "mask" else x for name, x in options.items()}
  np.testing.assert_allclose(fn(q[:1], k[:1], v[:1], **first), expected[:1],
                             rtol=1e-5, atol=1e-5)  # a batch that data does not divide


@eight_devices
def test_train_step_on_a_2x2x2_mesh_matches_one_device_and_checkpoints_move(tmp_path):
  one = train.Experiment(smoke_config(), devices=jax.devices()[:1])
  mesh = train.Experiment(smoke_config((2, 2, 2)))
  assert one.model.config.self_attention_fn is None
  assert mesh.model.config.self_attention_fn is not None  # ring attention over "sequence"
  state_one, state_mesh = one.init_state(), mesh.init_state()
  kernel = state_mesh.params["encoder"]["layer_0"]["self_attention"]["query"]["kernel"]
  assert kernel.sharding.spec == P(None, "tensor", None)
  assert state_mesh.params["decoder"]["layer_0"]["mlp"]["wi"]["kernel"].sharding.spec == P(
      None, "tensor")
  # Adam's moments are sharded like the parameters; the step counts are replicated.
  clip, (adam, schedule) = state_mesh.opt_state
  for moments in (adam.mu, adam.nu):
    jax.tree.map(lambda m, p: assert_same_sharding(m.sharding, p.sharding), moments,
                 state_mesh.params)
    assert moments["encoder"]["layer_0"]["self_attention"]["query"]["kernel"].sharding.spec \
        == P(None, "tensor", None)
  assert adam.count.sharding.is_fully_replicated and schedule.count.sharding.is_fully_replicated
  # Each step's batch is fed as a global array over data: the rows of the one-device
  # stream, each device holding its data block (and tensor, sequence replicas of it).
  batch = mesh.sample_train_batch(3)
  expected = one.task.sample(jax.random.fold_in(one.train_key, 3), one.config.train.batch_size)
  for name, x in batch.items():
    assert x.sharding == mesh.data_sharding, name
    np.testing.assert_array_equal(x, expected[name], err_msg=name)
    for shard in x.addressable_shards:
      np.testing.assert_array_equal(shard.data, expected[name][shard.index], err_msg=name)
  close = dict(rtol=2e-5, atol=2e-6)
  jax.tree.map(np.testing.assert_array_equal, state_mesh.params, state_one.params)
  for _ in range(2):
    state_one, metrics_one = one.train_step(state_one)
    state_mesh, metrics_mesh = mesh.train_step(state_mesh)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, **close), metrics_mesh,
                 metrics_one)
  # Key biases shift every logit of a query equally: their true gradient is zero, so Adam
  # turns the rounding noise in it into steps of either sign; all else must agree.
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(state_mesh.params)[0],
                          jax.tree.leaves(state_one.params)):
    if "'key']['bias'" not in jax.tree_util.keystr(path):
      np.testing.assert_allclose(a, b, **close, err_msg=jax.tree_util.keystr(path))

  # Saved on the mesh, restored on one device with that device's shardings, continued.
  with ocp.CheckpointManager(tmp_path, item_handlers=ocp.StandardCheckpointHandler()) as m:
    m.save(2, args=ocp.args.StandardSave(state_mesh))
    m.wait_until_finished()
    restored = m.restore(2, args=ocp.args.StandardRestore(one.abstract_state()))
  assert kernel.sharding.device_set != restored.params["encoder"]["layer_0"][
      "self_attention"]["query"]["kernel"].sharding.device_set
  assert jax.tree.map(lambda x: x.sharding, restored) == one.state_sharding
  jax.tree.map(np.testing.assert_array_equal, restored.opt_state, state_mesh.opt_state)
  _, metrics_restored = one.train_step(restored)
  _, metrics_one = one.train_step(state_one)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, **close), metrics_restored,
               metrics_one)
