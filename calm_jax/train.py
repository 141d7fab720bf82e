r"""calm-train: one trainer for the three stages (autoencoder, calm, ar).

  calm-train --config experiments/autoencoder.py:size=tiny --workdir W1 \
      [--config.train.steps=2000 ...]

An existing workdir resumes from its latest checkpoint (params, optimizer state
and data iterator). Sections: config, mesh, tokenizer, input, model, shardings,
update step, checkpoint load, eval, loop.
"""
import json
import logging
import math
import os
import sys
import time

from absl import app
from absl import flags
import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils
import numpy as np
from ml_collections import config_flags
import tqdm

from calm_jax import aot
from calm_jax import checkpoint
from calm_jax import config_lib
from calm_jax import logging_setup
from calm_jax import metrics_writer
from calm_jax import optimizer
from calm_jax import preemption
from calm_jax import sharding
from calm_jax import stages
from calm_jax import steps as steps_lib
from calm_jax import user_errors
from calm_jax.data import pipeline
from calm_jax.models import build_model

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file, e.g. experiments/autoencoder.py:size=tiny.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (created; resumed if it exists).")
_COMPILE_ONLY = flags.DEFINE_bool(
    "compile_only", False, "Compile the train step for the mesh (or --topology), report the "
    "per-device memory and FLOPs into WORKDIR/compile_report.json, and exit without training.")
_TOPOLOGY = flags.DEFINE_string(
    "topology", None, "With --compile_only: a TPU topology to compile for, e.g. v5p-64.")


class TrainingHalted(user_errors.UserError):
  """Training stopped on purpose (non-finite loss with nan_policy='halt')."""


def _wait_for_primary(name):
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(f"calm_jax:{name}")


def _check_workdir_config(config, workdir):
  """Refuses to resume a workdir made by a different config unless allowed."""
  if not os.path.exists(os.path.join(workdir, config_lib.CONFIG_FILE)):
    return
  saved = config_lib.load_config(workdir)
  changes = config_lib.config_changes(saved, config)
  if changes and not config.train.allow_config_change:
    lines = "; ".join(f"{n}: {a!r} -> {b!r}" for n, a, b in changes[:8])
    raise config_lib.ConfigError(
        f"{workdir} was created by a different config ({lines}). Use a new --workdir, or pass "
        "--config.train.allow_config_change=True to resume with the new values.")


def _dummy_batch(num_rows, seq_len):
  return {"tokens": jnp.zeros((num_rows, seq_len), jnp.int32),
          "mask": jnp.ones((num_rows, seq_len), jnp.int32)}


def strip_boxes(tree):
  """Removes the logical-axis boxes without applying sharding constraints (abstract trees)."""
  return jax.tree.map(lambda x: x.value if isinstance(x, nn.Partitioned) else x, tree,
                      is_leaf=lambda x: isinstance(x, nn.Partitioned))


def param_count(tree):
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def build(config, mesh, axis_rules, ae_config=None):
  """Model, optimizer, abstract state and shardings, without touching any data.

  ae_config: the stage-1 run's config for a CALM run (default: read from its workdir).
  """
  if config.stage == "calm" and ae_config is None:
    ae_config = stages.autoencoder_config(config)
  model = build_model(config, ae_model_config=ae_config.model if ae_config else None)
  tx, schedule = optimizer.make_optimizer(config.optim, config.train.steps)
  rows = sharding.batch_shards(mesh, axis_rules)
  dummy = _dummy_batch(rows, config.data.seq_len)

  def init_params(rng):
    r = jax.random.split(rng, 3)
    return model.init({"params": r[0], "dropout": r[1], "sample": r[2]}, dummy,
                      train=False)["params"]

  boxed = jax.eval_shape(init_params, jax.random.key(0))
  trainable_boxed, frozen_boxed = steps_lib.split_frozen(boxed)
  state_boxed = jax.eval_shape(lambda p: steps_lib.init_train_state(p, tx), trainable_boxed)
  return dict(
      model=model, tx=tx, schedule=schedule, ae_config=ae_config, init_params=init_params,
      state_shardings=sharding.tree_shardings(state_boxed, mesh, axis_rules),
      frozen_shardings=sharding.tree_shardings(frozen_boxed, mesh, axis_rules),
      abstract_state=strip_boxes(state_boxed), abstract_frozen=strip_boxes(frozen_boxed))


def init_state(parts, seed):
  """Trainable params and optimizer state initialised directly into their shardings."""

  def create(rng):
    trainable, _ = steps_lib.split_frozen(nn.unbox(parts["init_params"](rng)))
    return steps_lib.init_train_state(trainable, parts["tx"])

  return jax.jit(create, out_shardings=parts["state_shardings"])(jax.random.key(seed))


