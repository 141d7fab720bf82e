"""calm-tokenizer: train a byte-fallback SentencePiece model on a data SPEC.

  calm-tokenizer --data SPEC --vocab_size N --output PATH.model [--model_type bpe|unigram]

Special ids are fixed (tokenizer.py): pad 0, unk 1, bos 2, eos 3.
"""
import itertools
import sys
import time

from calm_jax import cli
from calm_jax.data import sources
from calm_jax.data import tokenizer as tokenizer_lib
from experiments import common

_SUMMARY_DOCS = 200  # documents encoded for the characters-per-token summary


class _Counter:
  """Wraps an iterable of texts and counts the documents and characters it yields."""

  def __init__(self, texts):
    self._texts = texts
    self.documents = self.chars = 0

  def __iter__(self):
    for text in self._texts:
      self.documents += 1
      self.chars += len(text)
      yield text


def add_bad_line_flags(parser):
  """--max_bad_fraction and --skip_bad_records (calm-tokenizer, calm-prepare)."""
  parser.add_argument("--max_bad_fraction", type=float,
                      default=common.data_config().max_bad_fraction,
                      help="bad lines (invalid JSON, missing field, not UTF-8) are skipped and "
                      "counted; fail above this fraction (default: config.data.max_bad_fraction)")
  parser.add_argument("--skip_bad_records", action="store_true",
                      help="skip any number of bad lines (--max_bad_fraction 1)")


def max_bad_fraction(args):
  return 1.0 if args.skip_bad_records else args.max_bad_fraction


def _parse_args(argv):
  parser = cli.ArgumentParser(prog="calm-tokenizer", description=__doc__.splitlines()[0])
  parser.add_argument("--data", required=True, help="data SPEC to train on (see README)")
  parser.add_argument("--vocab_size", type=int, required=True, help="number of pieces")
  parser.add_argument("--output", required=True, help="path of the .model file to write")
  parser.add_argument("--model_type", default="bpe", choices=tokenizer_lib.MODEL_TYPES)
  parser.add_argument("--max_chars", type=int, default=common.data_config().tokenizer_max_chars,
                      help="characters sampled from the data for training (default: "
                      "config.data.tokenizer_max_chars of experiments/common.py)")
  add_bad_line_flags(parser)
  return parser.parse_args(argv)


def run(argv=None):
  """Console entry point; bad input exits 1 with a one-line message, no traceback."""
  args = _parse_args(argv)
  if argv is None:  # run as a program (not called from Python): log INFO lines to stderr
    cli.setup_plain_logging()
  start = time.time()
  try:
    texts = _Counter(sources.iter_texts(args.data, max_bad_fraction(args)))
    tok = tokenizer_lib.train_tokenizer(texts, args.vocab_size, args.output,
                                        args.model_type, args.max_chars)
    sample = list(itertools.islice(
        sources.iter_texts(args.data, max_bad_fraction(args)), _SUMMARY_DOCS))
  except (sources.DataError, tokenizer_lib.TokenizerError, OSError) as e:
    print(f"calm-tokenizer: error: {e}", file=sys.stderr)
    sys.exit(1)
  chars = sum(len(t) for t in sample)
  tokens = sum(len(ids) for ids in tok.encode_batch(sample))
  print(f"calm-tokenizer: wrote {args.output}: {tok.vocab_size} {args.model_type} pieces "
        f"(pad={tok.pad_id} unk={tok.unk_id} bos={tok.bos_id} eos={tok.eos_id}, byte fallback), "
        f"trained on {texts.chars} characters of {texts.documents} documents in "
        f"{time.time() - start:.1f} s; {chars / max(tokens, 1):.2f} characters/token.")


if __name__ == "__main__":
  run()
