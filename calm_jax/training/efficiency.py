"""Step times, input wait and goodput of a training run, measured on the host without a device sync.

Steps finish on the device in order. The loop hands over each step's loss array when it
dispatches the step; `poll` stamps (non-blocking, `is_ready`) the steps already done at every
loop iteration, and `drain` blocks on them in order only where the loop blocks anyway (pulling
a logged step's metrics, before a save or an eval). Each stamp is thus within one loop
iteration of the step's true end, and the loop still dispatches step n+1 before it pulls step n.

Logged with every metrics row:
- step_time_s_p50 / _p90: wall time between the ends of consecutive steps, over the log window
  (it includes waiting for input; the first step after start-up or a pause starts its clock
  when its dispatch returns, so compile, saves and evals are not in it);
- data_wait_fraction: host time blocked on the input pipeline / step time, over the window;
- goodput: productive time / wall time over every attempt (restart) of the workdir so far.
  Productive = wall time less start-up (config, data, model, restore and compile, until the first
  step is dispatched), input waits, checkpoint saves, evals and profiler writes, less the work
  lost to a restart (steps redone since the checkpoint resumed from). Wall time counts while a
  trainer runs; the time between a kill and the rerun is not counted. The ledger is
  WORKDIR/goodput.json: the totals, this attempt's lost time by kind, and per saved step the
  productive seconds at that step. Input waits that overlap the device's previous step count
  as lost too, so an input-bound run's goodput is a lower bound.
"""
import collections
import contextlib
import json
import logging
import os
import time

import numpy as np

GOODPUT_FILE = "goodput.json"
_KEEP_CHECKPOINTS = 50                   # ledger entries kept (newest saved steps)


class StepTimes:
  """Ends of dispatched steps, stamped in order; per-window step time and input-wait statistics."""

  def __init__(self, clock):
    self.clock = clock
    self._inflight = collections.deque()   # (step, marker, data_wait_s), oldest first
    self._last_end = None                  # end of the previous step (None: no reference yet)
    self._intervals, self._waits = [], []

  def dispatched(self, step, marker, data_wait_s):
    if self._last_end is None and not self._inflight:
      # First step after start-up: its clock starts now (compile is over); its input wait was
      # before that, outside the interval.
      self._last_end, data_wait_s = self.clock(), 0.0
    self._inflight.append((step, marker, data_wait_s))

  def poll(self):
    """Stamps the steps already finished (never blocks)."""
    while self._inflight and self._inflight[0][1].is_ready():
      self._end_oldest()

  def drain(self, upto=None):
    """Blocks on the in-flight steps up to `upto` (all: None) in order, stamping each end."""
    while self._inflight and (upto is None or self._inflight[0][0] <= upto):
      self._inflight[0][1].block_until_ready()
      self._end_oldest()

  def _end_oldest(self):
    _, _, wait = self._inflight.popleft()
    now = self.clock()
    self._intervals.append(now - self._last_end)
    self._waits.append(wait)
    self._last_end = now

  def restart_clock(self):
    """After a pause (nothing in flight): the next step's time starts now."""
    self._last_end = self.clock()

  def window(self):
    """{step_time_s_p50, step_time_s_p90, data_wait_fraction} over the steps ended since the last
    call ({} when none ended), and the window's mean step time."""
    if not self._intervals:
      return {}, None
    intervals = np.asarray(self._intervals)
    total = float(intervals.sum())
    stats = {"step_time_s_p50": float(np.percentile(intervals, 50)),
             "step_time_s_p90": float(np.percentile(intervals, 90)),
             "data_wait_fraction": min(1.0, float(sum(self._waits)) / max(total, 1e-12))}
    self._intervals, self._waits = [], []
    return stats, total / len(intervals)


