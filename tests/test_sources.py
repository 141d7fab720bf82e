"""Tests of data SPEC parsing: every scheme, mixtures, skipped documents and the promised errors."""
import json
import logging

import numpy as np
import pytest

from calm_jax.data import builtin
from calm_jax.data import prepare
from calm_jax.data import sources

pytestmark = pytest.mark.unit


def _write_jsonl(path, records):
  path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
  return path


def _all(source):
  return [source[i] for i in range(len(source))]


def test_builtin_splits_are_deterministic_and_partition_the_corpus():
  names = {s: [n for n, _ in builtin.documents(s)] for s in ("train", "valid", "all")}
  assert not set(names["train"]) & set(names["valid"])
  assert sorted(names["train"] + names["valid"]) == sorted(names["all"])
  assert 0.02 < len(names["valid"]) / len(names["all"]) < 0.1
  assert sum(len(t) for _, t in builtin.documents("all")) > 1_500_000
  assert any(n.startswith("topic:") for n in names["all"])
  assert "module:json" in names["all"] + names["valid"]
  source = sources.parse_spec("builtin:python_docs")  # default split: train
  assert len(source) == len(names["train"])
  assert source[0] == builtin.documents("train")[0][1]
  assert len(sources.parse_spec("builtin:python_docs:valid")) == len(names["valid"])


def test_jsonl_glob_field_and_skipped_documents(tmp_path, monkeypatch, caplog):
  _write_jsonl(tmp_path / "a.jsonl", [{"text": "first"}, {"text": ""}, {"text": "second"}])
  (tmp_path / "b.jsonl").write_bytes(
      b'{"text": "third", "body": "B"}\n\n{"text": "bad \xff utf8"}\n{"text": "\\ud800"}\n')
  monkeypatch.chdir(tmp_path)  # relative globs resolve against the current directory
  with pytest.raises(sources.DataError, match="b.jsonl:3: not valid UTF-8; 2 of 7 lines"):
    sources.parse_spec("jsonl:*.jsonl")  # non-UTF-8 lines are bad lines
  with caplog.at_level(logging.WARNING):
    source = sources.parse_spec("jsonl:*.jsonl", max_bad_fraction=0.3)
  assert _all(source) == ["first", "second", "third"]
  assert "skipped 2 empty and 2 bad lines of 7" in caplog.text
  _write_jsonl(tmp_path / "c.json", [{"body": "other field"}])
  assert _all(sources.parse_spec("jsonl:c.json#body")) == ["other field"]


def test_jsonl_malformed_line_names_file_and_line(tmp_path, caplog):
  path = tmp_path / "bad.jsonl"
  path.write_text('{"text": "ok"}\n{"text": broken\n{"no_text": 1}\n{"text": "fine"}\n')
  with pytest.raises(sources.DataError, match=f"{path}:2: malformed JSON"):
    sources.parse_spec(f"jsonl:{path}")
  with caplog.at_level(logging.WARNING):
    source = sources.parse_spec(f"jsonl:{path}", max_bad_fraction=0.5)
  assert _all(source) == ["ok", "fine"]
  assert f"{path}:3: expected a JSON object with a string field 'text'" in caplog.text
  assert "skipped 0 empty and 2 bad lines of 4" in caplog.text


def test_text_one_document_per_file(tmp_path):
  (tmp_path / "1.txt").write_text("one\ndocument")
  (tmp_path / "2.txt").write_text("  \n")
  (tmp_path / "3.txt").write_bytes(b"\xff\xfe bad")
  (tmp_path / "4.txt").write_text("four")
  assert _all(sources.parse_spec(f"text:{tmp_path}/*.txt")) == ["one\ndocument", "four"]


