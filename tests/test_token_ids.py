"""Token ids outside the vocabulary (issue 14 item 4): named with the file, the record and the vocab size, never NaN.

Shards written here with ids of a 1000-piece tokenizer are read with the 400-piece one.
"""
import jax
import numpy as np
import pytest
from array_record.python import array_record_module

from calm_jax.data import pipeline
from calm_jax.data import sources
from calm_jax.data import token_records
from calm_jax.training import loop
from tests.test_reliability import VOCAB, _config, _final_per_step

pytestmark = pytest.mark.faults


def _shard(directory, docs):
  directory.mkdir(exist_ok=True)
  path = directory / f"train-00000-of-00001{sources.ARRAYRECORD_SUFFIX}"
  writer = array_record_module.ArrayRecordWriter(str(path), "group_size:1")
  for ids in docs:
    writer.write(sources.encode_tokens(ids))
  writer.close()
  return path


def _docs(n, length, bad_record=None, bad_id=1000):
  rng = np.random.default_rng(0)
  docs = [rng.integers(4, VOCAB, length) for _ in range(n)]
  if bad_record is not None:
    docs[bad_record][length // 2] = bad_id
  return docs


def test_ids_outside_the_vocab_fail_when_the_source_opens(tiny_tokenizer_path, tmp_path):
  path = _shard(tmp_path / "d", _docs(200, 40, bad_record=199))
  config = _config(tiny_tokenizer_path, 2, 2, data__train=f"arrayrecord:{tmp_path / 'd'}")
  with pytest.raises(sources.DataError, match=rf"{path} record 199: token id 1000 is outside "
                     rf"the vocabulary of {VOCAB} ids.*calm-prepare"):
    loop.train_and_evaluate(config, str(tmp_path / "run"), jax.devices()[:1])
  assert not (tmp_path / "run" / "metrics.jsonl").exists()      # failed before any step


def test_an_id_outside_the_vocab_in_a_record_not_sampled_stops_the_run(tiny_tokenizer_path,
                                                                        tmp_path, monkeypatch):
  monkeypatch.setattr(token_records, "_ID_SAMPLE", 1)       # only record 0 checked at open
  path = _shard(tmp_path / "d", _docs(12, 30, bad_record=7, bad_id=-3))
  config = _config(tiny_tokenizer_path, 4, 2, data__train=f"arrayrecord:{tmp_path / 'd'}")
  pipeline.make_iterator(config, None, "train")       # no vocabulary given: not checked
  with pytest.raises(sources.DataError, match=rf"{path} record 7: token id -3 is outside"):
    loop.train_and_evaluate(config, str(tmp_path / "run"), jax.devices()[:1])
  assert all(np.isfinite(v) for v in _final_per_step(str(tmp_path / "run")).values())
