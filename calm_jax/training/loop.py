"""The trainer of every stage (autoencoder, calm, ar): `train_and_evaluate`, one loop read top to bottom in sections.

An existing workdir resumes from its latest complete checkpoint (params, optimizer
state and data iterator), bit-identically to an uninterrupted run; a checkpoint that
fails to restore is named and the previous one used. A new run with
config.init_from=WORKDIR[:STEP] starts from that run's params with a fresh optimizer
(fine-tuning). SIGTERM saves a checkpoint after the current step and returns. Non-finite
updates are skipped; config.train.nan_policy='halt' then stops. Bad input raises a
UserError (after saving the steps done). Sections, as in big_vision's train.py: config,
mesh, tokenizer and input, model and shardings, update step, checkpoint load, evals, loop.
"""
import json
import logging
import os
import sys
import time

import jax
import jax.numpy as jnp

from calm_jax import checkpoint
from calm_jax import config as config_lib
from calm_jax import errors
from calm_jax import progress
from calm_jax import runs
from calm_jax import stages
from calm_jax.data import pipeline
from calm_jax.data import sources
from calm_jax.eval import evaluator
from calm_jax.eval import terms
from calm_jax.parallel import distributed
from calm_jax.parallel import peak
from calm_jax.parallel import sharding
from calm_jax.training import efficiency
from calm_jax.training import metrics as metrics_lib
from calm_jax.training import preemption
from calm_jax.training import profiler as profiler_lib
from calm_jax.training import resume
from calm_jax.training import state as state_lib
from calm_jax.training import steps as steps_lib
from calm_jax.training import workdir_lock


class TrainingHalted(errors.UserError):
  """Training stopped on purpose (non-finite loss with nan_policy='halt')."""


def _check_batch_sizes(config, mesh, axis_rules):
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


def _write_param_counts(parts, mesh, workdir, is_primary):
  counts = {"params/trainable": runs.param_count(parts["abstract_state"].params),
            "params/frozen": runs.param_count(parts["abstract_frozen"])}
  logging.info("Mesh %s; params %s", dict(mesh.shape), counts)
  if is_primary:
    with open(os.path.join(workdir, "params.json"), "w") as f:
      json.dump(counts, f, indent=2)


def _abstract_batch(num_rows, seq_len, batch_sharding):
  shape = jax.ShapeDtypeStruct((num_rows, seq_len), jnp.int32, sharding=batch_sharding)
  return {"tokens": shape, "mask": shape}


def _compile_then_meet(jitted, args, name):
  """Compiles ahead, then waits for every process: gloo gives processes only 30 s to meet
  at a new collective, and compile times differ between processes on a loaded machine."""
  compiled = jitted.lower(*args).compile()
  distributed.barrier(f"calm_jax:{name}_compiled")
  return compiled


def _restore_or_init(config, parts, ckpt, tokenizer):
  """(state, train iterator or None): the latest good checkpoint, else a fresh or init_from state."""
  if not ckpt.all_steps():
    params = state_lib.init_from_params(config, parts) if config.init_from else None
    state = state_lib.init_state(parts, config.train.seed)
    return (state if params is None else steps_lib.with_params(state, params)), None
  abstract = checkpoint.abstract_like(parts["abstract_state"], parts["state_shardings"])

  def restore(step):
    # A fresh iterator per attempt: a failed attempt cannot leave it half-restored.
    it = pipeline.make_checked_iterator(config, tokenizer, "train")
    params, train_state = ckpt.restore(step, *_checkpoint_items(abstract), it)
    return params, train_state, it

  step, restored = ckpt.restore_latest_good(restore)
  if restored is None:
    raise checkpoint.CheckpointError(
        f"No checkpoint in {ckpt.directory} could be restored (see the errors above); "
        "move the broken step directories away or use a new --workdir.")
  params, train_state, train_iter = restored
  logging.info("Resumed from %s step %d", ckpt.directory, step)
  if isinstance(abstract, steps_lib.EmaTrainState):
    return train_state.replace(ema_params=params), train_iter
  return train_state.replace(params=params), train_iter


