"""Runs many command-line cases cheaply: one process imports the CLIs once, then forks a child per case.

  python -m tests.cli_runner CASES.json OUT_DIR PARALLEL

CASES.json maps a case name to {"prog": "calm-train" | ..., "argv": [...]}. Each child
runs the console entry point as the installed script would (sys.argv, the module's run())
with stdout and stderr in OUT_DIR/NAME.log. OUT_DIR/results.json maps each case to its exit status. The parent imports JAX
but never starts a backend, so forking is safe; a fork costs a fraction of a second
where a fresh interpreter importing JAX costs seconds (tests/test_bad_inputs.py).
"""
import importlib
import json
import os
import sys
import traceback

PROGRAMS = {
    "calm-train": "calm_jax.cli.train", "calm-eval": "calm_jax.cli.eval",
    "calm-generate": "calm_jax.cli.generate", "calm-quickstart": "calm_jax.cli.quickstart",
    "calm-tokenizer": "calm_jax.cli.tokenizer", "calm-prepare": "calm_jax.cli.prepare",
    "calm-convert": "calm_jax.cli.convert", "calm-diagnose": "calm_jax.cli.diagnose",
}


def _child(case, log_path):
  """Runs one case in this (forked) process and exits with its status."""
  fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
  os.dup2(fd, 1)
  os.dup2(fd, 2)
  sys.argv = [case["prog"], *case["argv"]]
  code = 0
  try:
    importlib.import_module(PROGRAMS[case["prog"]]).run()
  except SystemExit as e:
    code = e.code if isinstance(e.code, int) else int(e.code is not None)
  except BaseException:  # pylint: disable=broad-except
    traceback.print_exc()
    code = 70
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(code)


def main(cases_path, out_dir, parallel):
  for module in PROGRAMS.values():
    importlib.import_module(module)
  with open(cases_path) as f:
    queue = list(json.load(f).items())
  running, results = {}, {}
  while queue or running:
    while queue and len(running) < parallel:
      name, case = queue.pop(0)
      pid = os.fork()
      if pid == 0:
        _child(case, os.path.join(out_dir, f"{name}.log"))
      running[pid] = name
    pid, status = os.wait()
    results[running.pop(pid)] = os.waitstatus_to_exitcode(status)
  with open(os.path.join(out_dir, "results.json"), "w") as f:
    json.dump(results, f, indent=1)


if __name__ == "__main__":
  main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
