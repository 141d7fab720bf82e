"""Tests of calm-prepare at scale: parts, shards split across machines and workers, done-markers and resume."""
import gzip
import json
import os

import pytest
import zstandard

from calm_jax.data import prepare
from calm_jax.data import prepare_inputs
from calm_jax.data import sources

pytestmark = pytest.mark.unit


def _corpus(tmp_path):
  """Two compressed JSONL files (one bad line) and a plain one: 3 units, several parts each."""
  docs = [f"Document {i}: " + "lorem ipsum " * (i % 11) for i in range(120)]
  lines = [json.dumps({"text": d}) for d in docs]
  lines[50] = '{"text": "cut'
  (tmp_path / "a.jsonl.zst").write_bytes(
      zstandard.ZstdCompressor().compress(("\n".join(lines[:50]) + "\n").encode()))
  (tmp_path / "b.jsonl.gz").write_bytes(gzip.compress(("\n".join(lines[50:90]) + "\n").encode()))
  (tmp_path / "c.jsonl").write_text("\n".join(lines[90:]) + "\n")
  spec = (f"jsonl:{tmp_path}/a.jsonl.zst,jsonl:{tmp_path}/b.jsonl.gz,"
          f"jsonl:{tmp_path}/c.jsonl")
  return spec, [d for i, d in enumerate(docs) if i != 50]


def _records(output_dir):
  return [r.tolist() for r in _all(sources.parse_spec(f"arrayrecord:{output_dir}"))]


def _all(source):
  return [source[i] for i in range(len(source))]


def test_assign_gives_every_part_exactly_one_owner():
  for n_units in (1, 2, 7):
    for machines in (1, 3, 4):
      for workers in (1, 2, 5):
        for u in range(n_units):
          for part in range(9):
            owners = [(m, w) for m in range(machines) for w in range(workers)
                      if prepare_inputs.owner(n_units, [(machines, m), (workers, w)], u, part)]
            assert len(owners) == 1, (n_units, machines, workers, u, part, owners)
            m, w = owners[0]
            assert prepare_inputs.reads_unit(n_units, [(machines, m), (workers, w)], u)


def test_shards_are_the_same_for_any_split_and_keep_the_source_order(
    tmp_path, tiny_tokenizer, tiny_tokenizer_path):
  spec, docs = _corpus(tmp_path)
  expected = [tiny_tokenizer.encode(d) for d in docs]
  kw = dict(max_bad_fraction=0.05, part_bytes=1500)
  whole = prepare.prepare(spec, tiny_tokenizer_path, str(tmp_path / "whole"), **kw)
  assert whole["complete"] and whole["total"]["bad"] == 1 and whole["total"]["documents"] == 119
  assert whole["total"]["shards"] == whole["parts"] > 6
  assert _records(tmp_path / "whole") == expected
  split = str(tmp_path / "split")
  for index in range(3):  # three array jobs
    summary = prepare.prepare(spec, tiny_tokenizer_path, split, num_shards=3,
                              shard_index=index, **kw)
    assert summary["complete"] == (index == 2) and 0 < summary["parts"] < whole["parts"]
  assert _records(split) == expected
  with open(os.path.join(split, prepare.SUMMARY_FILE)) as f:
    assert json.load(f)["tokens"] == sum(len(e) for e in expected)
  workers = prepare.prepare(spec, tiny_tokenizer_path, str(tmp_path / "workers"),
                            num_workers=2, **kw)
  assert workers["parts"] == whole["parts"] and _records(tmp_path / "workers") == expected
  names = sorted(os.listdir(tmp_path / "whole"))
  assert sorted(os.listdir(tmp_path / "workers")) == names
  assert not [n for n in names if n.endswith(".tmp")]


def test_a_crashed_prepare_resumes_where_it_stopped(tmp_path, tiny_tokenizer_path,
                                                    monkeypatch):
  spec, _ = _corpus(tmp_path)
  kw = dict(max_bad_fraction=0.05, part_bytes=1500)
  reference = prepare.prepare(spec, tiny_tokenizer_path, str(tmp_path / "ref"), **kw)
  write_part = prepare._write_part  # pylint: disable=protected-access
  written = []

  def crash_on_the_fourth_part(output_dir, unit, part, *args):
    if len(written) == 3:
      # Half a shard on disk, no done-marker: as a kill -9 leaves it.
      open(prepare.shard_path(output_dir, unit, part) + ".tmp", "wb").write(b"half")
      raise KeyboardInterrupt
    written.append((unit, part))
    return write_part(output_dir, unit, part, *args)

  monkeypatch.setattr(prepare, "_write_part", crash_on_the_fourth_part)
  out = str(tmp_path / "out")
  with pytest.raises(KeyboardInterrupt):
    prepare.prepare(spec, tiny_tokenizer_path, out, **kw)
  monkeypatch.setattr(prepare, "_write_part", write_part)
  assert len(sources.parse_spec(f"arrayrecord:{out}")) > 0  # only complete shards are read
  resumed = prepare.prepare(spec, tiny_tokenizer_path, out, **kw)
  assert resumed["parts"] == reference["parts"] - 3 and resumed["complete"]
  assert _records(out) == _records(tmp_path / "ref")
  assert resumed["total"] == reference["total"]


def test_prepare_reads_parquet_and_refuses_mixed_directories(tmp_path, tiny_tokenizer,
                                                              tiny_tokenizer_path):
  import pyarrow as pa  # pylint: disable=g-import-not-at-top
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  texts = [f"row {i} " + "text " * i for i in range(25)]
  pq.write_table(pa.table({"content": texts}), str(tmp_path / "p.parquet"), row_group_size=10)
  summary = prepare.prepare(f"parquet:{tmp_path}/p.parquet#content", tiny_tokenizer_path,
                            str(tmp_path / "out"))
  assert summary["total"]["shards"] == 3  # one per row group
  assert _records(tmp_path / "out") == [tiny_tokenizer.encode(t) for t in texts]
  with pytest.raises(sources.DataError, match="has weights"):
    prepare.prepare(f"parquet:{tmp_path}/p.parquet#content@1", tiny_tokenizer_path,
                    str(tmp_path / "w"))
  (tmp_path / "old").mkdir()
  (tmp_path / "old" / "data-00000-of-00001.array_record").write_bytes(b"")
  with pytest.raises(sources.DataError, match="no prepare_plan.json"):
    prepare.prepare("builtin:python_docs:valid", tiny_tokenizer_path, str(tmp_path / "old"))
