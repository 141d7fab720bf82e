"""Mesh construction, the logical rules table and activation constraints under jax.set_mesh."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from calm_jax.parallel import sharding
from experiments import common

pytestmark = pytest.mark.integration


def _mesh_config(data=-1, fsdp=1, tensor=1):
  c = common.mesh_config()
  c.data, c.fsdp, c.tensor = data, fsdp, tensor
  return c


def _rules():
  return sharding.rules(ml_collections.ConfigDict({"mesh": common.mesh_config()}))


def test_mesh_shape_resolves_minus_one():
  assert sharding.mesh_shape(_mesh_config(-1, 2, 2), 8) == (2, 2, 2)
  assert sharding.mesh_shape(_mesh_config(1, -1, 1), 8) == (1, 8, 1)
  with pytest.raises(sharding.MeshError, match="config.mesh"):
    sharding.mesh_shape(_mesh_config(3, 1, 1), 8)
  with pytest.raises(sharding.MeshError, match="at most one"):
    sharding.mesh_shape(_mesh_config(-1, -1, 1), 8)


def test_make_mesh_uses_all_devices():
  mesh = sharding.make_mesh(_mesh_config(-1, 2, 2))
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
  assert sharding.batch_shards(mesh, _rules()) == 4


class _Tiny(nn.Module):

  @nn.compact
  def __call__(self, x_BxD):
    w = self.param("w", nn.with_logical_partitioning(nn.initializers.ones, ("embed", "mlp")),
                   (x_BxD.shape[-1], 16))
    h_BxF = x_BxD @ w
    return nn.with_logical_constraint(h_BxF, ("batch", "act_mlp"))


def test_param_shardings_follow_rules():
  mesh = sharding.make_mesh(_mesh_config(-1, 2, 2))
  model = _Tiny()
  boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.ones((8, 8))))
  shardings = sharding.tree_shardings(boxed, mesh, _rules())
  assert shardings["params"]["w"].spec == jax.sharding.PartitionSpec("fsdp", "tensor")


def test_activation_constraint_applies_inside_activate():
  mesh = sharding.make_mesh(_mesh_config(-1, 1, 2))
  model = _Tiny()
  params = nn.unbox(model.init(jax.random.key(0), jnp.ones((8, 8))))
  fn = jax.jit(lambda p, x: model.apply(p, x))
  x = jnp.ones((8, 8))
  with sharding.activate(mesh, _rules()):
    out = fn(params, x)
    text = fn.lower(params, x).as_text()
  # The constraint is in the lowered program and the output follows it.
  assert "sharding" in text and "tensor" in text
  assert out.sharding.spec == jax.sharding.PartitionSpec("data", "tensor")
  # Outside the mesh context the constraint is silently a no-op (the trap we avoid).
  unconstrained = jax.jit(lambda p, x: model.apply(p, x))
  with nn.logical_axis_rules(_rules()):
    plain = unconstrained.lower(params, x).as_text()
  assert "custom_call_target=\"Sharding\"" not in plain and "sdy.sharding_constraint" not in plain


def test_to_global_batch_is_sharded_over_batch_axes():
  mesh = sharding.make_mesh(_mesh_config(-1, 2, 1))
  local = {"tokens": np.arange(32, dtype=np.int32).reshape(8, 4)}
  out = sharding.to_global_batch(local, sharding.batch_sharding(mesh, _rules()))
  np.testing.assert_array_equal(np.asarray(out["tokens"]), local["tokens"])
  assert len(out["tokens"].sharding.device_set) == 8
  assert out["tokens"].addressable_shards[0].data.shape == (1, 4)
