"""Mesh construction and logical-axis rules (8 simulated CPU devices)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from grpo_jax import sharding


def test_mesh_shape_resolution():
  assert sharding.mesh_shape(-1, 1, 1, num_devices=8) == (8, 1, 1)
  assert sharding.mesh_shape(2, -1, 2, num_devices=8) == (2, 2, 2)
  assert sharding.mesh_shape(1, 4, -1, num_devices=8) == (1, 4, 2)
  with pytest.raises(ValueError, match="at most one"):
    sharding.mesh_shape(-1, -1, 1, num_devices=8)
  with pytest.raises(ValueError, match="not divisible"):
    sharding.mesh_shape(-1, 3, 1, num_devices=8)
  with pytest.raises(ValueError, match="8 devices"):
    sharding.mesh_shape(2, 2, 1, num_devices=8)


def test_make_mesh_uses_all_devices():
  assert jax.device_count() == 8, "conftest sets 8 simulated CPU devices"
  mesh = sharding.make_mesh(2, 2, 2)
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
  one = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  assert one.devices.size == 1


def test_logical_to_spec_rules_and_fallbacks():
  mesh = sharding.make_mesh(2, 2, 2)
  assert sharding.logical_to_spec(("embed", "mlp"), (8, 6), mesh) == P("fsdp", "tensor")
  # 3 KV heads are not divisible by tensor = 2: replicated.
  assert sharding.logical_to_spec(("embed", "kv_heads", "head_dim"), (8, 3, 4), mesh) == P(
      "fsdp", None, None)
  # A mesh axis is used once per array: vocab and mlp both want "tensor".
  assert sharding.logical_to_spec(("vocab", "mlp"), (8, 8), mesh) == P("tensor", None)
  assert sharding.logical_to_spec(("batch", None), (8, 3), mesh) == P(("data", "fsdp"), None)
  # Axes of size 1 are dropped; overridable rules.
  mesh81 = sharding.make_mesh(8, 1, 1)
  assert sharding.logical_to_spec(("embed", "mlp"), (8, 8), mesh81) == P(None, None)
  rules = (("embed", "data"),) + sharding.DEFAULT_RULES
  assert sharding.logical_to_spec(("embed", "mlp"), (8, 8), mesh81, rules) == P("data", None)


def test_optimizer_state_follows_params():
  mesh = sharding.make_mesh(2, 2, 2)
  axes = {"w": ("embed", "mlp"), "b": ("mlp",)}
  params = {"w": jnp.ones((8, 6)), "b": jnp.ones((6,))}
  shapes = jax.eval_shape(lambda: params)
  p_sh = sharding.tree_shardings(mesh, axes, shapes)
  opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3))
  o_sh = sharding.optimizer_shardings(mesh, opt, shapes, p_sh)
  state = jax.jit(opt.init, out_shardings=o_sh)(jax.device_put(params, p_sh))
  adam = state[1][0]
  assert adam.mu["w"].sharding.spec == P("fsdp", "tensor")
  assert adam.nu["b"].sharding.spec == P("tensor")
  assert adam.count.sharding.spec == P()
  # Really split: each device holds a quarter of w's mu (fsdp 2 x tensor 2).
  assert adam.mu["w"].addressable_shards[0].data.shape == (4, 3)


def test_shard_batch_rows_over_data_axes():
  mesh = sharding.make_mesh(2, 2, 2)
  x = np.arange(16 * 3).reshape(16, 3)
  y = sharding.shard_batch({"x": x}, mesh)["x"]
  assert y.sharding.spec == P(("data", "fsdp"), None)
  assert y.addressable_shards[0].data.shape == (4, 3)
  np.testing.assert_array_equal(np.asarray(y), x)
