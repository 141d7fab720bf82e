"""Tokenizing a corpus into ArrayRecord shards for fast random access (calm-prepare, cli/prepare.py).

Writes DIR/data-00000-of-0000N.array_record, ... (one record per document, in
source order, encoded as sources.encode_tokens describes) and DIR/prepare.json
(what was tokenized with what). Train on it with --config.data.train=arrayrecord:DIR.
"""
import glob
import json
import os
import sys
import time

from array_record.python import array_record_module
import tqdm

from calm_jax.data import sources
from calm_jax.data import tokenizer as tokenizer_lib

_ENCODE_BATCH = 64  # documents per SentencePiece batch call
_SHARD_GLOB = "data-*-of-*" + sources.ARRAYRECORD_SUFFIX


def shard_paths(output_dir, num_shards):
  return [os.path.join(output_dir, f"data-{i:05d}-of-{num_shards:05d}{sources.ARRAYRECORD_SUFFIX}")
          for i in range(num_shards)]


def _text_batches(source, progress):
  """Yields lists of up to _ENCODE_BATCH documents in source order, with a progress bar."""
  bar = tqdm.tqdm(total=len(source), unit="doc", disable=not progress, file=sys.stderr)
  with bar:
    for start in range(0, len(source), _ENCODE_BATCH):
      texts = [source[i] for i in range(start, min(start + _ENCODE_BATCH, len(source)))]
      yield texts
      bar.update(len(texts))


def prepare(spec, tokenizer_path, output_dir, num_shards=4, max_bad_fraction=0.0,
            progress=True):
  """Tokenizes every document of a text SPEC into ArrayRecord shards under output_dir.

  Documents go to shards in contiguous runs, so reading the shards in name order
  gives back the source order. Returns a summary dict (documents, tokens, shards).
  """
  if any(p.strip().startswith("arrayrecord:") for p in spec.split(",")):
    raise sources.DataError(f"{spec!r} is already tokenized (arrayrecord); give a text SPEC.")
  tok = tokenizer_lib.load(tokenizer_path)
  source = sources.parse_spec(spec, max_bad_fraction)
  if len(source) == 0:
    raise sources.DataError(f"The data SPEC {spec!r} has no documents.")
  num_shards = max(1, min(num_shards, len(source)))
  os.makedirs(output_dir, exist_ok=True)
  for old in glob.glob(os.path.join(output_dir, _SHARD_GLOB)):
    os.remove(old)  # shards of an earlier run would mix into arrayrecord:DIR
  paths = shard_paths(output_dir, num_shards)
  writers = [array_record_module.ArrayRecordWriter(p, "group_size:1") for p in paths]
  documents = tokens = 0
  start = time.time()
  try:
    for texts in _text_batches(source, progress):
      for ids in tok.encode_batch(texts):
        writers[documents * num_shards // len(source)].write(sources.encode_tokens(ids))
        documents += 1
        tokens += len(ids)
  finally:
    for writer in writers:
      writer.close()
  summary = dict(data=spec, tokenizer=os.path.abspath(tokenizer_path),
                 vocab_size=tok.vocab_size, documents=documents, tokens=tokens,
                 shards=num_shards, seconds=round(time.time() - start, 2))
  with open(os.path.join(output_dir, "prepare.json"), "w") as f:
    json.dump(summary, f, indent=2)
  return summary
