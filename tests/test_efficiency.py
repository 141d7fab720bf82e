"""Step times, data-wait fraction and goodput arithmetic (calm_jax/training/efficiency.py) on a fake clock."""
import json
import os

import pytest

from calm_jax.training import efficiency

pytestmark = pytest.mark.unit


class FakeClock:
  def __init__(self):
    self.now = 0.0

  def __call__(self):
    return self.now

  def advance(self, seconds):
    self.now += seconds


class FakeDevice:
  """Steps that run one after another on a device: step i ends at ends[i] on the fake clock."""

  def __init__(self, clock):
    self.clock, self.ends = clock, {}

  def marker(self, step, end):
    self.ends[step] = end
    device = self

    class Marker:
      def is_ready(self):
        return device.clock.now >= end

      def block_until_ready(self):
        device.clock.now = max(device.clock.now, end)

    return Marker()


def _run_steps(eff, clock, device, first, last, wait_s, step_s):
  """Steps first..last: wait_s on input, dispatch; the device runs each step_s after the previous
  one ends (or after its dispatch, when the device was idle)."""
  device_free = clock.now
  for step in range(first, last + 1):
    with eff.input_wait():
      clock.advance(wait_s)
    end = max(device_free, clock.now) + step_s
    device_free = end
    eff.dispatched(step, device.marker(step, end))


def test_device_bound_steps_are_timed_from_their_ends_without_a_sync_per_step(tmp_path):
  clock = FakeClock()
  eff = efficiency.Efficiency(str(tmp_path), 0, 100, started_at=0.0, clock=clock)
  device = FakeDevice(clock)
  clock.advance(10.0)                                   # start-up and compile
  # The host dispatches 4 steps in 0.4 s while each takes 2 s on the device: it runs ahead,
  # and nothing blocks until the loop pulls step 4's metrics (drain).
  _run_steps(eff, clock, device, 1, 4, wait_s=0.1, step_s=2.0)
  assert clock.now == pytest.approx(10.4)               # no wait on the device so far
  eff.drain(4)
  assert clock.now == pytest.approx(10.1 + 4 * 2.0)
  row = eff.metrics(4)
  assert row["step_time_s_p50"] == pytest.approx(2.0)   # the first from its dispatch (after
  assert row["step_time_s_p90"] == pytest.approx(2.0)   # its input wait), the rest end to end
  assert row["data_wait_fraction"] == pytest.approx(0.3 / 8.0)   # 3 waits inside the intervals
  # goodput: wall 18.1 s; lost: 10 s start-up (its 0.1 s input wait is before the first dispatch)
  # + 0.3 s of input waits.
  assert row["goodput"] == pytest.approx((18.1 - 10.1 - 0.3) / 18.1)
  assert eff.eta_s == pytest.approx(96 * 2.0)


def test_input_bound_steps_show_the_wait_fraction(tmp_path):
  clock = FakeClock()
  eff = efficiency.Efficiency(str(tmp_path), 0, 10, started_at=0.0, clock=clock)
  device = FakeDevice(clock)
  _run_steps(eff, clock, device, 1, 1, wait_s=0.0, step_s=0.5)
  eff.drain()
  eff.metrics(1)                                         # window of the first step
  # Each batch takes 1.5 s; the device computes a step (0.5 s) while the host waits for the
  # next batch, so steps end every 1.5 s (at 2.5, 4.0, 5.5, 7.0). A step's end is seen after
  # the host's next input wait (poll), the last one when its metrics are pulled (drain).
  _run_steps(eff, clock, device, 2, 5, wait_s=1.5, step_s=0.5)
  eff.drain(5)
  row = eff.metrics(5)
  assert clock.now == pytest.approx(7.0)
  assert row["step_time_s_p50"] == pytest.approx(1.5)
  assert row["data_wait_fraction"] == pytest.approx(4 * 1.5 / (7.0 - 0.5))
  assert row["goodput"] == pytest.approx((7.0 - 6.0) / 7.0)   # only input waits are lost


