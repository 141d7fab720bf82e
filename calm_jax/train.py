r"""calm-train: one trainer for the three stages (autoencoder, calm, ar).

  calm-train --config experiments/autoencoder.py:size=tiny --workdir W1 \
      [--config.train.steps=2000 ...]

An existing workdir resumes from its latest complete checkpoint (params,
optimizer state and data iterator), bit-identically to an uninterrupted run; a
checkpoint that fails to restore is named and the previous one used. A new run
with config.init_from=WORKDIR[:STEP] starts from that run's params (any calm-train
run of the same stage, or a calm-convert workdir) with a fresh optimizer: fine-tuning. SIGTERM
saves a checkpoint after the current step and exits 0. Non-finite updates are
skipped; config.train.nan_policy='halt' then stops. Bad input exits with one
`error:` line (after saving the steps done). Multi-host: calm_jax/distributed.py
flags. Sections: config, mesh, tokenizer, input, model, shardings,
update step, checkpoint load, eval, loop.
"""
import json
import logging
import os
import sys
import time

from absl import app
from absl import flags
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import config_flags
import tqdm

from calm_jax import aot
from calm_jax import checkpoint
from calm_jax import cli
from calm_jax import config_lib
from calm_jax import distributed
from calm_jax import logging_setup
from calm_jax import metrics_writer
from calm_jax import optimizer
from calm_jax import preemption
from calm_jax import sharding
from calm_jax import stages
from calm_jax import steps as steps_lib
from calm_jax import user_errors
from calm_jax.data import pipeline
from calm_jax.data import sources
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


def make_data_iterator(config, tokenizer, split):
  """pipeline.make_iterator, with unreadable data reported as a DataError naming the SPEC."""
  try:
    return pipeline.make_iterator(config, tokenizer, split)
  except (OSError, RuntimeError) as e:
    raise sources.DataError(_unreadable(config, split, e)) from e


def _unreadable(config, split, error):
  spec = config.data.train if split == "train" else config.data.eval
  return (f"config.data.{split}={spec!r} cannot be read ({type(error).__name__}: {error}); "
          "fix or replace the file, or point the SPEC elsewhere.")


def _next_batch(train_iter, config):
  """The next training batch; on a data error the iterator is left where it was."""
  snapshot = train_iter.get_state()
  try:
    return next(train_iter)
  except user_errors.UserError:
    train_iter.set_state(snapshot)
    raise
  except (OSError, RuntimeError) as e:
    train_iter.set_state(snapshot)
    raise sources.DataError(_unreadable(config, "train", e)) from e


def _abstract_batch(num_rows, seq_len, batch_sharding):
  shape = jax.ShapeDtypeStruct((num_rows, seq_len), jnp.int32, sharding=batch_sharding)
  return {"tokens": shape, "mask": shape}


def _compile_then_meet(jitted, args, name):
  """Compiles ahead, then waits for every process: gloo gives processes only 30 s to meet
  at a new collective, and compile times differ between processes on a loaded machine."""
  compiled = jitted.lower(*args).compile()
  distributed.barrier(f"calm_jax:{name}_compiled")
  return compiled


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
  """The stage-1 autoencoder's params, restored into this mesh's shardings.

  With config.autoencoder.digest set, the restored params must have that digest.
  """
  if not parts["abstract_frozen"]:
    return {}
  ckpt, step = stages.autoencoder_step(config)
  abstract = checkpoint.abstract_like(parts["abstract_frozen"]["autoencoder"],
                                      parts["frozen_shardings"]["autoencoder"])
  logging.info("Restoring the frozen autoencoder from %s step %d", ckpt.directory, step)
  params = ckpt.restore_params(step, abstract)
  ckpt.close()
  if config.autoencoder.digest:
    digest = checkpoint.params_digest(params)
    if digest != config.autoencoder.digest:
      raise config_lib.ConfigError(
          f"The autoencoder in {config.autoencoder.workdir} step {step} has params digest "
          f"{digest[:16]}..., but config.autoencoder.digest={config.autoencoder.digest[:16]}... "
          "names another one: this CALM run was made with a different autoencoder. Point "
          "config.autoencoder.workdir/step at that one (or clear the digest to accept this).")
  return {"autoencoder": params}


