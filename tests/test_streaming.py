"""Tests of streaming sources (.gz/.zst, Parquet), the line-offset index, bad-line counting and weighted mixtures."""
import gzip
import json
import logging
import os

import numpy as np
import pytest
import zstandard

from calm_jax.data import line_index
from calm_jax.data import pipeline
from calm_jax.data import sources

pytestmark = pytest.mark.unit


def _jsonl_bytes(texts):
  return "".join(json.dumps({"text": t}) + "\n" for t in texts).encode()


def _write(path, data):
  if path.name.endswith(".zst"):
    data = zstandard.ZstdCompressor().compress(data)
  elif path.name.endswith(".gz"):
    data = gzip.compress(data)
  path.write_bytes(data)
  return path


def _write_parquet(path, texts, row_group_size):
  import pyarrow as pa  # pylint: disable=g-import-not-at-top
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  pq.write_table(pa.table({"body": texts, "n": list(range(len(texts)))}), str(path),
                 row_group_size=row_group_size)
  return path


def _batches(it, n):
  return [next(it) for _ in range(n)]


def _assert_same(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x["tokens"], y["tokens"])
    np.testing.assert_array_equal(x["mask"], y["mask"])


@pytest.mark.parametrize("suffix", [".jsonl.zst", ".jsonl.gz"])
def test_compressed_jsonl_streams_and_resumes_exactly(tmp_path, tiny_tokenizer, suffix):
  for f in range(3):
    _write(tmp_path / f"part{f}{suffix}",
           _jsonl_bytes([f"File {f} document {i}: " + "words " * (i % 7) for i in range(40)]))
  spec = f"jsonl:{tmp_path}/*{suffix}"
  source = sources.parse_spec(spec)
  assert sources.is_stream(source)
  assert len(list(source.texts())) == 120
  for process in range(2):  # each process resumes its own slice
    kw = dict(seq_len=16, batch_size=3, shuffle=True, seed=3, repeat=True,
              process_index=process, process_count=2)
    it = iter(pipeline.make_dataset(spec, tiny_tokenizer, **kw))
    _batches(it, 37)  # past the first epoch of this process's ~60 documents
    state = json.loads(json.dumps(it.get_state()))
    expected = _batches(it, 25)
    restored = iter(pipeline.make_dataset(spec, tiny_tokenizer, **kw))
    restored.set_state(state)
    _assert_same(_batches(restored, 25), expected)


def test_stream_epochs_shuffle_files_and_processes_split_documents(tmp_path):
  for f in range(4):
    _write(tmp_path / f"{f}.txt.zst", "".join(f"f{f} line {i}\n" for i in range(5)).encode())
  source = sources.parse_spec(f"lines:{tmp_path}/*.txt.zst")
  everything = sorted(source.texts())
  assert len(everything) == 20 and everything[0] == "f0 line 0"
  from calm_jax.data import streams  # pylint: disable=g-import-not-at-top
  taken = []
  for p in range(3):
    ds = streams.StreamDataset(source, shuffle=True, seed=0, repeat=False, process_index=p,
                               process_count=3)
    taken.append(list(ds))
  assert sorted(sum(taken, [])) == everything  # disjoint, and together every document
  epochs = streams.StreamDataset(source, shuffle=True, seed=0, repeat=True, process_index=0,
                                 process_count=1)
  it = iter(epochs)
  first, second = [next(it) for _ in range(20)], [next(it) for _ in range(20)]
  assert sorted(first) == sorted(second) == everything and first != second