def _checkpoint_items(state):
  """(params item, train_state item): the item holds the params that evaluation, generation,
  export and the next stage read (the EMA where there is one); the train state holds the rest,
  the raw params included when an EMA stands in for them."""
  if isinstance(state, steps_lib.EmaTrainState):
    return state.ema_params, state.replace(ema_params=None)
  return state.params, state.replace(params=None)


def _compile_for_processes(train_step, eval_step, state, frozen, config, batch_sharding):
  """Multi-process runs: both steps compiled ahead, every process meeting after each."""
  rng0 = jax.random.key(config.train.seed)
  train_step = _compile_then_meet(train_step, (state, frozen, _abstract_batch(
      config.train.batch_size, config.data.seq_len, batch_sharding), rng0), "train_step")
  if config.train.eval_every:
    eval_params = {**steps_lib.eval_params(state), **frozen}
    eval_step = _compile_then_meet(eval_step, (eval_params, _abstract_batch(
        config.eval.batch_size, config.eval.block_len, batch_sharding), rng0), "eval_step")
  return train_step, eval_step


class _Bookkeeping:
  """The loop's host side: metrics pulled one step late, nan_policy='halt', checkpoint saves,
  step times and goodput (eff), the profiler."""

  def __init__(self, config, state, ckpt, writer, bar, workdir, started_at,
               flops_per_token=None, devices=()):
    self.config, self.ckpt, self.writer, self.bar = config, ckpt, writer, bar
    # flops_per_token and mfu in the log: the analytic count (models/flops.py), the mesh's chips
    self.flops_per_token, self.devices = flops_per_token, list(devices)
    self.start = int(jax.device_get(state.step))
    self.eff = efficiency.Efficiency(workdir, self.start, config.train.steps, started_at,
                                     write=writer.enabled)
    self.profiler = profiler_lib.Profiler(config.train.profile_steps, workdir, self.start)
    self.skipped_at_start = int(jax.device_get(state.skipped))
    self.completed = self.saved = self.start     # updates in the state; the newest saved step
    self.pending, self.last_logged = None, {}
    self.t_last, self.step_last = time.perf_counter(), self.start
    self.tokens_per_step = config.train.batch_size * config.data.seq_len

  def halt_if_nonfinite(self, skipped, last_bad_step, loss=None):
    """nan_policy='halt': stop at the first skipped update of this run (none was applied).

    skipped and last_bad_step come from the same state (a flushed step's metrics, or the
    current state), so the step named is the one whose update was skipped.
    """
    if self.config.train.nan_policy == "halt" and skipped > self.skipped_at_start:
      raise TrainingHalted(
          f"Non-finite loss or gradients at step {int(last_bad_step) + 1}"
          + (f" (logged loss={loss})" if loss is not None else "")
          + "; the update was not applied and training stopped. The last good checkpoint "
          f"(step {self.saved if self.saved else 'none'}) stays in {self.ckpt.directory}. Lower "
          "config.optim.lr, or pass --config.train.nan_policy=skip to skip such updates.")

  def flush(self):
    """Writes the pending step's metrics (the loop has already dispatched the next step)."""
    if self.pending is None:
      return
    (step, metrics), self.pending = self.pending, None
    self.eff.drain(step)              # stamps the ends of the steps up to `step` (no extra sync)
    metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
    metrics.update(self._rates(step))
    self.writer.write(step, metrics)
    self.bar.set_postfix(loss=f"{metrics['loss']:.4f}", tok_s=f"{metrics['tokens_per_s']:.0f}")
    if self.writer.enabled:           # the primary process logs
      _log_progress(step, self.config.train.steps, metrics, self.eff.eta_s)
    self.last_logged = metrics
    self.halt_if_nonfinite(int(metrics["skipped_updates"]), metrics["last_bad_step"],
                           metrics["loss"])

  def _rates(self, step):
    """Host-side throughput and efficiency over the log window that ends at `step`."""
    now = time.perf_counter()
    rates = {"tokens_per_s": ((step - self.step_last) * self.tokens_per_step
                              / max(now - self.t_last, 1e-9))}
    self.t_last, self.step_last = now, step
    if self.flops_per_token:
      rates.update(peak.utilisation_metrics(self.flops_per_token, rates["tokens_per_s"],
                                            self.devices))
    rates.update(self.eff.metrics(step))
    return rates

  def run_eval(self, step, evaluate, state):
    """The periodic eval (host time outside the step times and goodput)."""
    with self.eff.paused():
      results = evaluate(state)
    self.writer.write(step, results)
    self.last_logged.update(results)
    logging.info("step %d: %s", step, results)

  def save(self, step, state, train_iter):
    """Saves `step` (never past a skipped update under 'halt', also one between log steps)."""
    self.flush()
    with self.eff.paused():
      self.halt_if_nonfinite(*jax.device_get((state.skipped, state.last_bad_step)))
      self.eff.saved(step)
      self.ckpt.save(step, *_checkpoint_items(state), train_iter, force=True)
    self.saved = step

  def save_on_error(self, error, state, train_iter):
    """Bad input found mid-run (e.g. a malformed record): keep the work done so far."""
    if (not isinstance(error, (TrainingHalted, checkpoint.CheckpointError))
        and self.completed > self.saved):
      self.flush()
      logging.error("Saving step %d before stopping on: %s", self.completed, error)
      self.ckpt.save(self.completed, *_checkpoint_items(state), train_iter,
                     force=True)
      self.saved = self.completed


