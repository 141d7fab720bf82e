"""Errors caused by the user's input, and the one-line exit that command-line tools give for them."""
import contextlib
import sys


class UserError(Exception):
  """Bad input (config, data, workdir, checkpoint): the message names the thing and the fix."""


@contextlib.contextmanager
def exit_on_user_error():
  """Turns a UserError into 'error: <message>' on stderr and exit status 1, no traceback."""
  try:
    yield
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
