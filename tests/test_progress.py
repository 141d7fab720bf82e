"""Progress off a terminal (calm_jax/progress.py): periodic log lines with rate and ETA; a tqdm bar on one."""
import io
import logging

import pytest
import tqdm

from calm_jax import progress
from calm_jax.data import tokenizer as tokenizer_lib

pytestmark = pytest.mark.unit


class FakeClock:
  def __init__(self):
    self.now = 100.0

  def __call__(self):
    return self.now


def _lines(caplog):
  return [r.getMessage() for r in caplog.records if r.name == "root" or r.module == "progress"]


def test_off_a_terminal_a_line_every_interval_with_rate_and_eta(caplog):
  clock = FakeClock()
  with caplog.at_level(logging.INFO):
    bar = progress.bar(total=1000, desc="eval ar", unit="tok", file=io.StringIO(),
                       log_every_s=30, clock=clock)
    assert isinstance(bar, progress.LogProgress)
    for _ in range(10):                   # 100 tokens every 10 s: a line every 30 s
      clock.now += 10
      bar.update(100)
    bar.set_postfix(loss="1.5")
    bar.close()
    bar.close()                           # closing twice logs once
  lines = _lines(caplog)
  assert lines[:3] == ["eval ar: 300/1000 tok (30%), 10 tok/s, ETA 01:10",
                       "eval ar: 600/1000 tok (60%), 10 tok/s, ETA 00:40",
                       "eval ar: 900/1000 tok (90%), 10 tok/s, ETA 00:10"]
  assert lines[3:] == ["eval ar: 1000/1000 tok (100%), 10 tok/s, done in 01:40, loss=1.5"]


def test_an_iterable_without_total_and_a_resumed_count(caplog):
  clock = FakeClock()
  with caplog.at_level(logging.INFO):
    bar = progress.bar(iter(range(3)), desc="convert", unit="tensor", file=io.StringIO(),
                       log_every_s=0, clock=clock)
    assert list(bar) == [0, 1, 2]
    resumed = progress.bar(total=10, initial=6, desc="ar", unit="step", file=io.StringIO(),
                           log_every_s=0, clock=clock)
    clock.now += 2
    resumed.update(2)                     # the rate counts this run's steps only
  assert _lines(caplog)[-1] == "ar: 8/10 step (80%), 1 step/s, ETA 00:02"
  assert "convert: 3 tensor" in _lines(caplog)[-2] and "done in" in _lines(caplog)[-2]


def test_a_terminal_gets_a_tqdm_bar_and_disabled_prints_nothing(caplog):
  class Terminal(io.StringIO):
    def isatty(self):
      return True

  stream = Terminal()
  with caplog.at_level(logging.INFO):
    bar = progress.bar(total=4, desc="prepare", unit="doc", file=stream)
    assert isinstance(bar, tqdm.tqdm)
    bar.update(4)
    bar.close()
    quiet = progress.bar(total=4, enabled=False, file=io.StringIO())
    quiet.update(4)
    quiet.close()
  assert "prepare: 100%" in stream.getvalue() and "doc/s" in stream.getvalue()
  assert not _lines(caplog)


def test_tokenizer_training_logs_its_progress_when_not_on_a_terminal(tmp_path, monkeypatch,
                                                                     caplog):
  texts = [f"line {i} of a small corpus about functions and modules\n" * 5 for i in range(200)]
  monkeypatch.setattr(progress, "LOG_EVERY_S", 0.0)
  monkeypatch.setattr("sys.stderr", io.StringIO())
  with caplog.at_level(logging.INFO):
    tokenizer_lib.train_tokenizer(texts, 300, str(tmp_path / "t.model"), max_chars=20_000)
  lines = [m for m in _lines(caplog) if m.startswith("tokenizer: reading text: ")]
  assert len(lines) > 2 and "char/s, ETA" in lines[0]       # one per update at interval 0
  assert lines[-1].startswith("tokenizer: reading text: 20.0k/20.0k char (100%)")
  assert "done in" in lines[-1]
