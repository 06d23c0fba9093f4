"""Sharding the toy models over a ``(data, tensor, sequence)`` mesh by logical axis rules.

The modules name the axes of their parameters and activations (``batch``, ``length``,
``embed``, ``heads``, ``kv_heads``, ``head_dim``, ``mlp``, ``vocab``; see
:data:`attnjax.multihead.PARAM_AXES` and :func:`attnjax.linen.with_logical_axes`); a rules
table maps each name to a mesh axis or to None (replicated). With :data:`DEFAULT_RULES`, the
batch is split over ``data`` (data parallelism), heads and MLP and vocabulary columns over
``tensor`` (tensor parallelism, Megatron-style) and the sequence over ``sequence`` (sequence
parallelism, with ring attention in self-attention). A mesh axis of size 1 shards nothing, so
one rules table serves every mesh shape.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

#: The mesh axes, in the order of config.mesh.shape.
MESH_AXES = ("data", "tensor", "sequence")
#: Logical axis name -> mesh axis (None: replicated), in Flax's rules format.
DEFAULT_RULES: tuple[tuple[str, str | None], ...] = (
    ("batch", "data"),
    ("length", "sequence"),
    ("embed", None),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
)


def make_mesh(shape: Sequence[int | None] | None = None, devices=None) -> Mesh:
  """A ``(data, tensor, sequence)`` mesh over ``devices``.

  Args:
    shape: ``(data, tensor, sequence)`` sizes; a data size of -1 or None takes every device
      that the other two leave; None means ``(-1, 1, 1)`` (data parallelism only).
    devices: the devices, default ``jax.devices()`` (every process's, in multi-process runs).

  Returns:
    A ``jax.sharding.Mesh`` with axes :data:`MESH_AXES`.

  Raises:
    ValueError: if ``shape`` is not three sizes, or they do not multiply to the number of
      devices.
  """
  devices = np.asarray(jax.devices() if devices is None else devices).reshape(-1)
  shape = (-1, 1, 1) if shape is None else tuple(shape)
  if len(shape) != 3 or not all(s is None or (isinstance(s, int) and (s >= 1 or s == -1))
                                for s in shape) or shape[1] in (None, -1) or shape[2] in (None, -1):
    raise ValueError(f"mesh shape must be (data, tensor, sequence) sizes >= 1, data may be -1 "
                     f"or None, got {shape!r}")
  tensor, sequence = shape[1], shape[2]
  data = devices.size // (tensor * sequence) if shape[0] in (None, -1) else shape[0]
  if data * tensor * sequence != devices.size or data < 1:
    raise ValueError(f"mesh shape {shape!r} does not fit the {devices.size} devices")
  return Mesh(devices.reshape(data, tensor, sequence), MESH_AXES)


def logical_shardings(tree: Any, mesh: Mesh, rules=DEFAULT_RULES) -> Any:
  """The ``NamedSharding`` of every leaf of an (abstract) pytree with logical axes.

  Args:
    tree: a pytree whose leaves are arrays or ``jax.ShapeDtypeStruct`` (e.g. from
      ``jax.eval_shape``), some boxed as ``nn.LogicallyPartitioned`` (created under
      ``nn.logical_axis_rules``).
    mesh: the mesh.
    rules: the logical axis rules.

  Returns:
    A pytree of ``NamedSharding`` in the structure of ``nn.unbox(tree)``. A boxed leaf is
    sharded by its logical axes, except on dims that its mesh axes do not divide (those are
    replicated: e.g. one key/value head with two tensor devices). Unboxed leaves are
    replicated. (Optimizer moments made by ``optax`` from boxed parameters are boxed
    alike, so they are sharded as their parameters.)
  """
  specs = nn.get_partition_spec(tree)
  specs = nn.logical_to_mesh(specs, rules)
  values = nn.unbox(tree)

  def sharding(value, spec):
    if not isinstance(spec, P):
      return NamedSharding(mesh, P())
    axes = [a if a is None or value.shape[i] % _size(mesh, a) == 0 else None
            for i, a in enumerate(tuple(spec) + (None,) * (value.ndim - len(spec)))]
    return NamedSharding(mesh, P(*axes))
  return jax.tree.map(sharding, values, specs)


def _size(mesh: Mesh, axes) -> int:
  return int(np.prod([mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes)]))
