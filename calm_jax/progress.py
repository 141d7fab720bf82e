"""Progress of long steps: a tqdm bar with rate and ETA on a terminal, periodic log lines otherwise.

`bar(...)` is used by calm-prepare, tokenizer training, eval, generation, convert and the trainer.
Where the output stream is not a terminal (a batch job's log file, CI), a bar would write
carriage-return updates into the file; instead one INFO line goes to the log every
LOG_EVERY_S seconds and at the end: "eval ar: 40.0k/100k tok (40%), 2.1k tok/s, ETA 00:28".
"""
import logging
import sys
import time

import tqdm

LOG_EVERY_S = 30.0


def bar(iterable=None, *, total=None, desc="", unit="it", unit_scale=False, initial=0,
        enabled=True, file=None, log_every_s=None, clock=time.monotonic):
  """A tqdm bar on a terminal, else a LogProgress with the same update/set_postfix/close.

  Like tqdm, it wraps an iterable (total: its length when it has one) or is updated by hand.
  """
  stream = file or sys.stderr
  if total is None and hasattr(iterable, "__len__"):
    total = len(iterable)
  if not enabled:
    return tqdm.tqdm(iterable, total=total, disable=True)
  if _is_terminal(stream):
    return tqdm.tqdm(iterable, total=total, desc=desc, unit=unit, unit_scale=unit_scale,
                     initial=initial, file=stream, dynamic_ncols=True)
  return LogProgress(iterable, total, desc, unit, unit_scale, initial,
                     LOG_EVERY_S if log_every_s is None else log_every_s, clock)


def format_interval(seconds):
  """Seconds as [H:]MM:SS, as tqdm shows an ETA."""
  return tqdm.tqdm.format_interval(seconds)


def format_count(n, unit_scale=True):
  """A count as a log line shows it: 25, 13.5, 2.38k (unit_scale: k, M, G above 999)."""
  if unit_scale and n >= 1000:
    return tqdm.tqdm.format_sizeof(n)
  return f"{n:.3g}" if n < 100 else f"{n:.0f}"


def _is_terminal(stream):
  try:
    return stream.isatty()
  except (AttributeError, ValueError):  # a replaced or closed stream
    return False


class LogProgress:
  """tqdm's update / set_postfix / close (and `with`), as a log line every log_every_s seconds."""

  def __init__(self, iterable, total, desc, unit, unit_scale, initial, log_every_s, clock):
    self.iterable = iterable
    self.total, self.desc, self.unit, self.unit_scale = total, desc, unit, unit_scale
    self.n, self._initial, self.log_every_s, self.clock = initial, initial, log_every_s, clock
    self.start = self.last_log = clock()
    self.postfix, self.closed = "", False

  def __enter__(self):
    return self

  def __exit__(self, exc_type, *exc):
    if exc_type is None:
      self.close()
    else:           # failed: no "done in" line
      self.closed = True

  def __iter__(self):
    for item in self.iterable:
      yield item
      self.update(1)
    self.close()

  def update(self, n=1):
    self.n += n
    now = self.clock()
    if now - self.last_log >= self.log_every_s:
      self._log(now)

  def set_postfix(self, **values):
    self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

  def _count(self, n):
    return format_count(n, self.unit_scale)

  def line(self, now, done=False):
    """The progress line at time `now`."""
    elapsed = max(now - self.start, 1e-9)
    rate = (self.n - self._initial) / elapsed
    count = self._count(self.n)
    if self.total:
      count += f"/{self._count(self.total)} {self.unit} ({100 * self.n / self.total:.0f}%)"
    else:
      count += f" {self.unit}"
    text = f"{self.desc}: {count}, {self._count(rate)} {self.unit}/s"
    if done:
      text += f", done in {tqdm.tqdm.format_interval(elapsed)}"
    elif self.total and rate > 0:
      text += f", ETA {tqdm.tqdm.format_interval(max(0, self.total - self.n) / rate)}"
    return text + (f", {self.postfix}" if self.postfix else "")

  def _log(self, now, done=False):
    self.last_log = now
    logging.info("%s", self.line(now, done))

  def close(self):
    if not self.closed:
      self.closed = True
      self._log(self.clock(), done=True)