def test_parquet_reads_a_column_row_group_by_row_group_and_resumes(tmp_path, tiny_tokenizer):
  texts = [f"Parquet row {i} " + "text " * (i % 5) for i in range(50)]
  texts[7] = None  # a null cell is a bad record
  _write_parquet(tmp_path / "a.parquet", texts[:30], row_group_size=8)
  _write_parquet(tmp_path / "b.parquet", texts[30:], row_group_size=8)
  spec = f"parquet:{tmp_path}/*.parquet#body"
  with pytest.raises(sources.DataError, match=r"a.parquet:8: column 'body' is not text"):
    list(sources.parse_spec(spec).texts())
  source = sources.parse_spec(spec, max_bad_fraction=0.05)
  assert list(source.texts()) == [t for t in texts if t is not None]
  with pytest.raises(sources.DataError, match="has no column 'text'"):
    sources.parse_spec(f"parquet:{tmp_path}/*.parquet")
  kw = dict(seq_len=8, batch_size=2, shuffle=True, seed=1, repeat=True, max_bad_fraction=0.05)
  it = iter(pipeline.make_dataset(spec, tiny_tokenizer, **kw))
  _batches(it, 23)
  state = it.get_state()
  expected = _batches(it, 30)
  restored = iter(pipeline.make_dataset(spec, tiny_tokenizer, **kw))
  restored.set_state(state)
  _assert_same(_batches(restored, 30), expected)


def test_bad_lines_fail_only_above_the_threshold(tmp_path, caplog):
  lines = [json.dumps({"text": f"document {i}"}) for i in range(2000)]
  lines[10] = '{"text": broken'
  lines[1500] = '{"body": "no text field"}'
  good = _write(tmp_path / "two_bad.jsonl.zst", ("\n".join(lines) + "\n").encode())
  with caplog.at_level(logging.WARNING):
    assert len(list(sources.parse_spec(f"jsonl:{good}", max_bad_fraction=0.002).texts())) == 1998
  assert f"two_bad.jsonl.zst:11: malformed JSON" in caplog.text
  assert "two_bad.jsonl.zst:1501: expected a JSON object" in caplog.text
  lines[20] = b"\xff\xfe not utf-8".decode("latin-1")
  bad = _write(tmp_path / "three_bad.jsonl", ("\n".join(lines) + "\n").encode("latin-1"))
  with pytest.raises(sources.DataError, match=r"three_bad.jsonl:11: malformed JSON.*3 of 2000"):
    sources.parse_spec(f"jsonl:{bad}", max_bad_fraction=0.001)  # indexed: judged at once
  assert len(sources.parse_spec(f"jsonl:{bad}", max_bad_fraction=0.002)) == 1997
  streamed = _write(tmp_path / "three_bad.jsonl.gz", bad.read_bytes())
  with pytest.raises(sources.DataError, match="2 of 1000 lines"):
    list(sources.parse_spec(f"jsonl:{streamed}", max_bad_fraction=0.001).texts())


def test_line_index_is_built_in_parallel_once_and_remade_when_the_file_changes(
    tmp_path, monkeypatch):
  path = _write(tmp_path / "big.jsonl",
                _jsonl_bytes([f"doc {i} " + "x" * (i % 13) for i in range(300)]) + b"\n{bad\n")
  sequential = line_index.index_chunk(str(path), "text", 0, path.stat().st_size)[0]
  monkeypatch.setattr(line_index, "_CHUNK_BYTES", 1000)  # ~14 chunks, 2 worker processes
  offsets, counts = line_index.load(str(path), "text", workers=2)
  np.testing.assert_array_equal(offsets, sequential)
  assert counts["lines"] == 302 and counts["empty"] == 1 and counts["bad"] == 1
  assert counts["first"] == [f"{path}:302: malformed JSON (Expecting property name enclosed "
                             "in double quotes: line 1 column 2 (char 1))"]
  sidecar = str(path) + ".calm-index.text.npy"
  made = os.stat(sidecar).st_mtime_ns
  line_index.load(str(path), "text")
  assert os.stat(sidecar).st_mtime_ns == made  # reused
  with open(path, "ab") as f:
    f.write(_jsonl_bytes(["appended"]))
  source = sources.parse_spec(f"jsonl:{path}", max_bad_fraction=0.01)
  assert len(source) == 301 and source[300] == "appended"
  assert len(sources.parse_spec(f"jsonl:{tmp_path}/*", max_bad_fraction=0.01)) == 301  # no sidecars


def _origin(batch, a_ids):
  """Per row: True if its tokens come from component A (ids of A's words, EOS aside)."""
  return [bool(set(row.tolist()) & a_ids) for row in batch["tokens"]]


