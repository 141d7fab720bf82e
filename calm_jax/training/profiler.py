"""config.train.profile_steps=(start, stop): a jax.profiler trace of those training steps in WORKDIR/profile.

The trace holds the updates that take the run from step `start` to step `stop` (steps counted
as in metrics.jsonl), input pipeline included; (0, 0) traces nothing. Every process writes its
own trace (WORKDIR/profile/plugins/profile/<time>/<host>.xplane.pb), which TensorBoard's profile
plugin (`pip install tensorboard-plugin-profile`, `tensorboard --logdir WORKDIR/profile`) and
xprof read. Stopping waits for the traced steps to finish (one device sync, only then).
"""
import logging
import os

import jax

PROFILE_DIR = "profile"


class Profiler:
  """Starts the trace before step `start` and stops it once step `stop` has finished."""

  def __init__(self, profile_steps, workdir, first_step):
    start, stop = (int(s) for s in profile_steps)
    self.log_dir = os.path.join(workdir, PROFILE_DIR)
    # A run resumed inside the window traces from its first step; one resumed past it, nothing.
    self.start = max(start, first_step)
    self.stop = stop
    self.active = False

  def before_step(self, step):
    """Called with the number of updates done before the next one is fetched and dispatched."""
    if step == self.start and step < self.stop:
      os.makedirs(self.log_dir, exist_ok=True)
      jax.profiler.start_trace(self.log_dir)
      self.active = True

  def after_step(self, done, pause):
    """Stops after step `stop`; pause: a context that first waits for the dispatched steps to
    finish (Efficiency.paused), so the trace holds them and its write is no step's time."""
    if self.active and done >= self.stop:
      with pause():
        self.close()

  def close(self):
    if self.active:
      jax.profiler.stop_trace()
      self.active = False
      logging.info("Wrote a profile of steps %d-%d to %s (tensorboard --logdir %s).",
                   self.start, self.stop, self.log_dir, self.log_dir)