def restore_frozen(config, parts):
  """The stage-1 autoencoder's params, restored into this mesh's shardings."""
  if not parts["abstract_frozen"]:
    return {}
  ckpt, step = stages.autoencoder_step(config)
  abstract = checkpoint.abstract_like(parts["abstract_frozen"]["autoencoder"],
                                      parts["frozen_shardings"]["autoencoder"])
  logging.info("Restoring the frozen autoencoder from %s step %d", ckpt.directory, step)
  return {"autoencoder": ckpt.restore_params(step, abstract)}


def evaluate(eval_step, params, frozen, config, tokenizer, batch_sharding, num_batches):
  """Weighted means of the model's eval metrics over up to num_batches eval batches."""
  it = pipeline.make_iterator(config, tokenizer, "eval")
  totals, weight = {}, 0.0
  rng = jax.random.key(config.train.seed + 1)
  for i, local in enumerate(it):
    if num_batches and i >= num_batches:
      break
    metrics, w = eval_step(params, frozen, sharding.to_global_batch(local, batch_sharding),
                           jax.random.fold_in(rng, i))
    metrics, w = jax.device_get((metrics, w))
    for k, v in metrics.items():
      totals[k] = totals.get(k, 0.0) + float(v) * float(w)
    weight += float(w)
  return {f"eval/{k}": v / max(weight, 1.0) for k, v in totals.items()}


