"""absl entry points for the console scripts, with their own flags listed in --help."""
import sys

from absl import app
from absl import flags


def run_app(main, required, modules):
  """app.run(main) after marking `required` flags and making the flags of `modules` key flags.

  A console script's __main__ is the installed wrapper, so absl's --help would list no
  flag of the module that defines them; registering them under sys.argv[0] fixes that.
  """
  for module in modules:
    for flag in flags.FLAGS.get_flags_for_module(module):
      flags.FLAGS.register_key_flag_for_module(sys.argv[0], flag)
  flags.mark_flags_as_required(required)
  app.run(main)