def test_tfds_local_dataset_without_download(tmp_path, monkeypatch):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  class CalmTinyCorpus(tfds.core.GeneratorBasedBuilder):
    """Three documents per split, written as array_record without TensorFlow."""
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
          {"text": tfds.features.Text(), "title": tfds.features.Text()}))

    def _split_generators(self, dl_manager):
      del dl_manager
      return {"train": self._generate_examples("train"),
              "validation": self._generate_examples("valid")}

    def _generate_examples(self, split):
      for i in range(3):
        yield i, {"text": f"{split} document {i}" if i != 1 else "", "title": f"t{i}"}

  data_dir = tmp_path / "tfds"
  CalmTinyCorpus(data_dir=str(data_dir), file_format="array_record").download_and_prepare()
  monkeypatch.setenv("TFDS_DATA_DIR", str(data_dir))
  source = sources.parse_spec("tfds:calm_tiny_corpus:train")
  texts = sorted(_all(source))
  # '' is the empty record; the pipeline drops it.
  assert texts == ["", "train document 0", "train document 2"]
  titles = _all(sources.parse_spec("tfds:calm_tiny_corpus:1.0.0:validation#title"))
  assert sorted(titles) == ["t0", "t1", "t2"]
  assert len(sources.parse_spec("tfds:calm_tiny_corpus:train[:2]")) == 2
  with pytest.raises(sources.DataError, match="no feature 'body'"):
    sources.parse_spec("tfds:calm_tiny_corpus:train#body")
  with pytest.raises(sources.DataError, match="tfds:not_prepared_here:train"):
    sources.parse_spec("tfds:not_prepared_here:train")


def test_arrayrecord_via_prepare_and_mixture(tmp_path, tiny_tokenizer, tiny_tokenizer_path):
  docs = [f"Document number {i}: " + "spam " * i for i in range(1, 8)]
  _write_jsonl(tmp_path / "c.jsonl", [{"text": d} for d in docs])
  summary = prepare.prepare(f"jsonl:{tmp_path}/c.jsonl", tiny_tokenizer_path,
                            str(tmp_path / "out"), part_bytes=100)
  assert summary["documents"] == 7 and summary["total"]["shards"] == 3
  expected = [tiny_tokenizer.encode(d) for d in docs]
  assert summary["tokens"] == sum(len(e) for e in expected)
  for spec in (f"arrayrecord:{tmp_path}/out", f"arrayrecord:{tmp_path}/out/*.array_record"):
    got = _all(sources.parse_spec(spec))
    assert all(g.dtype == np.int32 for g in got)
    assert [g.tolist() for g in got] == expected
  mixed = sources.parse_spec(f"arrayrecord:{tmp_path}/out, jsonl:{tmp_path}/c.jsonl")
  assert len(mixed) == 14
  assert mixed[6].tolist() == expected[6] and mixed[7] == docs[0] and mixed[-1] == docs[-1]


def test_iter_texts_is_a_seeded_permutation(tmp_path):
  _write_jsonl(tmp_path / "d.jsonl", [{"text": f"doc {i}"} for i in range(20)])
  spec = f"jsonl:{tmp_path}/d.jsonl"
  first = list(sources.iter_texts(spec))
  assert sorted(first) == sorted(f"doc {i}" for i in range(20))
  assert first == list(sources.iter_texts(spec)) != [f"doc {i}" for i in range(20)]
  with pytest.raises(sources.DataError, match="arrayrecord"):
    next(sources.iter_texts(f"arrayrecord:{tmp_path}"))


def test_spec_errors(tmp_path):
  with pytest.raises(sources.DataError, match="builtin:, jsonl:, lines:, text:, parquet:, tfds:"):
    sources.parse_spec("csv:/data/*.csv")
  with pytest.raises(sources.DataError, match="nothing_here/\\*.jsonl matches no files"):
    sources.parse_spec(f"jsonl:{tmp_path}/nothing_here/*.jsonl")
  with pytest.raises(sources.DataError, match="builtin:python_docs"):
    sources.parse_spec("builtin:python_docs:test")
  with pytest.raises(sources.DataError, match="empty"):
    sources.parse_spec(" , ")
  with pytest.raises(sources.DataError, match="matches no files"):
    sources.check_spec(f"builtin:python_docs,text:{tmp_path}/*.txt")
  sources.check_spec("builtin:python_docs:valid,tfds:anything/cfg:train[:5%]")
