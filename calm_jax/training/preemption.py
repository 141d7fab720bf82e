"""SIGTERM (preemption) handling: finish the step, save a checkpoint, stop cleanly.

One process: a signal handler sets a flag that the loop reads every step. Several
processes: jax's preemption sync point, which agrees on one step on every host so
that all of them take part in the same orbax save.
"""
import logging
import signal
import threading

import jax
from jax.experimental import multihost_utils


class PreemptionWatcher:
  """Context manager; `requested(step)` says whether to save and stop after `step`."""

  def __init__(self):
    self._flag = threading.Event()
    self._previous = None
    self._multi = jax.process_count() > 1

  def __enter__(self):
    if not self._multi and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
    return self

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
    return False

  def _on_sigterm(self, signum, frame):  # pylint: disable=unused-argument
    logging.warning("SIGTERM received: saving a checkpoint after the current step.")
    self._flag.set()

  def requested(self, step):
    if self._multi:
      try:
        return multihost_utils.reached_preemption_sync_point(step)
      except RuntimeError:      # no preemption service in this cluster setup
        return False
    return self._flag.is_set()
