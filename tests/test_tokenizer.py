"""Tests of the SentencePiece wrapper: fixed ids, exact round trip, training, load errors."""
import pickle

import pytest

from calm_jax.data import builtin
from calm_jax.data import tokenizer as tokenizer_lib

pytestmark = pytest.mark.unit


def test_fixed_special_ids(tiny_tokenizer):
  assert (tokenizer_lib.PAD_ID, tokenizer_lib.UNK_ID, tokenizer_lib.BOS_ID,
          tokenizer_lib.EOS_ID) == (0, 1, 2, 3)
  assert tiny_tokenizer.vocab_size == 400
  assert [tiny_tokenizer.id_to_piece(i) for i in range(4)] == ["<pad>", "<unk>", "<s>", "</s>"]


def test_round_trip_on_builtin_corpus(tiny_tokenizer):
  documents = builtin.documents("valid")[:20]
  for _, text in documents:
    ids = tiny_tokenizer.encode(text)
    assert tokenizer_lib.UNK_ID not in ids
    assert tiny_tokenizer.decode(ids) == text
  assert tiny_tokenizer.encode_batch([t for _, t in documents]) == [
      tiny_tokenizer.encode(t) for _, t in documents]


def test_round_trip_unseen_characters_and_whitespace(tiny_tokenizer):
  text = "  Indented\n\ttab  two spaces \u00e9t\u00e9 \u4e16\u754c \U0001F600\n\n"
  ids = tiny_tokenizer.encode(text)
  assert tokenizer_lib.UNK_ID not in ids  # byte fallback
  assert tiny_tokenizer.decode(ids) == text
  assert tiny_tokenizer.decode([tokenizer_lib.BOS_ID] + ids + [tokenizer_lib.EOS_ID,
                                                               tokenizer_lib.PAD_ID]) == text


def test_unigram_and_very_long_lines(tmp_path):
  words = " ".join(t for _, t in builtin.documents("valid")).split()
  long_line = " ".join(words)[:150_000]  # one line, far over SentencePiece's sentence limit
  texts = [long_line, "Short document.\nWith two lines."]
  path = str(tmp_path / "uni.model")
  tok = tokenizer_lib.train_tokenizer(texts, 400, path, model_type="unigram",
                                      max_chars=100_000)
  assert tok.vocab_size == 400
  assert tok.decode(tok.encode(long_line)) == long_line


def test_pickles(tiny_tokenizer):
  clone = pickle.loads(pickle.dumps(tiny_tokenizer))
  assert clone.encode("hello world") == tiny_tokenizer.encode("hello world")


def test_load_errors_name_the_path(tmp_path):
  missing = str(tmp_path / "missing.model")
  with pytest.raises(tokenizer_lib.TokenizerError, match="missing.model"):
    tokenizer_lib.Tokenizer.load(missing)
  garbage = tmp_path / "garbage.model"
  garbage.write_bytes(b"not a model")
  with pytest.raises(tokenizer_lib.TokenizerError, match="garbage.model"):
    tokenizer_lib.Tokenizer.load(str(garbage))


def test_training_errors(tmp_path):
  with pytest.raises(tokenizer_lib.TokenizerError, match="model_type"):
    tokenizer_lib.train_tokenizer(["x"], 300, str(tmp_path / "a.model"), model_type="wordpiece")
  with pytest.raises(tokenizer_lib.TokenizerError, match="empty"):
    tokenizer_lib.train_tokenizer([], 300, str(tmp_path / "b.model"))
