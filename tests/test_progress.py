"""Progress off a terminal (calm_jax/progress.py): periodic log lines with rate and ETA; a tqdm bar on one."""
import io
import json
import logging
import os

import pytest
import tqdm

from calm_jax import progress
from calm_jax.data import prepare
from calm_jax.data import prepare_inputs
from calm_jax.data import prepare_progress
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


def _prepare_lines(caplog):
  return [m for m in _lines(caplog) if m.startswith("calm-prepare: ")]


def test_prepare_logs_its_progress_off_a_terminal(tmp_path, tiny_tokenizer_path, monkeypatch,
                                                  caplog):
  data = tmp_path / "c.jsonl"
  data.write_text("".join(json.dumps({"text": f"doc {i} " * (1 + i % 7)}) + "\n"
                          for i in range(60)))
  size, part_bytes = os.path.getsize(data), os.path.getsize(data) // 4
  sizes = prepare_inputs.line_part_sizes(str(data), part_bytes)
  monkeypatch.setattr(progress, "LOG_EVERY_S", 0.0)            # a line per report
  monkeypatch.setattr(prepare_progress, "REPORT_EVERY_S", 0.0)  # a report per batch
  monkeypatch.setattr("sys.stderr", io.StringIO())              # not a terminal
  spec, out = f"jsonl:{data}", str(tmp_path / "D")
  with caplog.at_level(logging.INFO):
    prepare.prepare(spec, tiny_tokenizer_path, out, part_bytes=part_bytes)
  lines = _prepare_lines(caplog)
  assert len(lines) > len(sizes) and "%), " in lines[0] and ", ETA " in lines[0]
  total = tqdm.tqdm.format_sizeof(size)  # 2.38k
  assert lines[-1].startswith(f"calm-prepare: {total}/{total} B (100%), ")
  assert "done in" in lines[-1] and "documents=60, " in lines[-1]
  assert f"shards={len(sizes)}" in lines[-1]
  markers = [json.load(open(prepare.shard_path(out, 0, p) + ".done")) for p in range(len(sizes))]
  assert [m["bytes"] for m in markers] == sizes  # the total is exact
  # A resume: the parts done earlier are the initial count.
  os.remove(prepare.shard_path(out, 0, 1) + ".done")
  assert prepare_progress.extent(prepare_inputs.units(spec), [], out, part_bytes, 50) == (
      "B", size, size - sizes[1])
  caplog.clear()
  with caplog.at_level(logging.INFO):
    prepare.prepare(spec, tiny_tokenizer_path, out, part_bytes=part_bytes)
  lines = _prepare_lines(caplog)
  assert lines[-1].startswith(f"calm-prepare: {total}/{total} B (100%)")
  assert f"documents={markers[1]['documents']}, " in lines[-1] and "shards=1" in lines[-1]
  # One machine of two: its parts only.
  caplog.clear()
  with caplog.at_level(logging.INFO):
    prepare.prepare(spec, tiny_tokenizer_path, str(tmp_path / "S"), part_bytes=part_bytes,
                    num_shards=2, shard_index=1)
  mine = tqdm.tqdm.format_sizeof(sum(sizes[1::2]))
  assert _prepare_lines(caplog)[-1].startswith(f"calm-prepare: {mine}/{mine} B (100%)")


def test_prepare_workers_report_to_one_bar(tmp_path, tiny_tokenizer_path, monkeypatch, caplog):
  import pyarrow as pa  # pylint: disable=g-import-not-at-top
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  pq.write_table(pa.table({"text": [f"row {i} " * i for i in range(25)]}),
                 str(tmp_path / "p.parquet"), row_group_size=10)
  monkeypatch.setattr(progress, "LOG_EVERY_S", 0.0)
  monkeypatch.setattr("sys.stderr", io.StringIO())
  with caplog.at_level(logging.INFO):
    prepare.prepare(f"parquet:{tmp_path}/p.parquet", tiny_tokenizer_path,
                    str(tmp_path / "D"), num_workers=2)
  lines = _prepare_lines(caplog)
  assert lines[-1].startswith("calm-prepare: 25/25 rec (100%), ")  # rows: Parquet metadata
  assert "documents=24, " in lines[-1] and "shards=3" in lines[-1]   # row 0 is empty
