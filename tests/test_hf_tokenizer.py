"""Tests for calm_jax/data/hf_tokenizer.py: tokenizer.json with its own special ids, as the reference uses it."""
import json
import os
import pickle

import numpy as np
import pytest

from calm_jax.data import hf_tokenizer
from calm_jax.data import pipeline
from calm_jax.data import tokenizer as tokenizer_lib
from tests import fixture_maker

pytestmark = pytest.mark.unit

# The reference's llama3_tokenizer/ names its specials like this (no pad token).
LLAMA3_SPECIALS = {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"}


@pytest.fixture(scope="module")
def llama_like(tmp_path_factory):
  """A small BPE laid out like Llama-3: base vocabulary, then the special tokens, no pad."""
  directory = str(tmp_path_factory.mktemp("llama_like"))
  fixture_maker.train_tokenizer(directory, 300, bos="<|begin_of_text|>", eos="<|end_of_text|>",
                                unk="<unk>", specials_last=True)
  with open(os.path.join(directory, "special_tokens_map.json"), "w") as f:
    json.dump(LLAMA3_SPECIALS, f)
  with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
    json.dump(dict(LLAMA3_SPECIALS, tokenizer_class="PreTrainedTokenizerFast",
                   model_max_length=10**30), f)
  return directory


def test_special_ids_come_from_the_tokenizer_and_pad_is_added_as_the_reference_does(llama_like):
  tok = tokenizer_lib.load(llama_like)
  assert isinstance(tok, hf_tokenizer.HFTokenizer)
  assert (tok.bos_id, tok.eos_id) == (297, 298)      # after the learned vocabulary, as Llama-3's
  assert tok.pad_id == 299 and tok.vocab_size == 300 and tok.id_to_piece(299) == "[PAD]"
  assert tok.unk_id is None                                           # no unk_token named
  ids = tok.encode("The function returns a value.")
  assert ids[0] == tok.bos_id and tok.eos_id not in ids              # tokenizer(text) semantics
  assert tok.decode(ids + [tok.eos_id, tok.pad_id]) == "The function returns a value."
  assert tokenizer_lib.load(os.path.join(llama_like, "tokenizer.json")).pad_id == 299


def test_save_load_digest_and_pickle(llama_like, tmp_path):
  tok = tokenizer_lib.load(llama_like)
  tok.save(str(tmp_path))
  again = tokenizer_lib.load(str(tmp_path))
  assert (again.bos_id, again.eos_id, again.pad_id, again.vocab_size) == (
      tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size)
  with open(tmp_path / "tokenizer_config.json") as f:
    assert json.load(f)["pad_token"] == "[PAD]"
  assert tokenizer_lib.digest(str(tmp_path)) == tokenizer_lib.digest(str(tmp_path))
  assert tokenizer_lib.digest(str(tmp_path)) != tokenizer_lib.digest(llama_like)
  clone = pickle.loads(pickle.dumps(tok))
  assert clone.encode("abc def") == tok.encode("abc def") and clone.pad_id == tok.pad_id


def test_missing_eos_or_file_is_a_clear_error(llama_like, tmp_path):
  for name in ("tokenizer.json",):
    with open(os.path.join(llama_like, name)) as src:
      (tmp_path / name).write_text(src.read())
  with pytest.raises(tokenizer_lib.TokenizerError, match="no eos_token"):
    tokenizer_lib.load(str(tmp_path))
  with pytest.raises(tokenizer_lib.TokenizerError, match="Cannot read the tokenizer"):
    tokenizer_lib.load(str(tmp_path / "nope"))
  (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|eot_id|>"}))
  with pytest.raises(tokenizer_lib.TokenizerError, match="not in the tokenizer's vocabulary"):
    tokenizer_lib.load(str(tmp_path))


def test_pipeline_uses_the_tokenizers_ids_and_the_reference_document_formats(llama_like):
  tok = tokenizer_lib.load(llama_like)
  docs = ["first doc", "a second, longer document"]
  encoded = [tok.encode(d) for d in docs]

  def batch(**kw):
    ds = pipeline.make_dataset(docs, tok, seq_len=32, batch_size=1, chunk_size=4, **kw)
    return next(iter(ds))

  # The reference's CALM/AR streams: BOS doc BOS doc ..., no EOS.
  b = batch(packing="concat", document_eos=False)
  stream = encoded[0] + encoded[1]
  np.testing.assert_array_equal(b["tokens"][0, :len(stream)], stream)
  assert tok.eos_id not in b["tokens"][0, :len(stream)].tolist()
  # The reference autoencoder: doc + EOS padded with PAD to K, padding trained on.
  b = batch(packing="chunk_aligned", document_eos=True, pad_in_loss=True)
  n0 = len(encoded[0]) + 1
  padded = -(-n0 // 4) * 4
  assert b["tokens"][0, n0 - 1] == tok.eos_id
  assert set(b["tokens"][0, n0:padded].tolist()) <= {tok.pad_id}
  assert b["mask"][0, :padded].all()
  b = batch(packing="chunk_aligned", document_eos=True, pad_in_loss=False)
  assert not b["mask"][0, n0:padded].any()