def parse_init_from(value):
  """'WORKDIR[:STEP]' -> (workdir, step or None)."""
  workdir, sep, step = value.rpartition(":")
  if sep and step.isdigit():
    return workdir, int(step)
  return value, None


def init_from_params(config, parts):
  """The trainable params of config.init_from (WORKDIR[:STEP]) in this run's shardings."""
  workdir, step = parse_init_from(config.init_from)
  field = f"config.init_from={config.init_from!r}"
  source = config_lib.load_config(workdir)
  if source.stage != config.stage:
    raise config_lib.ConfigError(f"{field} is a {source.stage!r} run; this run is "
                                 f"{config.stage!r}: start from a run of the same stage.")
  ckpt = checkpoint.Checkpointer(workdir, read_only=True)
  try:
    steps = ckpt.all_steps()
    if not steps or (step is not None and step not in steps):
      raise checkpoint.CheckpointError(f"{field}: {workdir} has checkpoints {steps}; "
                                       f"step {step} is not among them.")
    step = steps[-1] if step is None else step
    want = {"/".join(p): tuple(s.shape) for p, s in
            _flat_paths(parts["abstract_state"].params)}
    have = ckpt.param_shapes(step)
    if want != have:
      diff = sorted(set(want.items()) ^ set(have.items()))
      raise config_lib.ConfigError(
          f"{field}: its params do not fit this model (first differences, path and shape: "
          f"{diff[:4]}); use the same config.model as {workdir}/config.json.")
    abstract = checkpoint.abstract_like(parts["abstract_state"].params,
                                        parts["state_shardings"].params)
    logging.info("Initialising from %s step %d (%s)", workdir, step, field)
    return ckpt.restore_params(step, abstract)
  finally:
    ckpt.close()


def _flat_paths(tree, prefix=()):
  for key in sorted(tree):
    if isinstance(tree[key], dict):
      yield from _flat_paths(tree[key], prefix + (key,))
    else:
      yield prefix + (key,), tree[key]


