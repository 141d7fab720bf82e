"""The command-line layer: the absl app runner, the log setup and the defaults older runs lack.

The modules here (train, eval, generate, quickstart, diagnose, convert, tokenizer, prepare,
plot, reference_check) are the only ones in calm_jax that parse flags or read experiments/.
"""
import logging
import sys

from absl import app
from absl import flags
from absl import logging as absl_logging

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

  app.run(absl_main)


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
