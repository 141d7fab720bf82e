"""Scalars to TensorBoard, WORKDIR/metrics.jsonl and optionally Weights & Biases, written on a background thread.

Writes are asynchronous as in clu's AsyncMultiWriter: one worker thread runs every backend in
order, so the training loop never waits on a disk or a network; an error in a backend is
raised at the next write or at close. The TensorBoard backend is tensorboardX rather than
clu.metric_writers: `from clu import metric_writers` imports TensorFlow (clu 0.0.12,
metric_writers/summary_writer.py -> tf/summary_writer.py: `import tensorflow`), which would add
TensorFlow, Keras and their pins to every install and, on a GPU, a second runtime that reserves
device memory beside JAX's. tensorboardX writes the same event files.

Weights & Biases (`pip install -e '.[wandb]'`): config.log.wandb_project names the project; the
run is named after the workdir and resumed with it (its id is kept in WORKDIR/wandb_run_id);
WANDB_MODE=offline keeps everything in WORKDIR/wandb for a later `wandb sync`.
"""
import concurrent.futures
import importlib.util
import json
import os
import uuid

import numpy as np

from calm_jax import config as config_lib
from calm_jax import errors

WANDB_ID_FILE = "wandb_run_id"


def check_writers(config):
  """Fails before training when a configured writer cannot be used."""
  if config.log.wandb_project and importlib.util.find_spec("wandb") is None:
    raise config_lib.ConfigError(
        f"config.log.wandb_project={config.log.wandb_project!r} needs Weights & Biases: "
        "pip install -e '.[wandb]' (or leave config.log.wandb_project empty).")


class _TensorBoard:
  def __init__(self, workdir):
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
    self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(self, step, row):
    for key, value in row.items():
      self._tb.add_scalar(key, value, step)

  def close(self):
    self._tb.close()


def _ends_with_newline(path):
  with open(path, "rb") as f:
    f.seek(-1, os.SEEK_END)
    return f.read(1) == b"\n"


class _Jsonl:
  def __init__(self, workdir):
    path = os.path.join(workdir, "metrics.jsonl")
    self._file = open(path, "a")
    if self._file.tell() and not _ends_with_newline(path):
      self._file.write("\n")      # a run killed mid-row: the next row starts on its own line

  def write(self, step, row):
    self._file.write(json.dumps({"step": step, **row}) + "\n")
    self._file.flush()

  def close(self):
    self._file.close()


class _Wandb:
  """One W&B run per workdir, resumed with it."""

  def __init__(self, workdir, project, config):
    import wandb  # pylint: disable=g-import-not-at-top
    id_path = os.path.join(workdir, WANDB_ID_FILE)
    if not os.path.exists(id_path):
      with open(id_path, "w") as f:
        f.write(uuid.uuid4().hex[:16])
    with open(id_path) as f:
      run_id = f.read().strip()
    self._run = wandb.init(project=project, id=run_id, resume="allow", dir=workdir,
                           name=os.path.basename(os.path.abspath(workdir)),
                           config=config.to_dict() if config is not None else None)

  def write(self, step, row):
    self._run.log(row, step=step)

  def close(self):
    self._run.finish()


class MetricsWriter:
  """Writes on the primary process only; other processes get a no-op writer.

  config: the run's config (config.log.wandb_project adds the W&B backend); None: TensorBoard
  and metrics.jsonl only.
  """

  def __init__(self, workdir, enabled=True, config=None):
    self.enabled = enabled
    self._backends, self._pending, self._error = [], None, None
    if not enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    self._backends = [_TensorBoard(workdir), _Jsonl(workdir)]
    if config is not None and config.log.wandb_project:
      check_writers(config)
      self._backends.append(_Wandb(workdir, config.log.wandb_project, config))
    self._thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="metrics")

  def write(self, step, scalars):
    """Queues one row: {name: number}; device arrays must already be on the host."""
    if not self.enabled:
      return
    row = {key: float(np.asarray(value)) for key, value in scalars.items()}
    self._raise_failed()
    self._pending = self._thread.submit(self._write_all, int(step), row)

  def _write_all(self, step, row):
    try:
      for backend in self._backends:
        backend.write(step, row)
    except Exception as e:  # pylint: disable=broad-except
      self._error = self._error or e    # kept even when later rows are queued after it
      raise

  def _raise_failed(self):
    if self._error is not None:
      error, self._error = self._error, None
      raise errors.UserError(f"Writing metrics failed: {error}") from error

  def flush(self):
    """Waits until every queued row is written; a failed row raises UserError (as write/close)."""
    if self.enabled and self._pending is not None:
      concurrent.futures.wait([self._pending])     # one thread, rows in order: the last is last
      self._raise_failed()

  def close(self):
    if not self.enabled:
      return
    self._thread.shutdown(wait=True)
    try:
      self._raise_failed()
    finally:
      for backend in self._backends:
        backend.close()
      self.enabled = False
