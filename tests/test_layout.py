"""The package layout rules (issue 13), checked on the source ASTs: import order, one stage registry, sizes.

Import order (a module may import modules of its own rank or lower; the same rank only
inside its own package, or as listed in SAME_RANK):

  5  cli/                     the only modules that parse flags or import experiments
  4  training/                the trainer (uses the one evaluator)
  3  eval/ sampling/ convert/  the evaluator, generation for a run, checkpoint conversion
  2  runs.py                  a workdir opened for training, eval or sampling
  1  stages.py                the one registry: stage -> model, eval terms, sampler
  0  models/ data/ parallel/ config.py checkpoint.py errors.py progress.py, and the pure kernels the
     registry hands out: eval/brier.py, eval/terms.py, sampling/temperature.py,
     sampling/decode.py (functions of a model and arrays; they import no run or stage)
"""
import ast
import configparser
import pathlib
import re

import pytest

pytestmark = pytest.mark.unit

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "calm_jax"
KERNELS = {"calm_jax.eval.brier", "calm_jax.eval.terms", "calm_jax.sampling.temperature",
           "calm_jax.sampling.decode"}
RANKS = {"cli": 5, "training": 4, "eval": 3, "sampling": 3, "convert": 3, "runs": 2, "stages": 1}
SAME_RANK = {("runs", "stages")}     # (importer, imported) across packages of one rank
TOP_LEVEL = {"__init__", "config", "runs", "stages", "checkpoint", "errors", "progress"}
REQUIRED = [
    "config.py", "runs.py", "stages.py", "checkpoint.py",
    "data/sources.py", "data/tokenizer.py", "data/pipeline.py", "data/prepare.py",
    "models/layers.py", "models/attention.py", "models/transformer.py", "models/autoencoder.py",
    "models/heads/__init__.py", "models/calm.py", "models/ar.py",
    "training/steps.py", "training/optimizer.py", "training/loop.py", "training/preemption.py",
    "training/metrics.py", "parallel/sharding.py", "parallel/distributed.py", "parallel/aot.py",
    "eval/brier.py", "eval/evaluator.py", "sampling/temperature.py", "sampling/decode.py",
    "convert/workdirs.py",
    "cli/train.py", "cli/eval.py", "cli/generate.py", "cli/quickstart.py", "cli/tokenizer.py",
    "cli/prepare.py", "cli/convert.py", "cli/diagnose.py",
]
MARKERS = ("unit", "integration", "e2e", "reference", "faults", "multihost", "slow")
MAX_FUNCTION_LINES = 80
MAX_FILE_LINES = 400


def _modules():
  """{dotted name: path} of every module in calm_jax/."""
  out = {}
  for path in sorted(PACKAGE.rglob("*.py")):
    parts = path.relative_to(ROOT).with_suffix("").parts
    if parts[-1] == "__init__":
      parts = parts[:-1]
    out[".".join(parts)] = path
  return out


MODULES = _modules()
TREES = {name: ast.parse(path.read_text(), str(path)) for name, path in MODULES.items()}
BENCHMARKS = {p.stem: ast.parse(p.read_text(), str(p)) for p in (ROOT / "benchmarks").glob("*.py")}


def _unit(name):
  """'calm_jax.eval.brier' -> 'eval' (the package or top-level module it belongs to)."""
  parts = name.split(".")
  return parts[1] if len(parts) > 1 else ""


def _rank(name):
  if name in KERNELS:
    return 0
  return RANKS.get(_unit(name), 0)