def train_and_evaluate(config, workdir, devices=None):
  """Trains config.stage in workdir; returns the last logged metrics.

  devices: the devices of the mesh (default: all), e.g. one device in tests. The
  workdir is locked for the run (one writer: training/workdir_lock.py); a rerun takes
  what the first start resolved and may change only what training/resume.py allows.
  """
  # -- Config -------------------------------------------------------------------------------
  started_at = time.perf_counter()       # goodput counts start-up (restore, compile) as lost time
  stages.validate(config)
  metrics_lib.check_writers(config)
  with workdir_lock.WorkdirLock(workdir):
    return _train(resume.resume_config(config, workdir), workdir, devices, started_at)


def _train(config, workdir, devices, started_at):
  """train_and_evaluate on a locked workdir with the config to run."""
  is_primary = jax.process_index() == 0
  # -- Mesh ---------------------------------------------------------------------------------
  mesh = sharding.make_mesh(config.mesh, devices)
  axis_rules = sharding.rules(config)
  _check_batch_sizes(config, mesh, axis_rules)

  # -- Tokenizer and input ------------------------------------------------------------------
  ae_config = runs.autoencoder_config(config) if stages.get(config).needs_autoencoder else None
  tokenizer = runs.resolve_tokenizer(config, workdir, is_primary, distributed.barrier, ae_config)
  if config.train.eval_every:
    sources.check_spec(config.data.eval)    # a missing eval set fails now, not after training
  train_iter = pipeline.make_checked_iterator(config, tokenizer, "train")
  batch_sharding = sharding.batch_sharding(mesh, axis_rules)

  with sharding.activate(mesh, axis_rules):
    # -- Model and shardings ----------------------------------------------------------------
    parts = state_lib.build(config, mesh, axis_rules, ae_config)
    frozen = runs.restore_frozen(config, parts)     # records the autoencoder step and digests
    if is_primary:
      config_lib.save_config(config, workdir)       # every field resolved
    _write_param_counts(parts, mesh, workdir, is_primary)

    # -- Update step --------------------------------------------------------------------------
    train_step = steps_lib.jit_train_step(parts, mesh, axis_rules, config.train.grad_accum_steps)
    eval_step = evaluator.jit_terms(
        terms.model_metric_terms(parts["model"]),
        {**parts["state_shardings"].params, **parts["frozen_shardings"]}, mesh, axis_rules)

    # -- Checkpoint load ----------------------------------------------------------------------
    ckpt = checkpoint.Checkpointer(workdir, config.checkpoint.every_steps,
                                   config.checkpoint.keep, config.checkpoint.async_save)
    state, restored_iter = _restore_or_init(config, parts, ckpt, tokenizer)
    train_iter = restored_iter or train_iter
    if jax.process_count() > 1:
      train_step, eval_step = _compile_for_processes(train_step, eval_step, state, frozen, config,
                                                     batch_sharding)

    # -- Evals (the model's own metrics; calm-eval gives the stage's full evaluation) ---------
    evaluate = lambda state: evaluator.model_metrics(
        eval_step, {**steps_lib.eval_params(state), **frozen}, config, tokenizer, batch_sharding,
        config.train.eval_batches)

    # -- Loop ---------------------------------------------------------------------------------
    writer = metrics_lib.MetricsWriter(workdir, enabled=is_primary, config=config)
    bar = progress.bar(total=config.train.steps, initial=int(jax.device_get(state.step)),
                       desc=config.stage, unit="step", enabled=is_primary, file=sys.stdout)
    book = _Bookkeeping(config, state, ckpt, writer, bar, workdir, started_at,
                        stages.train_flops_per_token(
                            config, ae_config.model if ae_config else None)["total"],
                        mesh.devices.flat)
    try:
      _loop(config, book, state, frozen, train_step, train_iter, batch_sharding, evaluate)
    finally:
      book.profiler.close()
      bar.close()
      with book.eff.paused():          # waiting for the last checkpoint write is not training
        ckpt.close()
      book.eff.goodput.record(book.completed)
      writer.close()
  return book.last_logged


