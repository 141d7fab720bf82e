"""Scalars to TensorBoard and to WORKDIR/metrics.jsonl (one JSON object per logged step)."""
import json
import os

import numpy as np


def _ends_with_newline(path):
  with open(path, "rb") as f:
    f.seek(-1, os.SEEK_END)
    return f.read(1) == b"\n"


class MetricsWriter:
  """Writes on the primary process only; other processes get a no-op writer."""

  def __init__(self, workdir, enabled=True):
    self.enabled = enabled
    self._tb = None
    self._jsonl = None
    if enabled:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      os.makedirs(workdir, exist_ok=True)
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
      path = os.path.join(workdir, "metrics.jsonl")
      self._jsonl = open(path, "a")
      if self._jsonl.tell() and not _ends_with_newline(path):
        self._jsonl.write("\n")      # a run killed mid-row: the next row starts on its own line

  def write(self, step, scalars):
    if not self.enabled:
      return
    row = {"step": int(step)}
    for key, value in scalars.items():
      value = float(np.asarray(value))
      row[key] = value
      self._tb.add_scalar(key, value, int(step))
    self._jsonl.write(json.dumps(row) + "\n")
    self._jsonl.flush()

  def close(self):
    if self.enabled:
      self._tb.close()
      self._jsonl.close()
