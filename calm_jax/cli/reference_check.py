"""python -m calm_jax.cli.reference_check: calm_jax against a reference-CALM fixture, one row per output array.

  python -m calm_jax.cli.reference_check FIXTURE.npz [--json FIXTURE.json] [--tol 1e-5]

What is compared and how: calm_jax/convert/reference_check.py. Exit status 1 if any row
fails (or an out/ array has no calm_jax counterpart), 2 if the fixture cannot be read.
"""
import argparse
import os
import sys


def main(argv=None):
  parser = argparse.ArgumentParser(prog="python -m calm_jax.cli.reference_check",
                                   description=__doc__.split("\n")[0])
  parser.add_argument("fixture", help="FIXTURE.npz (the json beside it, or --json)")
  parser.add_argument("--json", default=None, help="the fixture's json (default: beside the npz)")
  parser.add_argument("--tol", type=float, default=1e-5,
                      help="max error relative to the array's max |value| (default 1e-5)")
  args = parser.parse_args(argv)
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  from calm_jax import errors  # pylint: disable=g-import-not-at-top
  from calm_jax.convert import reference_check  # pylint: disable=g-import-not-at-top
  try:
    rows, seconds = reference_check.run_check(args.fixture, args.json, args.tol)
  except (FileNotFoundError, ValueError, KeyError, errors.UserError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(reference_check.format_rows(rows, args.tol))
  failed = [r[0] for r in rows if not r[4]]
  print(f"{len(rows) - len(failed)}/{len(rows)} arrays within {args.tol:g} "
        f"({seconds:.1f} s){'; FAILED: ' + ', '.join(failed) if failed else ''}")
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
