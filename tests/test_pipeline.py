"""Tests of the grain pipeline: packing, per-process sharding, eval passes and checkpointing."""
import json

import grain
import ml_collections
import numpy as np
import pytest

from calm_jax.data import pipeline
from calm_jax.data import tokenizer as tokenizer_lib
from experiments import common

pytestmark = pytest.mark.unit

EOS = tokenizer_lib.EOS_ID
PAD = tokenizer_lib.PAD_ID


def _id_documents(num_docs, seed=0):
  """Token-id documents of varied lengths; document i holds only the id 10 + i."""
  lengths = np.random.default_rng(seed).integers(1, 40, num_docs)
  return [np.full(n, 10 + i, np.int32) for i, n in enumerate(lengths)]


def _stream(documents):
  return np.concatenate([np.append(d, EOS) for d in documents])


def _eval_pass(source, **kwargs):
  kwargs = dict(dict(seq_len=16, batch_size=3), **kwargs)
  return list(pipeline.make_dataset(source, None, **kwargs))


def _real_tokens(batches):
  """The mask-1 tokens of all batches, in row-major order."""
  return np.concatenate([b["tokens"][b["mask"] == 1] for b in batches])


def test_concat_keeps_every_token_once_in_order_across_blocks():
  docs = _id_documents(30)
  batches = _eval_pass(docs)
  for b in batches:
    assert b["tokens"].shape == b["mask"].shape == (3, 16)
    assert b["tokens"].dtype == b["mask"].dtype == np.int32
  np.testing.assert_array_equal(_real_tokens(batches), _stream(docs))
  # Padding (mask 0) only at the very end of the pass: the tail of the last block
  # and whole rows that fill the last batch.
  mask = np.concatenate([b["mask"].reshape(-1) for b in batches])
  assert mask[:len(_stream(docs))].all() and not mask[len(_stream(docs)):].any()
  assert len(mask) - len(_stream(docs)) < 3 * 16
  assert (np.concatenate([b["tokens"].reshape(-1) for b in batches])[mask == 0] == PAD).all()


def test_chunk_aligned_no_chunk_crosses_documents():
  k = 4
  docs = _id_documents(30, seed=1)
  batches = _eval_pass(docs, packing="chunk_aligned", chunk_size=k)
  np.testing.assert_array_equal(_real_tokens(batches), _stream(docs))
  tokens = np.concatenate([b["tokens"].reshape(-1, k) for b in batches])
  mask = np.concatenate([b["mask"].reshape(-1, k) for b in batches])
  for chunk, m in zip(tokens, mask):
    real = chunk[m == 1]
    assert (m == np.sort(m)[::-1]).all()        # real tokens first, then padding
    assert (chunk[m == 0] == PAD).all()
    assert len(set(real.tolist()) - {EOS}) <= 1  # one document per chunk
    assert EOS not in real[:-1]                  # EOS only as the chunk's last real token
    if 0 < len(real) < k:
      assert real[-1] == EOS                     # a document padded after its EOS


def test_text_documents_are_tokenized_with_eos(tiny_tokenizer):
  texts = ["first document", "", "second one, a bit longer than the first"]
  batches = list(pipeline.make_dataset(texts, tiny_tokenizer, seq_len=8, batch_size=2))
  expected = np.concatenate([tiny_tokenizer.encode(t) + [EOS] for t in texts if t])
  np.testing.assert_array_equal(_real_tokens(batches), expected)


@pytest.mark.parametrize("shuffle", [False, True])
def test_process_slices_are_disjoint_and_cover_everything(shuffle):
  docs = _id_documents(31)
  seen = []
  for index in range(3):
    tokens = _real_tokens(_eval_pass(docs, shuffle=shuffle, seed=5, process_index=index,
                                     process_count=3))
    seen.append(set(tokens.tolist()) - {EOS})
    assert abs(len(seen[-1]) - 31 / 3) < 1
  assert not (seen[0] & seen[1] or seen[0] & seen[2] or seen[1] & seen[2])
  assert set.union(*seen) == {10 + i for i in range(31)}


def test_training_shuffles_each_epoch_and_repeats_forever():
  docs = _id_documents(12)
  it = iter(pipeline.make_dataset(docs, None, seq_len=8, batch_size=2, shuffle=True,
                                  seed=1, repeat=True))
  tokens = np.concatenate([next(it)["tokens"].reshape(-1) for _ in range(200)])
  order = [int(t) for i, t in enumerate(tokens) if t != EOS and (i == 0 or tokens[i - 1] == EOS)]
  epochs = [order[i:i + 12] for i in range(0, 36, 12)]
  assert all(sorted(e) == list(range(10, 22)) for e in epochs)
  assert epochs[0] != epochs[1] and epochs[0] != list(range(10, 22))