def test_pauses_are_badput_and_outside_step_times(tmp_path):
  clock = FakeClock()
  eff = efficiency.Efficiency(str(tmp_path), 0, 10, started_at=0.0, clock=clock)
  device = FakeDevice(clock)
  clock.advance(5.0)
  _run_steps(eff, clock, device, 1, 2, wait_s=0.0, step_s=1.0)
  with eff.paused():                                     # a checkpoint save: waits for step 2
    assert clock.now == pytest.approx(7.0)
    eff.saved(2)
    clock.advance(3.0)
  _run_steps(eff, clock, device, 3, 3, wait_s=0.0, step_s=1.0)
  eff.drain()
  row = eff.metrics(3)
  assert row["step_time_s_p90"] == pytest.approx(1.0)   # the save is in no step's time
  assert row["goodput"] == pytest.approx(3.0 / 11.0)    # 3 steps of 1 s in 11 s
  with open(os.path.join(tmp_path, efficiency.GOODPUT_FILE)) as f:
    ledger = json.load(f)
  assert ledger["saved"]["2"] == pytest.approx(2.0)     # productive seconds at the saved step
  assert ledger["this_attempt"] == pytest.approx({"startup_s": 5.0, "input_wait_s": 0.0,
                                                  "pauses_s": 3.0, "wall_s": 11.0,
                                                  "redone_s": 0.0})


def test_a_restart_counts_earlier_wall_time_and_the_work_it_redoes(tmp_path):
  clock = FakeClock()
  first = efficiency.Efficiency(str(tmp_path), 0, 10, started_at=0.0, clock=clock)
  device = FakeDevice(clock)
  clock.advance(4.0)
  _run_steps(first, clock, device, 1, 2, wait_s=0.0, step_s=1.0)
  with first.paused():
    first.saved(2)                                       # checkpoint at step 2: 2 s productive
  _run_steps(first, clock, device, 3, 4, wait_s=0.0, step_s=1.0)
  first.drain()
  first.metrics(4)                                       # last record: 4 s productive, 8 s wall
  # Killed here. The rerun resumes from step 2's checkpoint: steps 3-4 (2 s) are redone.
  clock.now = 100.0                                      # downtime between attempts: not counted
  second = efficiency.Efficiency(str(tmp_path), 2, 10, started_at=100.0, clock=clock)
  assert second.goodput.lost_s == pytest.approx(2.0)
  clock.advance(4.0)                                     # start-up again
  _run_steps(second, clock, device, 3, 4, wait_s=0.0, step_s=1.0)
  second.drain()
  row = second.metrics(4)
  # productive: 2 s (steps 1-2) + 2 s (steps 3-4 again); wall: 8 s + 6 s.
  assert row["goodput"] == pytest.approx(4.0 / 14.0)


def test_a_workdir_without_a_ledger_for_the_resumed_step_counts_from_this_attempt(tmp_path):
  clock = FakeClock()
  eff = efficiency.Efficiency(str(tmp_path), 50, 60, started_at=0.0, clock=clock)
  device = FakeDevice(clock)
  clock.advance(1.0)
  _run_steps(eff, clock, device, 51, 52, wait_s=0.0, step_s=1.0)
  eff.drain()
  assert eff.metrics(52)["goodput"] == pytest.approx(2.0 / 3.0)


@pytest.mark.parametrize("steps", [(3, 3), (5, 2), (-1, 2), (1, 2, 3)])
def test_bad_profile_steps_are_refused_naming_the_field(steps):
  from calm_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  from tests import run_helpers  # pylint: disable=g-import-not-at-top
  config = run_helpers.tiny_run_config("ar_baseline.py:size=tiny", "t.model", 400,
                                       train__profile_steps=steps)
  with pytest.raises(config_lib.ConfigError, match="config.train.profile_steps"):
    config_lib.validate(config)
