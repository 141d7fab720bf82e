"""The command-line layer: the absl app runner, the log setup and the defaults older runs lack.

The modules here (train, eval, generate, quickstart, diagnose, convert, tokenizer, prepare,
plot, reference_check) are the only ones in calm_jax that parse flags or read experiments/.
"""
import argparse
import difflib
import logging
import sys

from absl import app
from absl import flags
from absl import logging as absl_logging
import ml_collections

from calm_jax import config as config_lib
from calm_jax import errors

_QUIET_PACKAGES = ("/orbax/", "/grain/", "/jax/", "/flax/", "/etils/", "/tensorflow_datasets/")


class _LibraryInfoFilter(logging.Filter):
  """Drops INFO and DEBUG records logged from inside the quiet packages."""

  def filter(self, record):
    if record.levelno >= logging.WARNING:
      return True
    return not any(p in record.pathname for p in _QUIET_PACKAGES)


def setup_logging():
  """Our INFO lines, the libraries' warnings only."""
  absl_logging.set_verbosity(absl_logging.INFO)
  logging.getLogger().setLevel(logging.INFO)
  absl_logging.get_absl_handler().addFilter(_LibraryInfoFilter())


def setup_plain_logging():
  """Our INFO lines (progress included) and the libraries' warnings on stderr, for the argparse
  command lines (calm-prepare, calm-tokenizer) run as programs: replaces the root handlers."""
  handler = logging.StreamHandler()
  handler.setFormatter(logging.Formatter("%(levelname).1s %(asctime)s %(message)s", "%H:%M:%S"))
  handler.addFilter(_LibraryInfoFilter())
  logging.basicConfig(level=logging.INFO, handlers=[handler], force=True)


class ArgumentParser(argparse.ArgumentParser):
  """argparse for calm-tokenizer and calm-prepare: a bad flag is one `error:` line, exit 2."""

  def error(self, message):
    print(f"{self.prog}: error: {message} (--help lists the flags)", file=sys.stderr)
    sys.exit(2)


def _config_spec(argv):
  for i, arg in enumerate(argv):
    if arg == "--config" and i + 1 < len(argv):
      return argv[i + 1]
    if arg.startswith("--config="):
      return arg.partition("=")[2]
  return None


def _unknown_field(name, config):
  """Why `--config.NAME` names no field (with the nearest ones), or None if it does."""
  node, path = config, ["config"]
  for part in name.split("."):
    if not isinstance(node, ml_collections.ConfigDict):
      return f"{'.'.join(path)} is a value, not a section"
    if part not in node:
      keys = sorted(node.keys())
      near = difflib.get_close_matches(part, keys, n=3, cutoff=0.5)
      where = ".".join(path)
      return (f"{where} has no field {part!r}; nearest: "
              f"{', '.join(f'{where}.{k}' for k in near) or 'none'} (all: {', '.join(keys)})")
    node, path = node[part], path + [part]
  return None


def config_flag_error(argv, error):
  """The one line for a --config or --config.FIELD=VALUE that failed to parse (error: why)."""
  spec = _config_spec(argv)
  if spec is None:
    return error
  try:
    config = config_lib.load_config_file(spec)
  except Exception as e:  # pylint: disable=broad-except
    return (f"--config={spec} cannot be loaded ({type(e).__name__}: {e}); give "
            "experiments/FILE.py[:variant=value,...] with the variants its docstring lists.")
  for arg in argv:
    if arg.startswith("--config."):
      name = arg[len("--config."):].partition("=")[0]
      why = _unknown_field(name, config)
      if why:
        return f"--config.{name}: {why}."
  return f"{error}; give each --config.FIELD a value of the field's type."


def _parse_flags(argv):
  """absl's flag parsing, with every failure (a config override too) as one `error:` line."""
  try:
    rest = flags.FLAGS(argv)
    if "config" in flags.FLAGS and flags.FLAGS["config"].present:
      flags.FLAGS.config.get("stage")       # config_flags defers a load failure to first use
    return rest
  except flags.Error as e:
    message = str(e).splitlines()[0]
    if "--config" in message:
      message = config_flag_error(argv, message)
  except (AttributeError, KeyError, TypeError, ValueError, OSError) as e:
    message = config_flag_error(argv, f"{type(e).__name__}: {e}")
  print(f"error: {message} (--helpfull lists the flags)", file=sys.stderr)
  sys.exit(1)


def run_app(main, required, modules, takes_args=False):
  """Runs main() under absl with the log setup and the one-line exit for a UserError.

  takes_args: main(args) gets the positional arguments (calm-plot's workdirs); else any
  positional argument is refused.

  `required` flags are marked as such and the flags of `modules` made key flags: a
  console script's __main__ is the installed wrapper, so absl's --help would list no
  flag of the module that defines them; registering them under sys.argv[0] fixes that.
  """
  for module in modules:
    for flag in flags.FLAGS.get_flags_for_module(module):
      flags.FLAGS.register_key_flag_for_module(sys.argv[0], flag)
  flags.mark_flags_as_required(required)

  def absl_main(argv):
    if len(argv) > 1 and not takes_args:
      raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    setup_logging()
    with errors.exit_on_user_error():
      main(argv[1:]) if takes_args else main()

  app.run(absl_main, flags_parser=_parse_flags)


def inference_defaults(config):
  """Adds eval/sampling fields missing from an older config.json (values from experiments/common.py).

  The single home of defaults is experiments/, which the library never imports: the
  command lines that open saved runs fill what older runs lack.
  """
  from experiments import common  # pylint: disable=g-import-not-at-top
  for section, make in (("eval", common.eval_config), ("sampling", common.sampling_config)):
    defaults = make()
    if section not in config:
      config[section] = defaults
      continue
    for key, value in defaults.items():
      if key not in config[section]:
        config[section][key] = value
  return config
