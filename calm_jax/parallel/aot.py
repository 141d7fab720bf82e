"""Ahead-of-time compilation for a target topology: lower and compile a jitted step, report its per-device memory and FLOPs.

Lets a user check the sharding and the per-device memory of, say, CALM-XL on a
TPU pod from a CPU machine. With a TPU topology (e.g. 'v5p-64') and a TPU compiler
available, the step is compiled for that topology; otherwise it is lowered and
compiled for the local devices (simulate N with JAX_NUM_CPU_DEVICES=N), and the
per-device memory of the arguments is computed from their shardings, which is exact
for any backend. `calm-train --compile_only` (training/compile.py) uses it on the
train step.
"""
import json
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np

from calm_jax import errors

GIB = 1024.0 ** 3


def topology_devices(name):
  """Devices of a named TPU topology, e.g. 'v5p-64'; a clear error when unavailable."""
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  try:
    return topologies.get_topology_desc(name, "tpu").devices
  except Exception as e:  # pylint: disable=broad-except
    raise errors.UserError(
        f"--topology={name}: no TPU compiler is available here ({type(e).__name__}: {e}). "
        "Drop --topology and simulate the device count with JAX_NUM_CPU_DEVICES=N instead.")


def per_device_bytes(abstract_tree, shardings):
  """Bytes one device holds for a tree, from each leaf's shard shape."""
  total = 0
  for leaf, s in zip(jax.tree.leaves(abstract_tree), jax.tree.leaves(shardings)):
    total += int(np.prod(s.shard_shape(leaf.shape))) * jnp.dtype(leaf.dtype).itemsize
  return total


def abstract(tree, shardings):
  """ShapeDtypeStructs of `tree` carrying `shardings` (what lower() takes)."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)


def compile_report(lowered, compile_step=True):
  """XLA's analysis of a lowered step: {'flops_per_step_per_device' (XLA's count: a loop body
  counts once), 'compiled_<temp|arguments|output|alias|generated_code>_gib'} per device."""
  if not compile_step:
    return {}
  compiled = lowered.compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  report = {}
  if cost and "flops" in cost:
    report["flops_per_step_per_device"] = float(cost["flops"])
  memory = compiled.memory_analysis()
  if memory is not None:
    for name in ("temp", "argument", "output", "alias", "generated_code"):
      value = getattr(memory, f"{name}_size_in_bytes", None)
      if value is not None:
        report[f"compiled_{'arguments' if name == 'argument' else name}_gib"] = value / GIB
  return report


def write_report(report, workdir):
  """Writes WORKDIR/compile_report.json and prints its summary; returns the path."""
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, "compile_report.json")
  with open(path, "w") as f:
    json.dump(report, f, indent=2)
  lines = [f"mesh {report['mesh']} on {report['devices']} x {report['device_kind']}",
           f"trainable params {report['params_total']:,}  frozen {report['frozen_params_total']:,}"]
  lines += [f"  per device {k:<20s} {v:8.3f} GiB" for k, v in report["per_device_gib"].items()]
  if "flops_per_token" in report:
    lines.append(f"  FLOPs per token (analytic) {report['flops_per_token']:.4e}; per step per "
                 f"device {report['flops_per_step_per_device']:.4e}")
  if "xla_flops_per_step_per_device" in report:
    lines.append(f"  XLA's count per step per device {report['xla_flops_per_step_per_device']:.4e}"
                 + (f" ({report['flops_note']})" if "flops_note" in report else ""))
  print("\n".join(lines))
  logging.info("Wrote %s", path)
  return path
