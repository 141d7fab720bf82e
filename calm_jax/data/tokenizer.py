"""Tokenizers: SentencePiece (trained here, fixed special ids) and Hugging Face tokenizer.json.

`load(path)` is the one entry point: a .model file is SentencePiece, a tokenizer.json
(or a directory holding one) goes through hf_tokenizer.py with the special ids its
own config files name (the reference's Llama-3 tokenizer: BOS 128000, EOS 128001).
Everything downstream reads tokenizer.pad_id / eos_id / bos_id, never fixed numbers.

The SentencePiece ids below hold for every tokenizer calm-tokenizer trains, and
`Tokenizer.load` refuses a .model that does not use them (a model trained elsewhere
would silently shift pad/eos).
"""
import hashlib
import io
import logging
import os
import time

import sentencepiece as spm

from calm_jax import errors
from calm_jax import progress
from calm_jax.data import hf_tokenizer

PAD_ID = 0  # padding; carries mask 0 in batches
UNK_ID = 1  # never produced for text thanks to byte fallback
BOS_ID = 2  # beginning of sequence (generation prompts)
EOS_ID = 3  # end of document; appended after every document by the pipeline

MODEL_TYPES = ("bpe", "unigram")
# SentencePiece drops training sentences longer than this many bytes, so long
# lines are cut into pieces of at most this many characters (UTF-8 needs <= 4
# bytes per character, hence the margin below the trainer limit).
_MAX_SENTENCE_CHARS = 4096
_MAX_SENTENCE_BYTES = 4 * _MAX_SENTENCE_CHARS
_CHARACTER_COVERAGES = (0.9995, 0.999, 0.995, 0.99, 0.98, 0.95, 0.9)


class TokenizerError(errors.UserError):
  """A tokenizer file is missing or unusable, or training got bad input."""


def _training_sentences(texts, max_chars):
  """Yields the lines of `texts`, cut to SentencePiece's sentence limit, until max_chars (None: all)."""
  budget = float("inf") if max_chars is None else max_chars
  for text in texts:
    for line in text.splitlines():
      line = line.rstrip()
      if not line.strip():
        continue
      for start in range(0, len(line), _MAX_SENTENCE_CHARS):
        piece = line[start:start + _MAX_SENTENCE_CHARS]
        yield piece
        budget -= len(piece)
        if budget <= 0:
          return


def _train(sentences, vocab_size, model_type, character_coverage):
  """Runs the SentencePiece trainer; returns the serialized model."""
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(sentences),
      model_writer=model,
      vocab_size=vocab_size,
      model_type=model_type,
      byte_fallback=True,
      pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
      # Exact round trip: no Unicode normalization, keep every space.
      normalization_rule_name="identity",
      remove_extra_whitespaces=False,
      allow_whitespace_only_pieces=True,
      split_digits=True,
      character_coverage=character_coverage,
      max_sentence_length=_MAX_SENTENCE_BYTES,
      input_sentence_size=10_000_000,
      shuffle_input_sentence=True,
      num_threads=os.cpu_count() or 1,
      minloglevel=2,
  )
  return model.getvalue()


def train_tokenizer(texts, vocab_size, output_path, model_type="bpe", max_chars=None):
  """Trains a byte-fallback SentencePiece model on `texts` and writes it to output_path.

  Args:
    texts: iterable of document strings (read up to max_chars characters).
    vocab_size: number of pieces, including the 4 special ids and 256 byte pieces.
    output_path: where the .model file goes (its directory is created).
    model_type: 'bpe' or 'unigram'.
    max_chars: cap on the training characters read from `texts` (None: read them all); the
      budget of calm-train and calm-tokenizer is config.data.tokenizer_max_chars.

  Returns:
    The loaded `Tokenizer`.
  """
  if model_type not in MODEL_TYPES:
    raise TokenizerError(
        f"model_type={model_type!r} is not supported; use one of {MODEL_TYPES}.")
  if vocab_size < 256 + 4 + 1:
    raise TokenizerError(
        f"vocab_size={vocab_size} is too small: byte fallback alone needs 256 pieces "
        "plus 4 special ids; use at least 300.")
  sentences = []
  with progress.bar(total=max_chars, desc="tokenizer: reading text", unit="char",
                    unit_scale=True) as bar:
    for sentence in _training_sentences(texts, max_chars):
      sentences.append(sentence)
      bar.update(len(sentence))
  if not sentences:
    raise TokenizerError(
        f"No training text for the tokenizer {output_path}: the data source is empty.")
  # Characters outside the coverage fall back to bytes; a small vocabulary may not
  # hold every frequent character, so the coverage is lowered until it fits.
  logging.info("Training a %d-piece %s tokenizer on %d sentences (SentencePiece, no progress "
               "of its own)...", vocab_size, model_type, len(sentences))
  start = time.monotonic()
  for coverage in _CHARACTER_COVERAGES:
    try:
      model = _train(sentences, vocab_size, model_type, coverage)
      break
    except RuntimeError as e:
      if "smaller than required_chars" not in str(e) or coverage == _CHARACTER_COVERAGES[-1]:
        raise TokenizerError(f"Training the tokenizer {output_path} failed: {e}") from e
  os.makedirs(os.path.dirname(os.path.abspath(output_path)), exist_ok=True)
  tmp = f"{output_path}.tmp-{os.getpid()}"     # renamed into place: a kill never leaves half a file
  with open(tmp, "wb") as f:
    f.write(model)
  os.replace(tmp, output_path)
  logging.info("Wrote a %d-piece %s tokenizer to %s (trained in %.1f s)", vocab_size, model_type,
               output_path, time.monotonic() - start)
  return Tokenizer.load(output_path)