def _imports(tree, module):
  """Absolute names imported anywhere in the tree (function bodies too)."""
  names = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names += [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        base = ".".join(module.split(".")[:-node.level] + ([base] if base else []))
      names += [base] + [f"{base}.{a.name}" for a in node.names]
  return names


def _calm_imports(module):
  """The calm_jax modules a module imports (resolving 'from calm_jax.x import y')."""
  found = set()
  for name in _imports(TREES[module], module):
    while name and name not in MODULES:
      name = name.rpartition(".")[0]
    if name and name != "calm_jax":
      found.add(name)
  return found - {module}


def test_the_layout_exists():
  missing = [p for p in REQUIRED if not (PACKAGE / p).exists()]
  assert not missing, f"missing modules of the layout: {missing}"
  top = {p.stem for p in PACKAGE.glob("*.py")} - TOP_LEVEL
  assert not top, f"modules at the top of calm_jax/ outside the layout: {sorted(top)}"


def test_imports_flow_one_way():
  bad = []
  for module in MODULES:
    for target in _calm_imports(module):
      if target.startswith(module + "."):
        continue                        # a package importing its own modules
      same_unit = _unit(target) == _unit(module)
      ok = (_rank(target) < _rank(module) or same_unit or _rank(target) == _rank(module) == 0
            or (_unit(module), _unit(target)) in SAME_RANK)
      if not ok or (same_unit and _rank(target) > _rank(module)):
        bad.append(f"{module} -> {target}")
  assert not bad, "imports against the flow cli -> training -> eval/sampling/convert -> runs -> " \
      f"stages -> models/data/parallel/config: {bad}"


def test_inference_and_runs_never_import_training():
  bad = [f"{m} -> {t}" for m in MODULES for t in _calm_imports(m)
         if _unit(m) in ("eval", "sampling", "runs") and _unit(t) == "training"]
  assert not bad


def test_only_cli_parses_flags_or_imports_experiments():
  banned = ("absl.flags", "absl.app", "ml_collections.config_flags", "argparse", "experiments")
  bad = []
  for module in MODULES:
    if _unit(module) == "cli":
      continue
    for name in _imports(TREES[module], module):
      if any(name == b or name.startswith(b + ".") for b in banned):
        bad.append(f"{module}: {name}")
  assert not bad


def _stage_compares(tree):
  return [node.lineno for node in ast.walk(tree) if isinstance(node, ast.Compare)
          and any(isinstance(x, ast.Attribute) and x.attr == "stage"
                  for x in [node.left, *node.comparators])]


def test_one_file_compares_config_stage():
  files = {name for name, tree in {**TREES, **BENCHMARKS}.items() if _stage_compares(tree)}
  assert files <= {"calm_jax.stages"}, f"config.stage compared outside stages.py: {sorted(files)}"


def test_no_method_strings_in_apply_calls():
  bad = [f"{name}:{node.lineno}" for name, tree in {**TREES, **BENCHMARKS}.items()
         for node in ast.walk(tree) if isinstance(node, ast.Call) for kw in node.keywords
         if kw.arg == "method" and isinstance(kw.value, ast.Constant)
         and isinstance(kw.value.value, str)]
  assert not bad, f"method='...' strings (pass the bound method): {bad}"


def _calls(tree, name):
  return [n for n in ast.walk(tree) if isinstance(n, ast.Call) and (
      (isinstance(n.func, ast.Name) and n.func.id == name)
      or (isinstance(n.func, ast.Attribute) and n.func.attr == name))]


def test_the_train_step_jit_is_built_in_one_place():
  trees = {**TREES, **{f"benchmarks.{k}": v for k, v in BENCHMARKS.items()}}
  builders = {m for m, t in trees.items() if _calls(t, "make_train_step")}
  assert builders == {"calm_jax.training.steps"}, builders
  users = {m for m, t in trees.items() if _calls(t, "jit_train_step")}
  assert {"calm_jax.training.loop", "calm_jax.training.compile",
          "benchmarks.bench_lib"} <= users, users


def test_opening_a_run_builds_no_optimizer():
  names = {n.id for n in ast.walk(TREES["calm_jax.runs"]) if isinstance(n, ast.Name)}
  names |= {n.attr for n in ast.walk(TREES["calm_jax.runs"]) if isinstance(n, ast.Attribute)}
  assert not names & {"optax", "make_optimizer", "TrainState", "init_train_state", "opt_state"}
  assert not any(n.startswith("optax") for n in _imports(TREES["calm_jax.runs"], "calm_jax.runs"))


def test_sizes():
  long_files = {str(p.relative_to(ROOT)): n for p in [*MODULES.values(),
                                                      *(ROOT / "benchmarks").glob("*.py")]
                if (n := len(p.read_text().splitlines())) > MAX_FILE_LINES}
  assert not long_files, f"files over {MAX_FILE_LINES} lines: {long_files}"
  long_functions = [f"{m}.{n.name}: {n.end_lineno - n.lineno + 1}"
                    for m, t in {**TREES, **BENCHMARKS}.items() for n in ast.walk(t)
                    if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
                    and n.end_lineno - n.lineno + 1 > MAX_FUNCTION_LINES]
  assert not long_functions, f"functions over {MAX_FUNCTION_LINES} lines: {long_functions}"


def test_the_training_loop_reads_in_sections():
  text = MODULES["calm_jax.training.loop"].read_text()
  sections = re.findall(r"^\s*# -- (\w[\w ,/-]*)", text, re.M)
  assert len(sections) >= 6, sections


def test_one_tokenizer_character_budget():
  """The budget is config.data.tokenizer_max_chars (experiments/common.py); no other default."""
  bad = []
  for name, tree in TREES.items():
    for node in ast.walk(tree):
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        args = node.args.args[len(node.args.args) - len(node.args.defaults):]
        bad += [f"{name}.{node.name}" for a, d in zip(args, node.args.defaults)
                if "chars" in a.arg and isinstance(d, ast.Constant)
                and isinstance(d.value, int)]
      if isinstance(node, ast.Call):
        bad += [f"{name}:{node.lineno}" for kw in node.keywords
                if kw.arg in ("default", "max_chars") and isinstance(kw.value, ast.Constant)
                and isinstance(kw.value.value, int) and kw.value.value >= 1_000_000]
  assert not bad, f"tokenizer character budgets besides config.data.tokenizer_max_chars: {bad}"


def _defines(tree, cls, name):
  for node in ast.walk(tree):
    if isinstance(node, ast.ClassDef) and (cls is None or node.name == cls):
      if any(isinstance(b, (ast.FunctionDef, ast.Assign)) and getattr(b, "name", None) == name
             for b in node.body):
        return True
  if cls is None:
    return any(isinstance(n, ast.FunctionDef) and n.name == name for n in tree.body) or any(
        isinstance(n, ast.Assign) and any(getattr(t, "id", None) == name for t in n.targets)
        for n in tree.body)
  return False


def test_dead_code_is_gone():
  assert not _defines(TREES["calm_jax.models.heads"], None, "LOSS_NAMES")
  assert not _defines(TREES["calm_jax.models.energy_score"], None, "energy_loss")
  assert not _defines(TREES["calm_jax.models.transformer"], "Transformer", "init_cache")
  assert not _defines(TREES["calm_jax.training.metrics"], "MetricsWriter", "write_text")
  assert not _defines(TREES["calm_jax.checkpoint"], "Checkpointer", "latest_step")
  assert not [m for m, p in MODULES.items() if "SPEC.md" in p.read_text()]


def test_every_module_says_what_it_holds():
  bad = []
  for name, tree in TREES.items():
    doc = ast.get_docstring(tree)
    first = doc.strip().splitlines()[0] if doc and doc.strip() else ""
    if len(first.split()) < 4:
      bad.append(name)
  assert not bad, f"modules without a first docstring line saying what they hold: {bad}"


def test_every_test_module_has_a_registered_marker():
  ini = configparser.ConfigParser()
  ini.read(ROOT / "pytest.ini")
  registered = {line.split(":")[0].strip() for line in ini["pytest"]["markers"].splitlines()
                if line.strip()}
  assert registered == set(MARKERS), registered
  unmarked = []
  for path in sorted((ROOT / "tests").glob("test_*.py")):
    tree = ast.parse(path.read_text())
    marks = [n for n in tree.body if isinstance(n, ast.Assign)
             and any(getattr(t, "id", None) == "pytestmark" for t in n.targets)]
    used = set(re.findall(r"pytest\.mark\.(\w+)", ast.unparse(marks[0]))) if marks else set()
    if not used & set(MARKERS):
      unmarked.append(path.name)
  assert not unmarked, f"test modules without pytestmark: {unmarked}"


def test_readme_maps_the_layout_and_the_shape_letters():
  readme = (ROOT / "README.md").read_text()
  assert "## Where things are" in readme
  for part in ("cli/", "training/", "eval/", "sampling/", "stages.py", "runs.py", "parallel/"):
    assert part in readme, part
  assert re.search(r"B batch.*L .*K .*D ", readme, re.S)
