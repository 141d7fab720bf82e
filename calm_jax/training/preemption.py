"""SIGTERM (preemption) and Ctrl-C handling: finish the step, save a checkpoint, stop cleanly.

One process: a signal handler sets a flag that the loop reads every step; SIGINT is
treated like SIGTERM, and a second SIGINT exits at once (KeyboardInterrupt). Several
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
    self._previous = {}
    self._multi = jax.process_count() > 1

  def __enter__(self):
    if not self._multi and threading.current_thread() is threading.main_thread():
      for signum in (signal.SIGTERM, signal.SIGINT):
        self._previous[signum] = signal.signal(signum, self._on_signal)
    return self

  def __exit__(self, *exc):
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)
    self._previous = {}
    return False

  def _on_signal(self, signum, frame):  # pylint: disable=unused-argument
    name = signal.Signals(signum).name
    if signum == signal.SIGINT and self._flag.is_set():
      raise KeyboardInterrupt("second Ctrl-C: exiting without waiting for the checkpoint")
    logging.warning("%s received: saving a checkpoint after the current step%s.", name,
                    " (Ctrl-C again to exit at once)" if signum == signal.SIGINT else "")
    self._flag.set()

  def requested(self, step):
    if self._multi:
      try:
        return multihost_utils.reached_preemption_sync_point(step)
      except RuntimeError:      # no preemption service in this cluster setup
        return False
    return self._flag.is_set()