class Tokenizer:
  """A loaded SentencePiece model with the project's fixed special ids.

  Picklable (it carries the serialized model), so grain worker processes can use it.
  """

  def __init__(self, model_proto, path="<memory>"):
    self.path = path
    self._proto = model_proto
    self._sp = spm.SentencePieceProcessor()
    try:
      self._sp.LoadFromSerializedProto(model_proto)
    except RuntimeError as e:
      raise TokenizerError(
          f"{path} is not a readable SentencePiece model ({e}); "
          "train one with calm-tokenizer.") from e
    expected = dict(pad=PAD_ID, unk=UNK_ID, bos=BOS_ID, eos=EOS_ID)
    actual = dict(pad=self._sp.pad_id(), unk=self._sp.unk_id(),
                  bos=self._sp.bos_id(), eos=self._sp.eos_id())
    if actual != expected:
      raise TokenizerError(
          f"{path} has special ids {actual} but calm_jax needs {expected}; "
          "retrain it with calm-tokenizer.")

  @classmethod
  def load(cls, path):
    """Loads a .model file, with an error naming the path if it is missing or unreadable."""
    try:
      with open(path, "rb") as f:
        proto = f.read()
    except OSError as e:
      raise TokenizerError(
          f"Cannot read the tokenizer model {path}: {e.strerror}; train one with "
          "calm-tokenizer --data SPEC --vocab_size N --output PATH.model.") from e
    return cls(proto, path=path)

  def __getstate__(self):
    return dict(path=self.path, proto=self._proto)

  def __setstate__(self, state):
    self.__init__(state["proto"], path=state["path"])

  @property
  def vocab_size(self):
    return self._sp.GetPieceSize()

  pad_id = PAD_ID
  unk_id = UNK_ID
  bos_id = BOS_ID
  eos_id = EOS_ID

  def encode(self, text):
    """Text -> list of token ids (no BOS/EOS added)."""
    return self._sp.EncodeAsIds(text)

  def encode_batch(self, texts):
    """List of texts -> list of id lists (SentencePiece encodes them in parallel)."""
    return self._sp.Encode(list(texts), out_type=int, num_threads=os.cpu_count() or 1)

  def decode(self, ids):
    """Token ids -> text; PAD, BOS and EOS are dropped."""
    ids = [int(i) for i in ids if int(i) not in (PAD_ID, BOS_ID, EOS_ID)]
    return self._sp.DecodeIds(ids)

  def id_to_piece(self, token_id):
    return self._sp.IdToPiece(int(token_id))


def load(path):
  """The tokenizer at `path`: a SentencePiece .model, or a tokenizer.json / a directory with one."""
  if hf_tokenizer.is_hf_tokenizer(path):
    return hf_tokenizer.HFTokenizer.load(path)
  return Tokenizer.load(path)


def digest(path):
  """sha256 of what decides a tokenizer's ids (the .model file, or tokenizer.json + side files)."""
  if hf_tokenizer.is_hf_tokenizer(path):
    return hf_tokenizer.digest(path)
  with open(path, "rb") as f:
    return hashlib.sha256(f.read()).hexdigest()
