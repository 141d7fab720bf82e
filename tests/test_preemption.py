"""Signal handling of the training loop: SIGTERM and Ctrl-C save then stop (issue 14, item 6)."""
import os
import signal

import pytest

from calm_jax.training import preemption

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_requests_a_save_and_the_handlers_are_restored(signum):
  before = signal.getsignal(signum)
  with preemption.PreemptionWatcher() as watcher:
    assert not watcher.requested(0)
    os.kill(os.getpid(), signum)
    assert watcher.requested(1)
  assert signal.getsignal(signum) is before


def test_a_second_ctrl_c_exits_at_once():
  with preemption.PreemptionWatcher() as watcher:
    os.kill(os.getpid(), signal.SIGINT)
    assert watcher.requested(1)
    with pytest.raises(KeyboardInterrupt):
      os.kill(os.getpid(), signal.SIGINT)
