"""calm-train --compile_only: the train step lowered and compiled for a mesh or a TPU topology, with its memory and FLOP report.

No data and no training: the step is the loop's own (steps.jit_train_step) on abstract
state, batch and rng. A CALM config needs its autoencoder's config: the linked run's,
or the one the caller passes (cli/train.py: the paper's base autoencoder).
"""
import jax
import jax.numpy as jnp
import numpy as np

from calm_jax import config as config_lib
from calm_jax import stages
from calm_jax.parallel import aot
from calm_jax.parallel import sharding
from calm_jax.training import state as state_lib
from calm_jax.training import steps as steps_lib


def compile_train_step(config, parts, mesh, axis_rules, compile_step=True):
  """Lowers (and compiles) the train step; returns the memory and FLOP report."""
  batch_sharding = sharding.batch_sharding(mesh, axis_rules)
  state = aot.abstract(parts["abstract_state"], parts["state_shardings"])
  frozen = aot.abstract(parts["abstract_frozen"], parts["frozen_shardings"])
  shape = jax.ShapeDtypeStruct((config.train.batch_size, config.data.seq_len), jnp.int32,
                               sharding=batch_sharding)
  rng = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=sharding.replicated(mesh))
  step_fn = steps_lib.jit_train_step(parts, mesh, axis_rules, config.train.grad_accum_steps)
  lowered = step_fn.lower(state, frozen, {"tokens": shape, "mask": shape}, rng)
  gib = aot.GIB
  report = {
      "mesh": dict(mesh.shape),
      "devices": int(mesh.devices.size),
      "device_kind": str(mesh.devices.flat[0].device_kind),
      "params_total": int(sum(np.prod(x.shape) for x in jax.tree.leaves(state.params))),
      "frozen_params_total": int(sum(np.prod(x.shape) for x in jax.tree.leaves(frozen))),
      "per_device_gib": {
          "params": aot.per_device_bytes(state.params, parts["state_shardings"].params) / gib,
          "optimizer": aot.per_device_bytes(state.opt_state, parts["state_shardings"].opt_state)
                       / gib,
          "frozen_params": aot.per_device_bytes(frozen, parts["frozen_shardings"]) / gib,
      },
  }
  ae_model = parts["ae_config"].model if parts.get("ae_config") else None
  per_token = stages.train_flops_per_token(config, ae_model)
  tokens = config.train.batch_size * config.data.seq_len
  report["flops_per_token"] = per_token["total"]
  report["flops_per_token_parts"] = {k: v for k, v in per_token.items() if k != "total"}
  report["flops_per_step_per_device"] = per_token["total"] * tokens / report["devices"]
  compiled = aot.compile_report(lowered, compile_step)
  if "flops_per_step_per_device" in compiled:
    report["xla_flops_per_step_per_device"] = compiled["flops_per_step_per_device"]
    if config.model.scan_layers or config.train.grad_accum_steps > 1:
      # XLA's cost analysis counts a loop body once: a scanned stack shows one layer.
      report["flops_note"] = ("loop bodies (scanned layers, gradient accumulation) counted "
                              "once; the analytic count above is the step's")
  for key, value in compiled.items():
    if key.startswith("compiled_"):
      report["per_device_gib"][key[:-len("_gib")]] = value
  return report


def compile_only(config, workdir, topology=None, ae_config=None):
  """The memory and FLOP report of one train step (also WORKDIR/compile_report.json).

  ae_config: a CALM config's autoencoder config when config.autoencoder.workdir is empty.
  """
  stages.validate(config, require_autoencoder=False)
  if stages.get(config).needs_autoencoder and not config.autoencoder.workdir and not ae_config:
    raise config_lib.ConfigError("compile_only: a CALM config without config.autoencoder.workdir "
                                 "needs the autoencoder's config (ae_config).")
  devices = aot.topology_devices(topology) if topology else None
  mesh = sharding.make_mesh(config.mesh, devices)
  axis_rules = sharding.rules(config)
  with sharding.activate(mesh, axis_rules):
    parts = state_lib.build(config, mesh, axis_rules, ae_config=ae_config)
    report = compile_train_step(config, parts, mesh, axis_rules)
  aot.write_report(report, workdir)
  return report