class Goodput:
  """The running goodput of a workdir over all its attempts, with its ledger in WORKDIR/goodput.json."""

  def __init__(self, workdir, start_step, started_at, clock, write=True):
    self.path = os.path.join(workdir, GOODPUT_FILE)
    self.clock, self.started_at, self.write_enabled = clock, started_at, write
    self.badput_s = 0.0                  # this attempt: start-up, input waits, saves, evals
    self.startup_s = None
    self.lost = {"startup_s": 0.0, "input_wait_s": 0.0, "pauses_s": 0.0}   # the same, by kind
    ledger = _read_ledger(self.path)
    self.saved = {int(k): v for k, v in ledger.get("saved", {}).items()}
    self.saved.setdefault(0, 0.0)        # step 0 needs no checkpoint: nothing done before it
    resumed = self.saved.get(start_step)
    if resumed is None:                  # a workdir from before the ledger: count from here
      logging.info("No goodput record for step %d in %s; goodput counts from this attempt.",
                   start_step, self.path)
      self.saved = {start_step: 0.0}
      resumed, ledger = 0.0, {}
    self.prev_wall_s = float(ledger.get("wall_s", 0.0))
    self.prev_productive_s = resumed
    self.lost_s = max(0.0, float(ledger.get("productive_s", 0.0)) - resumed)
    if self.lost_s:
      logging.info("Restart at step %d: %.1f s of earlier training since that checkpoint is redone.",
                   start_step, self.lost_s)

  def first_dispatch(self):
    """The first step of this attempt was dispatched (compiled): start-up ends."""
    if self.startup_s is None:
      self.startup_s = self.lost["startup_s"] = self.clock() - self.started_at
      self.badput_s += self.startup_s
      logging.info("Start-up (config, data, model, restore, compile) took %.1f s.", self.startup_s)

  def add_badput(self, seconds, kind):
    if self.startup_s is not None:       # before the first dispatch it is part of start-up
      self.badput_s += seconds
      self.lost[kind] += seconds

  def totals(self):
    """(productive_s, wall_s) over every attempt, up to now."""
    wall = self.clock() - self.started_at
    productive = max(0.0, wall - self.badput_s) if self.startup_s is not None else 0.0
    return self.prev_productive_s + productive, self.prev_wall_s + wall

  def value(self):
    productive, wall = self.totals()
    return productive / wall if wall > 0 else 0.0

  def record(self, step, saved=False):
    """Writes the ledger (at every logged step and save); `saved`: a checkpoint of `step` exists."""
    productive, wall = self.totals()
    if saved:
      self.saved[step] = productive
      for old in sorted(self.saved)[:-_KEEP_CHECKPOINTS]:
        del self.saved[old]
    if not self.write_enabled:
      return
    row = {"step": step, "wall_s": wall, "productive_s": productive, "goodput": self.value(),
           "this_attempt": {**self.lost, "wall_s": self.clock() - self.started_at,
                            "redone_s": self.lost_s},
           "saved": {str(k): v for k, v in sorted(self.saved.items())}}
    tmp = self.path + ".tmp"
    with open(tmp, "w") as f:
      json.dump(row, f, indent=1)
    os.replace(tmp, self.path)


def _read_ledger(path):
  if not os.path.exists(path):
    return {}
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError) as e:      # a torn or edited ledger: measure from this attempt
    logging.warning("Ignoring unreadable %s (%s); goodput counts from this attempt.", path, e)
    return {}


class Efficiency:
  """What the trainer calls: input waits, dispatches, pauses; `metrics` for every logged row."""

  def __init__(self, workdir, start_step, total_steps, started_at, write=True,
               clock=time.perf_counter):
    self.clock, self.total_steps = clock, total_steps
    self.times = StepTimes(clock)
    self.goodput = Goodput(workdir, start_step, started_at, clock, write)
    self._wait = 0.0
    self.eta_s = None

  @contextlib.contextmanager
  def input_wait(self):
    """Around the host's wait for the next batch (input pipeline and device transfer)."""
    start = self.clock()
    yield
    self._wait = self.clock() - start
    self.goodput.add_badput(self._wait, "input_wait_s")

  def dispatched(self, step, marker):
    """Step `step` (updates done once it ends) was dispatched; `marker` is one of its outputs."""
    self.goodput.first_dispatch()
    self.times.dispatched(step, marker, self._wait)
    self._wait = 0.0
    self.times.poll()

  def drain(self, upto=None):
    self.times.drain(upto)

  @contextlib.contextmanager
  def paused(self):
    """Around host work that is not training (saves, evals, profiler writes): it is badput and
    outside every step time. In-flight steps are waited for (and stamped) first."""
    self.times.drain()
    start = self.clock()
    try:
      yield
    finally:
      self.goodput.add_badput(self.clock() - start, "pauses_s")
      self.times.restart_clock()

  def metrics(self, step):
    """The efficiency scalars of a logged row for `step`; also writes the goodput ledger."""
    stats, mean_step_s = self.times.window()
    if mean_step_s is not None:
      self.eta_s = mean_step_s * max(0, self.total_steps - step)
    self.goodput.record(step)
    return {**stats, "goodput": self.goodput.value()}

  def saved(self, step):
    self.goodput.record(step, saved=True)
