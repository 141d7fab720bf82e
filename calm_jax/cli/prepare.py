"""calm-prepare: tokenize a corpus into ArrayRecord shards for fast random access.

  calm-prepare --data SPEC --tokenizer PATH.model --output DIR [--num_shards N]

The shards and DIR/prepare.json are described in calm_jax/data/prepare.py. Train on them
with --config.data.train=arrayrecord:DIR.
"""
import os
import sys

from calm_jax import cli
from calm_jax.data import prepare
from calm_jax.data import sources
from calm_jax.data import tokenizer as tokenizer_lib


def _parse_args(argv):
  parser = cli.ArgumentParser(prog="calm-prepare", description=__doc__.splitlines()[0])
  parser.add_argument("--data", required=True, help="data SPEC to tokenize (see README)")
  parser.add_argument("--tokenizer", required=True,
                      help="SentencePiece .model, tokenizer.json or a directory with one")
  parser.add_argument("--output", required=True, help="output directory for the shards")
  parser.add_argument("--num_shards", type=int, default=4, help="number of ArrayRecord files")
  parser.add_argument("--skip_bad_records", action="store_true",
                      help="skip malformed JSONL lines with a warning instead of failing")
  return parser.parse_args(argv)


def run(argv=None):
  """Console entry point; bad input exits 1 with a one-line message, no traceback."""
  args = _parse_args(argv)
  try:
    summary = prepare.prepare(args.data, args.tokenizer, args.output, args.num_shards,
                              args.skip_bad_records)
  except (sources.DataError, tokenizer_lib.TokenizerError, OSError) as e:
    print(f"calm-prepare: error: {e}", file=sys.stderr)
    sys.exit(1)
  print(f"calm-prepare: {summary['documents']} documents, {summary['tokens']} tokens, "
        f"{summary['shards']} shards in {args.output} ({summary['seconds']} s); "
        f"train with --config.data.train=arrayrecord:{os.path.abspath(args.output)}")


if __name__ == "__main__":
  run()
