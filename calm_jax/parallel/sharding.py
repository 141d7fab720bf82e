"""Device mesh from the config, logical axis rules, and the shardings of param trees and batches.

Params carry logical axis names (nn.with_logical_partitioning); the rules table
in `config.mesh.rules` maps them to the mesh axes ('data', 'fsdp', 'tensor').
Changing the parallelism is editing that table or the mesh sizes, not the model.
"""
import contextlib
import math

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from calm_jax import errors

MESH_AXES = ("data", "fsdp", "tensor")


class MeshError(errors.UserError, ValueError):
  """A mesh config that does not fit the devices or the batch."""


def mesh_shape(mesh_config, num_devices):
  """Resolves the (data, fsdp, tensor) sizes; one axis may be -1 for 'the rest'."""
  sizes = [mesh_config.data * mesh_config.dcn_data if mesh_config.data > 0 else -1,
           mesh_config.fsdp, mesh_config.tensor]
  if sizes.count(-1) > 1:
    raise MeshError("config.mesh: at most one of data/fsdp/tensor may be -1.")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % known:
      raise MeshError(
          f"config.mesh: {num_devices} devices are not divisible by the fixed axes "
          f"(product {known}); change config.mesh.fsdp/tensor.")
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise MeshError(
        f"config.mesh: data x fsdp x tensor = {sizes} uses {math.prod(sizes)} devices "
        f"but {num_devices} are available; set one axis to -1 or fix the sizes.")
  return tuple(sizes)


def make_mesh(mesh_config, devices=None):
  """Builds the ('data', 'fsdp', 'tensor') mesh; multi-slice puts dcn_data across slices."""
  devices = list(devices if devices is not None else jax.devices())
  shape = mesh_shape(mesh_config, len(devices))
  axis_types = (AxisType.Auto,) * len(MESH_AXES)
  if mesh_config.dcn_data > 1:
    if shape[0] % mesh_config.dcn_data:
      raise MeshError(
          f"config.mesh.dcn_data={mesh_config.dcn_data} must divide the data axis {shape[0]}.")
    ici = (shape[0] // mesh_config.dcn_data, shape[1], shape[2])
    dcn = (mesh_config.dcn_data, 1, 1)
    grid = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices)
    return Mesh(grid, MESH_AXES, axis_types=axis_types)
  return jax.make_mesh(shape, MESH_AXES, axis_types=axis_types, devices=devices)


def rules(config):
  """The logical-name -> mesh-axes table as the tuple of pairs flax expects."""
  return tuple((name, tuple(axes) if isinstance(axes, list) else axes)
               for name, axes in config.mesh.rules)


@contextlib.contextmanager
def activate(mesh, axis_rules):
  """Mesh + rules in scope, so that nn.with_logical_constraint really constrains."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(axis_rules):
    yield


def tree_shardings(abstract_tree, mesh, axis_rules):
  """NamedShardings for a tree of (possibly LogicallyPartitioned) abstract arrays."""
  specs = nn.get_partition_spec(abstract_tree)
  return nn.logical_to_mesh_sharding(specs, mesh, axis_rules)


def logical_sharding(mesh, axis_rules, *names):
  """The NamedSharding for one array with the given logical axis names."""
  return NamedSharding(mesh, nn.logical_to_mesh_axes(names, axis_rules))


def batch_sharding(mesh, axis_rules):
  """Sharding of a [B, L] batch: B over the mesh axes that the 'batch' rule names."""
  return logical_sharding(mesh, axis_rules, "batch", "length")


def batch_shards(mesh, axis_rules):
  """How many ways the batch dimension is split."""
  spec = nn.logical_to_mesh_axes(("batch",), axis_rules)[0]
  if spec is None:
    return 1
  axes = (spec,) if isinstance(spec, str) else spec
  return math.prod(mesh.shape[a] for a in axes)


def to_global_batch(local_batch, sharding):
  """Per-process numpy batch -> global jax.Arrays (each process holds its own rows)."""
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
      local_batch)


def replicated(mesh):
  return NamedSharding(mesh, PartitionSpec())