def _log_progress(step, total, metrics, eta_s):
  """One log line per logged step (the progress bar's numbers, for logs that are not a terminal)."""
  timing = "".join(f", {name} {metrics[key]:{fmt}}" for name, key, fmt in (
      ("step", "step_time_s_p50", ".3f"), ("p90", "step_time_s_p90", ".3f"),
      ("data wait", "data_wait_fraction", ".1%"), ("goodput", "goodput", ".1%"))
                   if key in metrics)
  eta = f", ETA {progress.format_interval(eta_s)}" if eta_s is not None else ""
  logging.info("step %d/%d: loss %.4f, %.0f tokens/s%s%s", step, total, metrics["loss"],
               metrics["tokens_per_s"], timing, eta)


def _loop(config, book, state, frozen, train_step, train_iter, batch_sharding, evaluate):
  """Steps book.start .. config.train.steps: log, eval and checkpoint on schedule, stop on SIGTERM."""
  total, train, rng = config.train.steps, config.train, jax.random.key(config.train.seed)
  with preemption.PreemptionWatcher() as watcher:
    try:
      for step in range(book.start, total):
        book.profiler.before_step(step)
        with book.eff.input_wait():
          batch = sharding.to_global_batch(pipeline.next_batch(train_iter, config), batch_sharding)
        state, metrics = train_step(state, frozen, batch, rng)
        book.eff.dispatched(step + 1, metrics["loss"])
        book.completed = done = step + 1
        book.profiler.after_step(done, book.eff.paused)
        book.flush()                      # step n-1's metrics, after dispatching step n
        book.bar.update(1)
        if done % train.log_every == 0 or done == total:
          book.pending = (done, metrics)
        if train.eval_every and (done % train.eval_every == 0 or done == total):
          book.flush()
          book.run_eval(done, evaluate, state)
        preempted = watcher.requested(done)
        if done % config.checkpoint.every_steps == 0 or done == total or preempted:
          book.save(done, state, train_iter)
        if preempted:
          logging.warning("Preempted: saved step %d in %s; rerun the same command to resume.",
                          done, book.ckpt.directory)
          book.last_logged["preempted_at_step"] = done
          break
      book.flush()
    except errors.UserError as e:
      book.save_on_error(e, state, train_iter)
      raise
