"""calm-prepare: tokenize a corpus into ArrayRecord shards, in parallel, resumable, split across machines.

  calm-prepare --data SPEC --tokenizer PATH.model --output DIR [--num_workers W]
               [--num_shards N --shard_index I] [--runner local|beam]

The shards, their done-markers and DIR/prepare.json are described in calm_jax/data/prepare.py.
Progress: a bar with rate and ETA on a terminal, a log line every 30 s otherwise.
Rerun the same command after a kill: it resumes. Train on the shards with
--config.data.train=arrayrecord:DIR.
"""
import os
import sys

from calm_jax import cli
from calm_jax.cli import tokenizer as cli_tokenizer
from calm_jax.data import prepare
from calm_jax.data import sources
from calm_jax.data import tokenizer as tokenizer_lib


def _parse_args(argv):
  parser = cli.ArgumentParser(prog="calm-prepare", description=__doc__.splitlines()[0])
  parser.add_argument("--data", required=True, help="data SPEC to tokenize (see README)")
  parser.add_argument("--tokenizer", required=True,
                      help="SentencePiece .model, tokenizer.json or a directory with one")
  parser.add_argument("--output", required=True, help="output directory for the shards")
  parser.add_argument("--num_workers", type=int, default=os.cpu_count() or 1,
                      help="local tokenizer processes (default: all cores)")
  parser.add_argument("--num_shards", type=int, default=1,
                      help="split the work into N shards, one per machine or array task")
  parser.add_argument("--shard_index", type=int, default=None,
                      help="do only shard I of --num_shards (default: all of them here)")
  parser.add_argument("--part_mb", type=float, default=prepare.PART_BYTES / 2**20,
                      help="uncompressed MiB of a line file per output shard file")
  parser.add_argument("--part_docs", type=int, default=prepare.PART_DOCS,
                      help="documents of a random-access source (builtin:, text:, tfds:) per shard")
  parser.add_argument("--runner", choices=("local", "beam"), default="local",
                      help="'beam': an Apache Beam pipeline (pip install -e '.[beam]'); pass "
                      "Beam's own flags (--runner_flags='--runner=DataflowRunner ...')")
  parser.add_argument("--runner_flags", default="", help="flags for the Beam pipeline")
  cli_tokenizer.add_bad_line_flags(parser)
  return parser.parse_args(argv)


def _prepare(args):
  kw = dict(max_bad_fraction=cli_tokenizer.max_bad_fraction(args),
            part_bytes=int(args.part_mb * 2**20), part_docs=args.part_docs)
  if args.runner == "beam":
    from calm_jax.data import prepare_beam  # pylint: disable=g-import-not-at-top
    return prepare_beam.prepare_with_beam(args.data, args.tokenizer, args.output,
                                pipeline_flags=args.runner_flags.split(), **kw)
  return prepare.prepare(args.data, args.tokenizer, args.output, num_workers=args.num_workers,
                         num_shards=args.num_shards, shard_index=args.shard_index, **kw)


def run(argv=None):
  """Console entry point; bad input exits 1 with a one-line message, no traceback."""
  args = _parse_args(argv)
  if argv is None:  # run as a program (not called from Python): log INFO lines to stderr
    cli.setup_plain_logging()
  try:
    summary = _prepare(args)
  except (sources.DataError, tokenizer_lib.TokenizerError, OSError) as e:
    print(f"calm-prepare: error: {e}", file=sys.stderr)
    sys.exit(1)
  print(f"calm-prepare: wrote {summary['parts']} shards here ({summary['documents']} documents, "
        f"{summary['tokens']} tokens) in {summary['seconds']} s, "
        f"{summary['tokens_per_s_per_worker']} tokens/s per worker x {summary['workers']}.")
  total = summary["total"]
  if total is None:
    print(f"calm-prepare: {args.output} is not complete yet: the other shards "
          "(--shard_index) still have parts to write.")
  else:
    print(f"calm-prepare: {args.output} complete: {total['documents']} documents, "
          f"{total['tokens']} tokens, {total['shards']} shards, {total['bad']} bad lines "
          f"skipped; train with --config.data.train=arrayrecord:{os.path.abspath(args.output)}")


if __name__ == "__main__":
  run()