def test_weighted_mixture_proportions_and_resume(tmp_path, tiny_tokenizer):
  _write(tmp_path / "a.jsonl", _jsonl_bytes([f"alpha {'alpha ' * (i % 9)}" for i in range(60)]))
  _write_parquet(tmp_path / "b.parquet", [f"zeta {'zeta ' * (i % 4)}" for i in range(45)], 10)
  a_ids = set(tiny_tokenizer.encode("alpha alpha")) - set(tiny_tokenizer.encode("zeta zeta"))
  spec = f"jsonl:{tmp_path}/a.jsonl@0.7, parquet:{tmp_path}/b.parquet#body@0.3"
  kw = dict(seq_len=8, batch_size=50, shuffle=True, seed=5, repeat=True)
  it = iter(pipeline.make_dataset(spec, tiny_tokenizer, **kw))
  batches = _batches(it, 200)  # 10,000 sequences
  share = np.mean([_origin(b, a_ids) for b in batches])
  assert abs(share - 0.7) <= 0.01, share
  it = iter(pipeline.make_dataset(spec, tiny_tokenizer, **kw))
  _batches(it, 77)
  state = json.loads(json.dumps(it.get_state()))
  restored = iter(pipeline.make_dataset(spec, tiny_tokenizer, **kw))
  restored.set_state(state)
  _assert_same(_batches(restored, 20), batches[77:97])


def test_mixture_spec_rules(tmp_path):
  _write(tmp_path / "a.jsonl", _jsonl_bytes(["one", "two"]))
  _write(tmp_path / "b.jsonl.zst", _jsonl_bytes(["three"]))
  concatenated = sources.parse_spec(f"jsonl:{tmp_path}/a.jsonl,builtin:python_docs:valid")
  assert isinstance(concatenated, sources.MixtureSource)  # old ',' specs: concatenation
  assert concatenated[0] == "one" and concatenated[1] == "two"
  mixed = sources.parse_spec(f"jsonl:{tmp_path}/a.jsonl@2,jsonl:{tmp_path}/b.jsonl.zst@1")
  assert mixed.weights == (2.0, 1.0) and sources.is_stream(mixed.sources[1])
  with pytest.raises(sources.DataError, match="weights to some components only"):
    sources.parse_spec(f"jsonl:{tmp_path}/a.jsonl@2,jsonl:{tmp_path}/b.jsonl.zst")
  with pytest.raises(sources.DataError, match="without weights"):
    sources.parse_spec(f"jsonl:{tmp_path}/a.jsonl,jsonl:{tmp_path}/b.jsonl.zst")
  texts = list(sources.iter_texts(f"jsonl:{tmp_path}/a.jsonl@2,jsonl:{tmp_path}/b.jsonl.zst@1"))
  assert sorted(texts) == ["one", "three", "two"]


def test_stream_mixture_state_round_trips_through_orbax_with_prefetch(tmp_path, tiny_tokenizer):
  import grain  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  _write(tmp_path / "a.jsonl.zst", _jsonl_bytes([f"alpha {i} " * 3 for i in range(30)]))
  _write_parquet(tmp_path / "b.parquet", [f"zeta {i} " * 2 for i in range(20)], 6)
  spec = f"jsonl:{tmp_path}/a.jsonl.zst@3,parquet:{tmp_path}/b.parquet#body@1"
  kw = dict(seq_len=16, batch_size=4, shuffle=True, seed=2, repeat=True, prefetch=2)
  it = iter(pipeline.make_dataset(spec, tiny_tokenizer, **kw))  # prefetch as the trainer's
  _batches(it, 11)
  options = ocp.CheckpointManagerOptions(enable_async_checkpointing=False)
  with ocp.CheckpointManager(tmp_path / "ckpt", options=options,
                             item_names=("data_iter",)) as manager:
    manager.save(11, args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointSave(it)))
  expected = _batches(it, 6)
  restored = iter(pipeline.make_dataset(spec, tiny_tokenizer, **kw))
  with ocp.CheckpointManager(tmp_path / "ckpt", options=options,
                             item_names=("data_iter",)) as manager:
    manager.restore(11, args=ocp.args.Composite(
        data_iter=grain.checkpoint.CheckpointRestore(restored)))
  _assert_same(_batches(restored, 6), expected)
