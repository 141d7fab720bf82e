"""Starts command lines cheaply: one server process imports the CLIs once, then forks a child per run.

  python -m tests.cli_runner        (the server; ForkServer below starts it, the `fork_server`
                                     fixture of tests/conftest.py once per session)

The server reads one run per line on stdin ({"prog": "calm-train" | ..., "argv": [...],
"log": PATH}), forks it at once and prints its pid; when a child ends the server writes
PATH.rc (its exit status, -N for signal N). Each child runs the console entry point as the
installed script would (sys.argv, the module's run()) with stdout and stderr appended to
PATH: a process of its own, which a test may kill -9 or send SIGTERM. The server imports
JAX but never starts a backend, so forking is safe; it also builds the builtin corpus
(a per-process cache). A fork costs a fraction of a second where a fresh interpreter
spends ~10 s importing JAX and parsing the corpus (tests/test_bad_inputs.py starts 60
runs, tests/test_faults.py 21).
"""
import importlib
import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
import traceback

PROGRAMS = {
    "calm-train": "calm_jax.cli.train", "calm-eval": "calm_jax.cli.eval",
    "calm-generate": "calm_jax.cli.generate", "calm-quickstart": "calm_jax.cli.quickstart",
    "calm-tokenizer": "calm_jax.cli.tokenizer", "calm-prepare": "calm_jax.cli.prepare",
    "calm-convert": "calm_jax.cli.convert", "calm-diagnose": "calm_jax.cli.diagnose",
}


def _child(run):
  """Runs one command line in this (forked) process and exits with its status."""
  os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
  fd = os.open(run["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
  os.dup2(fd, 1)
  os.dup2(fd, 2)
  sys.argv = [run["prog"], *run["argv"]]
  code = 0
  try:
    importlib.import_module(PROGRAMS[run["prog"]]).run()
  except SystemExit as e:
    code = e.code if isinstance(e.code, int) else int(e.code is not None)
  except BaseException:  # pylint: disable=broad-except
    traceback.print_exc()
    code = 70
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(code)


def serve():
  """Forks each run read from stdin; at EOF kills what still runs and exits."""
  for module in PROGRAMS.values():
    importlib.import_module(module)
  from calm_jax.data import builtin  # pylint: disable=g-import-not-at-top
  builtin.documents("train")
  builtin.documents("valid")
  logs, pending, eof = {}, b"", False
  print("ready", flush=True)
  while not eof or logs:
    if not eof and select.select([0], [], [], 0.01)[0]:
      chunk = os.read(0, 1 << 16)
      eof, pending = not chunk, pending + chunk
      while b"\n" in pending:
        line, pending = pending.split(b"\n", 1)
        run = json.loads(line)
        pid = os.fork()
        if pid == 0:
          _child(run)
        logs[pid] = run["log"]
        print(pid, flush=True)
      if eof:
        for pid in logs:
          os.kill(pid, signal.SIGKILL)
    elif eof:
      time.sleep(0.01)
    for pid in list(logs):                    # reap the runs that ended
      done, status = os.waitpid(pid, os.WNOHANG)
      if done:
        rc_path = logs.pop(pid) + ".rc"
        with open(rc_path + ".tmp", "w") as f:
          f.write(str(os.waitstatus_to_exitcode(status)))
        os.replace(rc_path + ".tmp", rc_path)


class ForkedRun:
  """A run the server forked, with the part of subprocess.Popen the tests use."""

  def __init__(self, pid, log_path):
    self.pid, self.log_path, self.returncode = pid, log_path, None

  def poll(self):
    if self.returncode is None and os.path.exists(f"{self.log_path}.rc"):
      with open(f"{self.log_path}.rc") as f:
        self.returncode = int(f.read())
    return self.returncode

  def wait(self, timeout=None):
    deadline = None if timeout is None else time.time() + timeout
    while self.poll() is None:
      if deadline is not None and time.time() > deadline:
        raise subprocess.TimeoutExpired(str(self.pid), timeout)
      time.sleep(0.005)
    return self.returncode

  def send_signal(self, signum):
    if self.poll() is None:
      os.kill(self.pid, signum)

  def kill(self):
    self.send_signal(signal.SIGKILL)


class ForkServer:
  """The server, started with `env` in `cwd`."""

  def __init__(self, env, cwd):
    self._proc = subprocess.Popen([sys.executable, "-m", "tests.cli_runner"], env=env, cwd=cwd,
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    self._lock = threading.Lock()           # one request at a time (tests start from threads)
    assert self._proc.stdout.readline().strip() == "ready"

  def start(self, prog, argv, log_path):
    """Forks `prog argv` (output appended to log_path); returns its ForkedRun at once."""
    log_path = str(log_path)
    if os.path.exists(log_path + ".rc"):
      os.unlink(log_path + ".rc")
    with self._lock:
      self._proc.stdin.write(json.dumps(dict(prog=prog, argv=[str(a) for a in argv],
                                             log=log_path)) + "\n")
      self._proc.stdin.flush()
      return ForkedRun(int(self._proc.stdout.readline()), log_path)

  def run_all(self, runs, out_dir, parallel, timeout):
    """{name: exit status} of runs {name: (prog, argv)}, `parallel` at a time; the output of
    each in OUT_DIR/NAME.log."""
    queue, running, codes = list(runs.items()), {}, {}
    deadline = time.time() + timeout
    while queue or running:
      while queue and len(running) < parallel:
        name, (prog, argv) = queue.pop(0)
        running[name] = self.start(prog, argv, os.path.join(out_dir, f"{name}.log"))
      for name in [n for n, run in running.items() if run.poll() is not None]:
        codes[name] = running.pop(name).returncode
      if time.time() > deadline:
        for run in running.values():
          run.kill()
        raise TimeoutError(f"{sorted(running)} still running after {timeout}s")
      time.sleep(0.01)
    return codes

  def close(self):
    self._proc.stdin.close()
    self._proc.wait(timeout=60)


if __name__ == "__main__":
  serve()