def _train_dataset(tokenizer):
  return pipeline.make_dataset("builtin:python_docs", tokenizer, seq_len=32, batch_size=4,
                               packing="chunk_aligned", chunk_size=4, shuffle=True, seed=3,
                               repeat=True, prefetch=2)


def test_iterator_state_restores_the_exact_next_batches(tiny_tokenizer):
  it = iter(_train_dataset(tiny_tokenizer))
  for _ in range(7):
    next(it)
  state = json.loads(json.dumps(it.get_state()))  # plain JSON, as orbax stores it
  expected = [next(it) for _ in range(5)]
  restored = iter(_train_dataset(tiny_tokenizer))
  restored.set_state(state)
  for want in expected:
    got = next(restored)
    np.testing.assert_array_equal(got["tokens"], want["tokens"])
    np.testing.assert_array_equal(got["mask"], want["mask"])


def test_state_without_a_packing_remainder_survives_json():
  # Every document + EOS fills one row exactly, so no checkpoint has a remainder: grain
  # alone restores the JSON form of that state one document late (pipeline._JsonSafePacking).
  docs = [np.arange(1, 8, dtype=np.int32) + 10 * i for i in range(50)]
  kw = dict(seq_len=8, batch_size=2, shuffle=True, seed=0, repeat=True)
  it = iter(pipeline.make_dataset(docs, None, **kw))
  for _ in range(5):
    next(it)
  state = json.loads(json.dumps(it.get_state()))
  expected = [next(it)["tokens"] for _ in range(4)]
  restored = iter(pipeline.make_dataset(docs, None, **kw))
  restored.set_state(state)
  np.testing.assert_array_equal([next(restored)["tokens"] for _ in range(4)], expected)


def test_orbax_checkpoint_manager_round_trip(tiny_tokenizer, tmp_path):
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  it = iter(_train_dataset(tiny_tokenizer))
  for _ in range(3):
    next(it)
  options = ocp.CheckpointManagerOptions(enable_async_checkpointing=False)
  with ocp.CheckpointManager(tmp_path / "ckpt", options=options,
                             item_names=("data_iter",)) as manager:
    manager.save(3, args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointSave(it)))
  expected = next(it)
  restored = iter(_train_dataset(tiny_tokenizer))
  with ocp.CheckpointManager(tmp_path / "ckpt", options=options,
                             item_names=("data_iter",)) as manager:
    manager.restore(3, args=ocp.args.Composite(
        data_iter=grain.checkpoint.CheckpointRestore(restored)))
  np.testing.assert_array_equal(next(restored)["tokens"], expected["tokens"])


def _config(packing="concat"):
  config = common.base_config("ar")
  config.model = ml_collections.ConfigDict(dict(patch_size=4))
  config.data.eval = "builtin:python_docs:valid"
  config.data.seq_len = 32
  config.data.packing = packing
  config.data.prefetch = 0
  config.train.batch_size = 8
  config.eval.batch_size = 4
  config.eval.block_len = 64
  return config


def test_make_iterator_shapes_and_eval_pass_covers_the_split(tiny_tokenizer):
  config = _config()
  train = pipeline.make_iterator(config, tiny_tokenizer, "train", process_index=1,
                                 process_count=2)
  batch = next(train)
  assert batch["tokens"].shape == (4, 32) and batch["mask"].all()
  eval_batches = list(pipeline.make_iterator(config, tiny_tokenizer, "eval", 0, 1))
  assert all(b["tokens"].shape == (4, 64) for b in eval_batches)
  from calm_jax.data import builtin  # pylint: disable=g-import-not-at-top
  expected = np.concatenate([tiny_tokenizer.encode(t) + [EOS]
                             for _, t in builtin.documents("valid")])
  np.testing.assert_array_equal(_real_tokens(eval_batches), expected)
  with pytest.raises(ValueError, match="config.train.batch_size=8 is not divisible"):
    pipeline.make_iterator(config, tiny_tokenizer, "train", 0, 3)


def test_argument_errors():
  with pytest.raises(ValueError, match="not a multiple of the chunk size"):
    pipeline.make_dataset(["x"], None, seq_len=10, batch_size=1, packing="chunk_aligned",
                          chunk_size=4)
  with pytest.raises(ValueError, match="packing='zip'"):
    pipeline.make_dataset(["x"], None, seq_len=8, batch_size=1, packing="zip")
