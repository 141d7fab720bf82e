"""calm-prepare's progress: one bar in the main process over the parts this process owns.

The bar (calm_jax/progress.py: tqdm with rate and ETA on a terminal, a log line every
progress.LOG_EVERY_S otherwise) counts input: bytes when every unit is a jsonl:/lines: file,
else records (documents, empty and bad lines). Its total is known when every unit's parts
are (prepare_inputs.part_sizes: uncompressed line files by their bytes, Parquet by its
row-group row counts, random-access sources by their length); a compressed line file has
no total: rate without ETA. Parts with a done-marker (an earlier run) are the bar's initial
count. Workers (prepare.work) report what they read through a Reporter: in this process
directly, from pool workers through a multiprocessing queue the main process drains.
"""
import concurrent.futures
import glob
import json
import os
import re
import time

from calm_jax import progress
from calm_jax.data import prepare_inputs

REPORT_EVERY_S = 0.5   # a worker sends its counts at most this often (and after each part)
_FIELDS = ("records", "bytes", "documents", "tokens", "parts")
_queue = None          # a pool worker's queue to the main process (set by set_queue)


class Reporter:
  """A worker's counts, sent on (send(dict of _FIELDS)) every REPORT_EVERY_S and after a part."""

  def __init__(self, send, clock=time.monotonic):
    self._send, self._clock = send, clock
    self._counts = dict.fromkeys(_FIELDS, 0)
    self._last = clock()

  def add(self, **counts):
    for k, v in counts.items():
      self._counts[k] += v
    now = self._clock()
    if counts.get("parts") or now - self._last >= REPORT_EVERY_S:
      self._last = now
      self._send(self._counts)
      self._counts = dict.fromkeys(_FIELDS, 0)


def set_queue(queue):
  """A pool worker's initializer: its reports go to `queue`."""
  global _queue
  _queue = queue


def queue_reporter():
  """The Reporter of a pool worker (after set_queue), or one that sends nowhere."""
  return Reporter(_queue.put if _queue is not None else lambda counts: None)


def _markers(output_dir, u):
  """{part: done-marker path} of unit u already in output_dir."""
  pattern = re.compile(rf"data-{u:05d}-(\d+)\.array_record\.done$")
  found = {}
  for path in glob.glob(os.path.join(output_dir, f"data-{u:05d}-*.array_record.done")):
    match = pattern.search(path)
    if match:
      found[int(match.group(1))] = path
  return found


def extent(units, machines, output_dir, part_bytes, part_docs):
  """(unit 'B' or 'rec', total or None, initial) of the parts owned by `machines`' levels."""
  by_bytes = all(u.scheme in prepare_inputs.LINE_SCHEMES for u in units)
  total, initial = 0, 0
  for u, unit in enumerate(units):
    if not prepare_inputs.reads_unit(len(units), machines, u):
      continue
    if total is not None and (by_bytes or unit.scheme not in prepare_inputs.LINE_SCHEMES):
      sizes = prepare_inputs.part_sizes(unit, part_bytes, part_docs)
      total = None if sizes is None else total + sum(
          s for p, s in enumerate(sizes) if prepare_inputs.owner(len(units), machines, u, p))
    else:
      total = None
    for part, marker in _markers(output_dir, u).items():
      if prepare_inputs.owner(len(units), machines, u, part):
        with open(marker) as f:
          counts = json.load(f)
        # A marker of a prepare older than progress has no "bytes": it counts 0 here.
        initial += counts.get("bytes", 0) if by_bytes else counts["lines"]
  return ("B" if by_bytes else "rec"), total, initial


class Display:
  """The main process's bar: add(counts) from every worker; documents, tokens, shards as postfix."""

  def __init__(self, unit, total, initial):
    self._by_bytes = unit == "B"
    self.bar = progress.bar(total=total, initial=initial, desc="calm-prepare", unit=unit,
                            unit_scale=True)
    self.counts = dict.fromkeys(_FIELDS, 0)

  def add(self, counts):
    for k in _FIELDS:
      self.counts[k] += counts[k]
    self.bar.set_postfix(documents=progress.format_count(self.counts["documents"]),
                         tokens=progress.format_count(self.counts["tokens"]),
                         shards=self.counts["parts"])
    self.bar.update(counts["bytes"] if self._by_bytes else counts["records"])

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    return self.bar.__exit__(*exc)


def wait(futures, queue, display, poll_s=0.2):
  """Shows the queue's reports until every future is done (a failed one included)."""
  pending = set(futures)
  while pending:
    _, pending = concurrent.futures.wait(pending, timeout=poll_s)
    while not queue.empty():  # a SimpleQueue: a worker's puts are here before its result
      display.add(queue.get())
