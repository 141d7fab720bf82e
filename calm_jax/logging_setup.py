"""Log setup for the command-line tools: our INFO lines, the libraries' warnings only."""
import logging

from absl import logging as absl_logging

_QUIET_PACKAGES = ("/orbax/", "/grain/", "/jax/", "/flax/", "/etils/", "/tensorflow_datasets/")


class _LibraryInfoFilter(logging.Filter):
  """Drops INFO and DEBUG records logged from inside the quiet packages."""

  def filter(self, record):
    if record.levelno >= logging.WARNING:
      return True
    return not any(p in record.pathname for p in _QUIET_PACKAGES)


def setup():
  absl_logging.set_verbosity(absl_logging.INFO)
  logging.getLogger().setLevel(logging.INFO)
  absl_logging.get_absl_handler().addFilter(_LibraryInfoFilter())
