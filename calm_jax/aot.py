"""Ahead-of-time compilation of the train step for a target topology (`calm-train --compile_only`).

Lets a user check the sharding and the per-device memory of, say, CALM-XL on a
TPU pod from a CPU machine. With `--topology` (e.g. 'v5p-64') and a TPU
compiler available, the step is compiled for that topology; otherwise it is
lowered and compiled for the local devices (simulate N with
JAX_NUM_CPU_DEVICES=N), and the per-device parameter and optimizer memory is
computed from the shardings, which is exact for any backend.
"""
import json
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np

from calm_jax import config_lib
from calm_jax import sharding
from calm_jax import steps as steps_lib
from calm_jax import user_errors


def topology_devices(name):
  """Devices of a named TPU topology, e.g. 'v5p-64'; a clear error when unavailable."""
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  try:
    return topologies.get_topology_desc(name, "tpu").devices
  except Exception as e:  # pylint: disable=broad-except
    raise user_errors.UserError(
        f"--topology={name}: no TPU compiler is available here ({type(e).__name__}: {e}). "
        "Drop --topology and simulate the device count with JAX_NUM_CPU_DEVICES=N instead.")


def _per_device_bytes(abstract_tree, shardings):
  """Bytes one device holds for a tree, from each leaf's shard shape."""
  total = 0
  for leaf, s in zip(jax.tree.leaves(abstract_tree), jax.tree.leaves(shardings)):
    total += int(np.prod(s.shard_shape(leaf.shape))) * jnp.dtype(leaf.dtype).itemsize
  return total


def _abstract(tree, shardings):
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)


def compile_train_step(config, parts, mesh, axis_rules, compile_step=True):
  """Lowers (and compiles) the train step; returns the memory and FLOP report."""
  batch_sharding = sharding.batch_sharding(mesh, axis_rules)
  replicated = sharding.replicated(mesh)
  state = _abstract(parts["abstract_state"], parts["state_shardings"])
  frozen = _abstract(parts["abstract_frozen"], parts["frozen_shardings"])
  shape = (config.train.batch_size, config.data.seq_len)
  batch = {"tokens": jax.ShapeDtypeStruct(shape, jnp.int32, sharding=batch_sharding),
           "mask": jax.ShapeDtypeStruct(shape, jnp.int32, sharding=batch_sharding)}
  rng = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=replicated)
  step_fn = jax.jit(
      steps_lib.make_train_step(parts["model"], parts["tx"], parts["schedule"],
                                config.train.grad_accum_steps),
      in_shardings=(parts["state_shardings"], parts["frozen_shardings"], batch_sharding,
                    replicated),
      out_shardings=(parts["state_shardings"], replicated), donate_argnums=(0,))
  lowered = step_fn.lower(state, frozen, batch, rng)
  gib = 1024.0 ** 3
  report = {
      "mesh": dict(mesh.shape),
      "devices": int(mesh.devices.size),
      "device_kind": str(mesh.devices.flat[0].device_kind),
      "params_total": int(sum(np.prod(x.shape) for x in jax.tree.leaves(state.params))),
      "frozen_params_total": int(sum(np.prod(x.shape) for x in jax.tree.leaves(frozen))),
      "per_device_gib": {
          "params": _per_device_bytes(state.params, parts["state_shardings"].params) / gib,
          "optimizer": _per_device_bytes(state.opt_state, parts["state_shardings"].opt_state)
                       / gib,
          "frozen_params": _per_device_bytes(frozen, parts["frozen_shardings"]) / gib,
      },
  }
  if compile_step:
    compiled = lowered.compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    if cost and "flops" in cost:
      report["flops_per_step_per_device"] = float(cost["flops"])
      if config.model.scan_layers:
        # XLA's cost analysis counts a loop body once: a scanned stack shows one layer.
        report["flops_note"] = ("scanned layers are counted once; pass "
                                "--config.model.scan_layers=False for the full count")
    memory = compiled.memory_analysis()
    if memory is not None:
      report["per_device_gib"]["compiled_temp"] = memory.temp_size_in_bytes / gib
      report["per_device_gib"]["compiled_arguments"] = memory.argument_size_in_bytes / gib
  return report


def write_report(report, workdir):
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, "compile_report.json")
  with open(path, "w") as f:
    json.dump(report, f, indent=2)
  lines = [f"mesh {report['mesh']} on {report['devices']} x {report['device_kind']}",
           f"trainable params {report['params_total']:,}  frozen {report['frozen_params_total']:,}"]
  lines += [f"  per device {k:<20s} {v:8.3f} GiB" for k, v in report["per_device_gib"].items()]
  if "flops_per_step_per_device" in report:
    lines.append(f"  FLOPs per step per device {report['flops_per_step_per_device']:.3e}"
                 + (f" ({report['flops_note']})" if "flops_note" in report else ""))
  print("\n".join(lines))
  logging.info("Wrote %s", path)
  return path


def paper_autoencoder_config(config):
  """The paper's base autoencoder with this CALM config's K, l and vocabulary.

  Used by --compile_only when config.autoencoder.workdir is not given: the
  memory check of a CALM run should not need a trained stage 1.
  """
  here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  ae = config_lib.load_config_file(
      os.path.join(here, "experiments", f"autoencoder.py:size=base,K={config.model.patch_size}"))
  ae.model.latent_dim = config.model.latent_dim
  ae.model.vocab_size = ae.data.vocab_size = config.model.vocab_size
  return ae
