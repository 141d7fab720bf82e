"""Hugging Face tokenizers (a tokenizer.json, e.g. the reference's Llama-3 one) behind calm_jax's tokenizer interface.

`path` is a tokenizer.json or a directory holding one. The special tokens come from
the tokenizer_config.json and special_tokens_map.json beside it (the latter wins), as
transformers' AutoTokenizer reads them; their ids from the tokenizer itself, never
fixed numbers. A tokenizer without a pad token gets "[PAD]" appended as a new special
token, exactly what the reference's training scripts do
(`tokenizer.add_special_tokens(dict(pad_token="[PAD]"))`): the Llama-3 tokenizer's
128,256 tokens become the reference models' vocabulary of 128,257 with PAD = 128256.

encode() is what the reference's `tokenizer(text)` returns: the tokenizer's own
post-processor runs, so Llama-3 puts <|begin_of_text|> (128000) before every
document. decode() drops special tokens.
"""
import hashlib
import json
import logging
import os

import tokenizers

TOKENIZER_JSON = "tokenizer.json"
SIDE_FILES = ("tokenizer_config.json", "special_tokens_map.json")
DEFAULT_PAD = "[PAD]"          # train_*.py: DEFAULT_PAD_TOKEN
_ROLES = ("bos", "eos", "pad", "unk")


def tokenizer_json_path(path):
  """The tokenizer.json that `path` names (itself, or the one in the directory)."""
  return os.path.join(path, TOKENIZER_JSON) if os.path.isdir(path) else path


def is_hf_tokenizer(path):
  return os.path.isdir(path) or path.endswith(".json")


def _content(value):
  if isinstance(value, dict):
    return value.get("content")
  return value


def read_special_tokens(directory):
  """{'bos': str|None, 'eos': ..., 'pad': ..., 'unk': ...} from the side files in `directory`."""
  tokens = dict.fromkeys(_ROLES)
  for name in SIDE_FILES:
    path = os.path.join(directory, name)
    if not os.path.exists(path):
      continue
    with open(path) as f:
      values = json.load(f)
    for role in _ROLES:
      if values.get(f"{role}_token") is not None:
        tokens[role] = _content(values[f"{role}_token"])
  return tokens


def digest(path):
  """sha256 of tokenizer.json and its side files (what decides the ids)."""
  h = hashlib.sha256()
  json_path = tokenizer_json_path(path)
  for file in [json_path] + [os.path.join(os.path.dirname(json_path), n) for n in SIDE_FILES]:
    if os.path.exists(file):
      with open(file, "rb") as f:
        h.update(os.path.basename(file).encode() + b"\0" + f.read())
  return h.hexdigest()


class HFTokenizer:
  """A `tokenizers.Tokenizer` with calm_jax's interface (vocab_size, special ids, encode, decode).

  Picklable (it carries the JSON), so grain worker processes can use it.
  """

  def __init__(self, tokenizer_json, special, path="<memory>"):
    from calm_jax.data.tokenizer import TokenizerError  # pylint: disable=g-import-not-at-top
    self.path = path
    self._json = tokenizer_json
    self._special = dict(special)
    self._tok = tokenizers.Tokenizer.from_str(tokenizer_json)
    if not self._special.get("eos"):
      raise TokenizerError(
          f"{path}: no eos_token in {' or '.join(SIDE_FILES)} beside the tokenizer.json; "
          "calm_jax ends documents with EOS and stops generation at it. Add eos_token there.")
    if not self._special.get("pad"):
      self._special["pad"] = DEFAULT_PAD
    ids = {}
    for role, token in self._special.items():
      if token is None:
        ids[role] = None
        continue
      token_id = self._tok.token_to_id(token)
      if token_id is None:
        if role != "pad":
          raise TokenizerError(f"{path}: the {role}_token {token!r} of its config is not in the "
                               "tokenizer's vocabulary.")
        self._tok.add_special_tokens([token])      # as the reference's add_special_tokens
        token_id = self._tok.token_to_id(token)
        logging.info("%s: added the pad token %r as id %d (as the reference's scripts do).",
                     path, token, token_id)
      ids[role] = token_id
    self.bos_id, self.eos_id, self.pad_id, self.unk_id = (ids[r] for r in _ROLES)

  @classmethod
  def load(cls, path):
    """Loads PATH (a tokenizer.json or a directory with one) and the special tokens beside it."""
    from calm_jax.data.tokenizer import TokenizerError  # pylint: disable=g-import-not-at-top
    json_path = tokenizer_json_path(path)
    try:
      with open(json_path) as f:
        text = f.read()
    except OSError as e:
      raise TokenizerError(
          f"Cannot read the tokenizer {json_path}: {e.strerror}; config.data.tokenizer takes a "
          "SentencePiece .model, a tokenizer.json or a directory holding one.") from e
    try:
      return cls(text, read_special_tokens(os.path.dirname(json_path)), path=path)
    except Exception as e:  # pylint: disable=broad-except
      if isinstance(e, TokenizerError):
        raise
      raise TokenizerError(f"{json_path} is not a readable Hugging Face tokenizer ({e}).") from e

  def save(self, directory):
    """Writes tokenizer.json (with any added pad token) and the side files naming the specials."""
    os.makedirs(directory, exist_ok=True)
    self._tok.save(os.path.join(directory, TOKENIZER_JSON))
    named = {f"{role}_token": token for role, token in self._special.items() if token}
    for name in SIDE_FILES:
      path = os.path.join(directory, name)
      values = {}
      if name == "tokenizer_config.json" and os.path.exists(path):
        with open(path) as f:
          values = json.load(f)
      values.update(named)
      with open(path, "w") as f:
        json.dump(values, f, indent=2)

  def __getstate__(self):
    return dict(path=self.path, json=self._tok.to_str(), special=self._special)

  def __setstate__(self, state):
    self.__init__(state["json"], state["special"], path=state["path"])

  @property
  def vocab_size(self):
    return self._tok.get_vocab_size(with_added_tokens=True)

  def encode(self, text):
    """Text -> ids as the reference's tokenizer(text): with the post-processor's specials (BOS)."""
    return self._tok.encode(text).ids

  def encode_batch(self, texts):
    return [e.ids for e in self._tok.encode_batch(list(texts))]

  def decode(self, ids):
    """Ids -> text; special tokens (BOS, EOS, PAD) are dropped."""
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

  def id_to_piece(self, token_id):
    return self._tok.id_to_token(int(token_id))