def evaluate(eval_step, params, frozen, config, tokenizer, batch_sharding, num_batches):
  """Weighted means of the model's eval metrics over up to num_batches eval batches."""
  it = make_data_iterator(config, tokenizer, "eval")
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
  if checkpoint.is_converted(workdir):
    raise checkpoint.CheckpointError(
        f"{workdir} is a converted checkpoint (calm-convert: params only, no optimizer state or "
        f"data position) and is not resumed; fine-tune it in a new --workdir with "
        f"--config.init_from={workdir}.")
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
  tokenizer = stages.resolve_tokenizer(config, workdir, is_primary, distributed.barrier)
  if is_primary:
    config_lib.save_config(config, workdir)
  if config.train.eval_every:
    sources.check_spec(config.data.eval)    # a missing eval set fails now, not after training
  train_iter = make_data_iterator(config, tokenizer, "train")
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

      def restore(step):
        # A fresh iterator per attempt: a failed attempt cannot leave it half-restored.
        it = make_data_iterator(config, tokenizer, "train")
        params, train_state = ckpt.restore(step, abstract.params, abstract.replace(params=None),
                                           it)
        return params, train_state, it

      step, restored = ckpt.restore_latest_good(restore)
      if restored is None:
        raise checkpoint.CheckpointError(
            f"No checkpoint in {ckpt.directory} could be restored (see the errors above); "
            "move the broken step directories away or use a new --workdir.")
      params, train_state, train_iter = restored
      state = train_state.replace(params=params)
      logging.info("Resumed from %s step %d", ckpt.directory, step)
    if state is None:
      state = init_state(parts, config.train.seed)
      if config.init_from:
        state = state.replace(params=init_from_params(config, parts))
    if jax.process_count() > 1:
      rng0 = jax.random.key(config.train.seed)
      train_step = _compile_then_meet(
          train_step, (state, frozen, _abstract_batch(config.train.batch_size,
                                                      config.data.seq_len, batch_sharding), rng0),
          "train_step")
      if config.train.eval_every:
        eval_step = _compile_then_meet(
            eval_step, (state.params, frozen, _abstract_batch(config.eval.batch_size,
                                                              config.eval.block_len,
                                                              batch_sharding), rng0),
            "eval_step")

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
    skipped_at_start = int(jax.device_get(state.skipped))
    completed = saved = start               # updates in `state`; the newest checkpointed step

    def halt_if_nonfinite(skipped, last_bad_step, loss=None):
      """nan_policy='halt': stop at the first skipped update of this run (none was applied).

      skipped and last_bad_step come from the same state (a flushed step's metrics, or the
      current state), so the step named is the one whose update was skipped.
      """
      if config.train.nan_policy == "halt" and skipped > skipped_at_start:
        bad = int(last_bad_step) + 1
        raise TrainingHalted(
            f"Non-finite loss or gradients at step {bad}"
            + (f" (logged loss={loss})" if loss is not None else "")
            + "; the update was not applied and training stopped. The last good checkpoint "
            f"(step {saved if saved else 'none'}) stays in {ckpt.directory}. Lower "
            "config.optim.lr, or pass --config.train.nan_policy=skip to skip such updates.")

    def flush(pending):
      nonlocal t_last, step_last
      step, metrics = pending
      metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
      now = time.perf_counter()
      metrics["tokens_per_s"] = (step - step_last) * tokens_per_step / max(now - t_last, 1e-9)
      t_last, step_last = now, step
      writer.write(step, metrics)
      bar.set_postfix(loss=f"{metrics['loss']:.4f}", tok_s=f"{metrics['tokens_per_s']:.0f}")
      halt_if_nonfinite(int(metrics["skipped_updates"]), metrics["last_bad_step"],
                        metrics["loss"])
      return metrics

    def save(step):
      nonlocal saved
      ckpt.save(step, state.params, state.replace(params=None), train_iter, force=True)
      saved = step

    with preemption.PreemptionWatcher() as watcher:
      try:
        for step in range(start, total):
          batch = sharding.to_global_batch(_next_batch(train_iter, config), batch_sharding)
          state, metrics = train_step(state, frozen, batch, rng)
          completed = done = step + 1
          if pending is not None:           # pull step n-1's metrics after dispatching step n
            last_logged = flush(pending)
            pending = None
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
            if pending is not None:
              last_logged = flush(pending)
              pending = None
            # Under 'halt', never save past a skipped update (also one between log steps).
            halt_if_nonfinite(*jax.device_get((state.skipped, state.last_bad_step)))
            save(done)
          if preempted:
            logging.warning("Preempted: saved step %d in %s; rerun the same command to resume.",
                            done, ckpt.directory)
            last_logged["preempted_at_step"] = done
            break
        if pending is not None:
          last_logged = flush(pending)
      except user_errors.UserError as e:
        # Bad input found mid-run (e.g. a malformed record): keep the work done so far.
        if not isinstance(e, TrainingHalted) and completed > saved:
          if pending is not None:
            flush(pending)
          logging.error("Saving step %d before stopping on: %s", completed, e)
          save(completed)
        raise
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
    if not _COMPILE_ONLY.value:     # first, before any other JAX call (multi-host runs)
      distributed.initialize()
    if _COMPILE_ONLY.value:
      compile_only(_CONFIG.value, _WORKDIR.value, _TOPOLOGY.value)
    else:
      train_and_evaluate(_CONFIG.value, _WORKDIR.value)


def run():
  cli.run_app(main, ["config"], ["calm_jax.train", "calm_jax.distributed"])


if __name__ == "__main__":
  run()