def train_and_evaluate(config, workdir, devices=None):
  """Trains config.stage in workdir; returns the last logged metrics.

  devices: the devices of the mesh (default: all), e.g. one device in tests.
  """
  # -- Config ---------------------------------------------------------------
  config_lib.validate(config)
  is_primary = jax.process_index() == 0
  os.makedirs(workdir, exist_ok=True)
  _check_workdir_config(config, workdir)

  # -- Mesh -------------------------------------------------------------------
  mesh = sharding.make_mesh(config.mesh, devices)
  axis_rules = sharding.rules(config)
  shards = sharding.batch_shards(mesh, axis_rules)
  for field, size in (("train.batch_size", config.train.batch_size),
                      ("eval.batch_size", config.eval.batch_size)):
    if size % shards or size % jax.process_count():
      raise config_lib.ConfigError(
          f"config.{field}={size} is not divisible by the data-parallel size {shards} "
          f"(mesh {dict(mesh.shape)}) and the process count {jax.process_count()}.")
  if (config.train.batch_size // config.train.grad_accum_steps) % shards:
    raise config_lib.ConfigError(
        f"config.train.batch_size / grad_accum_steps = "
        f"{config.train.batch_size // config.train.grad_accum_steps} is not divisible by "
        f"the data-parallel size {shards}.")

  # -- Tokenizer and input --------------------------------------------------
  tokenizer = stages.resolve_tokenizer(config, workdir, is_primary, _wait_for_primary)
  if is_primary:
    config_lib.save_config(config, workdir)
  train_iter = pipeline.make_iterator(config, tokenizer, "train")
  batch_sharding = sharding.batch_sharding(mesh, axis_rules)

  with sharding.activate(mesh, axis_rules):
    # -- Model and shardings -------------------------------------------------
    parts = build(config, mesh, axis_rules)
    frozen = restore_frozen(config, parts)
    counts = {"params/trainable": param_count(parts["abstract_state"].params),
              "params/frozen": param_count(parts["abstract_frozen"])}
    logging.info("Mesh %s; params %s", dict(mesh.shape), counts)
    if is_primary:
      with open(os.path.join(workdir, "params.json"), "w") as f:
        json.dump(counts, f, indent=2)

    # -- Update step -----------------------------------------------------------
    replicated = sharding.replicated(mesh)
    train_step = jax.jit(
        steps_lib.make_train_step(parts["model"], parts["tx"], parts["schedule"],
                                  config.train.grad_accum_steps),
        in_shardings=(parts["state_shardings"], parts["frozen_shardings"], batch_sharding,
                      replicated),
        out_shardings=(parts["state_shardings"], replicated),
        donate_argnums=(0,))
    eval_step = jax.jit(steps_lib.make_eval_step(parts["model"]),
                        in_shardings=(parts["state_shardings"].params, parts["frozen_shardings"],
                                      batch_sharding, replicated),
                        out_shardings=replicated)

    # -- Checkpoint load ---------------------------------------------------------
    ckpt = checkpoint.Checkpointer(workdir, config.checkpoint.every_steps,
                                   config.checkpoint.keep, config.checkpoint.async_save)
    state = None
    if ckpt.all_steps():
      abstract = checkpoint.abstract_like(parts["abstract_state"], parts["state_shardings"])
      step, restored = ckpt.restore_latest_good(
          lambda s: ckpt.restore(s, abstract.params, abstract.replace(params=None), train_iter))
      if restored is None:
        raise checkpoint.CheckpointError(
            f"No checkpoint in {ckpt.directory} could be restored (see the errors above); "
            "move the broken step directories away or use a new --workdir.")
      params, train_state = restored
      state = train_state.replace(params=params)
      logging.info("Resumed from %s step %d", ckpt.directory, step)
    if state is None:
      state = init_state(parts, config.train.seed)

    # -- Loop ------------------------------------------------------------------------
    writer = metrics_writer.MetricsWriter(workdir, enabled=is_primary)
    rng = jax.random.key(config.train.seed)
    start = int(jax.device_get(state.step))
    total = config.train.steps
    tokens_per_step = config.train.batch_size * config.data.seq_len
    bar = tqdm.tqdm(total=total, initial=start, disable=not is_primary, desc=config.stage,
                    dynamic_ncols=True, file=sys.stdout)
    last_logged, pending = {}, None
    t_last, step_last = time.perf_counter(), start

    def flush(pending):
      nonlocal t_last, step_last
      step, metrics = pending
      metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
      now = time.perf_counter()
      metrics["tokens_per_s"] = (step - step_last) * tokens_per_step / max(now - t_last, 1e-9)
      t_last, step_last = now, step
      if metrics["skipped_updates"] > 0 and config.train.nan_policy == "halt":
        raise TrainingHalted(
            f"Non-finite loss or gradients at step {int(jax.device_get(state.last_bad_step))} "
            f"(loss={metrics['loss']}); the update was not applied. The last good checkpoint "
            f"stays in {ckpt.directory}. Lower config.optim.lr or use "
            "--config.train.nan_policy=skip.")
      writer.write(step, metrics)
      bar.set_postfix(loss=f"{metrics['loss']:.4f}", tok_s=f"{metrics['tokens_per_s']:.0f}")
      return metrics

    with preemption.PreemptionWatcher() as watcher:
      try:
        for step in range(start, total):
          batch = sharding.to_global_batch(next(train_iter), batch_sharding)
          state, metrics = train_step(state, frozen, batch, rng)
          if pending is not None:           # pull step n-1's metrics after dispatching step n
            last_logged = flush(pending)
            pending = None
          done = step + 1
          bar.update(1)
          if done % config.train.log_every == 0 or done == total:
            pending = (done, metrics)
          if config.train.eval_every and (done % config.train.eval_every == 0 or done == total):
            if pending is not None:
              last_logged = flush(pending)
              pending = None
            results = evaluate(eval_step, state.params, frozen, config, tokenizer, batch_sharding,
                               config.train.eval_batches)
            writer.write(done, results)
            last_logged.update(results)
            logging.info("step %d: %s", done, results)
          preempted = watcher.requested(done)
          if done % config.checkpoint.every_steps == 0 or done == total or preempted:
            if pending is not None:         # never save past a non-finite step under 'halt'
              last_logged = flush(pending)
              pending = None
            ckpt.save(done, state.params, state.replace(params=None), train_iter, force=True)
          if preempted:
            logging.warning("Preempted: saved step %d in %s; rerun the same command to resume.",
                            done, ckpt.directory)
            last_logged["preempted_at_step"] = done
            break
        if pending is not None:
          last_logged = flush(pending)
      finally:
        bar.close()
        ckpt.close()
        writer.close()
  return last_logged


def compile_only(config, workdir, topology=None):
  """--compile_only: the memory and FLOP report of one train step, no data, no training."""
  config_lib.validate(config, require_autoencoder=False)
  devices = aot.topology_devices(topology) if topology else None
  mesh = sharding.make_mesh(config.mesh, devices)
  axis_rules = sharding.rules(config)
  ae_config = None
  if config.stage == "calm" and not config.autoencoder.workdir:
    ae_config = aot.paper_autoencoder_config(config)
  with sharding.activate(mesh, axis_rules):
    parts = build(config, mesh, axis_rules, ae_config=ae_config)
    report = aot.compile_train_step(config, parts, mesh, axis_rules)
  aot.write_report(report, workdir)
  return report


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if not _WORKDIR.value:
    raise app.UsageError("--workdir is required.")
  logging_setup.setup()
  with user_errors.exit_on_user_error():
    if _COMPILE_ONLY.value:
      compile_only(_CONFIG.value, _WORKDIR.value, _TOPOLOGY.value)
    else:
      train_and_evaluate(_CONFIG.value, _WORKDIR.value)


def run():
  flags.mark_flags_as_required(["config"])
  app.run(main)


if __name__ == "__main__":
  run()
