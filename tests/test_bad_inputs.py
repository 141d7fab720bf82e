"""Bad input at every command line (issue 14): each case exits non-zero with one `error:` line naming the field or file and the fix, no traceback, and changes no checkpoint.

All cases run as processes forked by tests/cli_runner.py's server (the `fork_server`
fixture), two at a time, and fail before anything compiles. Disk full while saving is tests/test_checkpoint_digest.py
(in-process: orbax's own threads print tracebacks of the failed write). A tiny AR run trained here (2 steps) is the run they try to
evaluate, sample from, resume or overwrite; its checkpoints must be unchanged at the end.
"""
import pathlib

import jax
import numpy as np
import pytest

from calm_jax import checkpoint
from calm_jax import config as config_lib
from calm_jax.data import sources
from calm_jax.training import loop
from tests.test_reliability import AR, AUTOENCODER, CALM, ROOT, VOCAB, _config, _overrides
from tests.test_token_ids import _docs, _shard
from tests.test_workdir_lock import _hold

pytestmark = pytest.mark.faults

# case -> (program, argv, substrings of the error line); {T} tokenizer, {R} root, {W} trained run.
_TRAIN = [
    ("unknown_config_key", ["--config.train.stepz=5"], ["config.train", "'stepz'", "train.steps"]),
    ("unknown_config_section", ["--config.trian.steps=5"], ["'trian'", "config.train"]),
    ("config_value_of_wrong_type", ["--config.train.steps=abc"], ["config.train.steps", "abc"]),
    ("negative_steps", ["--config.train.steps=-5"], ["config.train.steps=-5", ">= 0"]),
    ("bad_nan_policy", ["--config.train.nan_policy=ignore"], ["config.train.nan_policy", "skip"]),
    ("seq_len_not_a_multiple_of_k", ["--config.data.seq_len=30", "--config.model.patch_size=4"],
     ["config.data.seq_len=30", "multiple"]),
    ("missing_data", ["--config.data.train=jsonl:{R}/nowhere/*.jsonl"], ["nowhere/*.jsonl",
                                                                        "matches no files"]),
    ("empty_data_glob", ["--config.data.train=jsonl:"], ["jsonl:", "matches no files"]),
    ("data_without_documents", ["--config.data.train=jsonl:{R}/empty.jsonl"],
     ["empty.jsonl", "no documents"]),
    ("empty_jsonl_lines_only", ["--config.data.train=jsonl:{R}/blank.jsonl"], ["blank.jsonl",
                                                                              "no documents"]),
    ("binary_jsonl_lines", ["--config.data.train=jsonl:{R}/binary.jsonl"],
     ["binary.jsonl:2", "not valid UTF-8", "max_bad_fraction"]),
    ("malformed_data", ["--config.data.train=jsonl:{R}/broken.jsonl"], ["broken.jsonl:2",
                                                                        "malformed JSON"]),
    ("unreadable_data", ["--config.data.train=arrayrecord:{R}/garbage"],
     ["config.data.train=", "garbage", "cannot be read"]),
    ("ids_outside_the_vocab", ["--config.data.train=arrayrecord:{R}/big_ids"],
     ["big_ids", "token id 1000", f"vocabulary of {VOCAB}"]),
    ("missing_eval_data", ["--config.data.eval=text:{R}/no_eval/*.txt",
                           "--config.train.eval_every=1"], ["no_eval/*.txt"]),
    ("wrong_spec", ["--config.data.train=csv:/data/*.csv"], ["csv:/data/*.csv",
                                                                    "Unknown data SPEC"]),
    ("vocab_mismatch", ["--config.data.vocab_size=1024", "--config.model.vocab_size=1024"],
     [f"{VOCAB} pieces", "config.model.vocab_size=1024"]),
    ("missing_tokenizer", ["--config.data.tokenizer={R}/no.model"], ["no.model"]),
    ("missing_init_from", ["--config.init_from={R}/no_run"], ["no_run"]),
    ("workdir_is_a_file", ["--workdir={R}/a_file"], ["a_file", "is a file"]),
    ("workdir_in_use", ["--workdir={R}/held"], ["held", "in use by host", "pid"]),
    ("workdir_of_other_config", ["--workdir={R}/taken", "--config.train.steps=10"],
     ["optim.lr: 0.5 -> 0.001", "allow_config_change"]),
    ("resume_with_other_batch_size", ["--workdir={W}", "--config.train.batch_size=16",
                                      "--config.train.allow_config_change=True"],
     ["train.batch_size: 8 -> 16", "init_from"]),
    ("resume_with_other_lr_schedule", ["--workdir={W}", "--config.optim.warmup_steps=1"],
     ["optim.warmup_steps", "learning rate of step", "init_from"]),
    ("bad_distributed_mode", ["--distributed=maybe"], ["--distributed", "maybe"]),
    ("incomplete_multihost_flags", ["--num_processes=2"], ["--coordinator_address",
                                                           "--process_id"]),
    ("unknown_config_variant", ["--config=experiments/calm.py:sise=M"], ["sise", "variants"]),
    ("missing_config_file", ["--config=experiments/nope.py"], ["experiments/nope.py"]),
]
_CALM = [
    ("calm_without_autoencoder", [], ["config.autoencoder.workdir is empty"]),
    ("calm_missing_autoencoder", ["--config.autoencoder.workdir={R}/no_autoencoder"],
     ["config.autoencoder.workdir=", "no_autoencoder", "does not exist"]),
    ("calm_autoencoder_is_another_stage", ["--config.autoencoder.workdir={W}"],
     ["is a 'ar' run", "not an autoencoder run"]),
    ("calm_autoencoder_with_other_k", ["--config.autoencoder.workdir={R}/ae_k2"],
     ["config.model.patch_size=4", "ae_k2", "patch_size=2"]),
    ("calm_autoencoder_without_checkpoint", ["--config.autoencoder.workdir={R}/ae_k4"],
     ["ae_k4", "no checkpoint"]),
]
_OTHER = [
    ("eval_missing_workdir", "calm-eval", ["--workdir={R}/nothing"], ["nothing", "not a calm_jax"]),
    ("eval_workdir_is_a_file", "calm-eval", ["--workdir={R}/a_file"], ["a_file"]),
    ("eval_missing_step", "calm-eval", ["--workdir={W}", "--step=99"], ["step 99", "[2]"]),
    ("eval_step_not_a_number", "calm-eval", ["--workdir={W}", "--step=last"], ["--step='last'"]),
    ("eval_missing_data", "calm-eval", ["--workdir={W}", "--data=jsonl:{R}/nowhere.jsonl"],
     ["nowhere.jsonl", "matches no files"]),
    ("eval_negative_max_tokens", "calm-eval", ["--workdir={W}", "--max_tokens=-5"],
     ["--max_tokens=-5"]),
    ("eval_one_brier_sample", "calm-eval", ["--workdir={W}", "--brier_samples=1"],
     ["--brier_samples=1"]),
    ("eval_seed_not_a_number", "calm-eval", ["--workdir={W}", "--seed=x"], ["--seed"]),
    ("eval_output_in_missing_dir", "calm-eval", ["--workdir={W}", "--output={R}/no/dir/x.json"],
     ["--output=", "no/dir", "does not exist"]),
    ("eval_truncated_checkpoint", "calm-eval", ["--workdir={R}/truncated"],
     ["truncated", "could not be restored", "intact params: none"]),
    ("generate_negative_max_tokens", "calm-generate", ["--workdir={W}", "--max_tokens=-5"],
     ["--max_tokens=-5", "at least 1"]),
    ("generate_zero_samples", "calm-generate", ["--workdir={W}", "--num_samples=0"],
     ["--num_samples=0", "at least 1"]),
    ("generate_zero_temperature", "calm-generate", ["--workdir={W}", "--temperature=0"],
     ["--temperature=0", "> 0"]),
    ("generate_unknown_method", "calm-generate", ["--workdir={W}", "--method=greedy"],
     ["--method='greedy'"]),
    ("generate_negative_top_k", "calm-generate", ["--workdir={W}", "--top_k=-1"],
     ["--top_k=-1"]),
    ("generate_prompt_longer_than_context", "calm-generate",
     ["--workdir={W}", "--prompt=" + "word " * 100], ["--prompt is", "32-token context"]),
    ("generate_missing_workdir", "calm-generate", ["--workdir={R}/nothing"], ["nothing"]),
    ("generate_seed_not_a_number", "calm-generate", ["--workdir={W}", "--seed=1.5"], ["--seed"]),
    ("tokenizer_vocab_too_small", "calm-tokenizer", ["--data=builtin:python_docs",
                                                     "--vocab_size=10", "--output={R}/t.model"],
     ["vocab_size=10", "too small"]),
    ("tokenizer_missing_data", "calm-tokenizer", ["--data=jsonl:{R}/nowhere/*.jsonl",
                                                  "--vocab_size=300", "--output={R}/t.model"],
     ["nowhere/*.jsonl"]),
    ("tokenizer_vocab_not_a_number", "calm-tokenizer", ["--data=builtin:python_docs",
                                                        "--vocab_size=many", "--output=x"],
     ["--vocab_size", "many"]),
    ("prepare_missing_tokenizer", "calm-prepare", ["--data=builtin:python_docs",
                                                   "--tokenizer={R}/no.model", "--output={R}/p"],
     ["no.model"]),
    ("prepare_shards_not_a_number", "calm-prepare", ["--data=builtin:python_docs",
                                                     "--tokenizer={T}", "--output={R}/p",
                                                     "--num_shards=x"], ["--num_shards"]),
    ("convert_missing_input", "calm-convert", ["--input={R}/no_checkpoint", "--output={R}/c"],
     ["no_checkpoint"]),
    ("convert_unknown_direction", "calm-convert", ["--input={W}", "--output={R}/c", "--to=onnx"],
     ["--to", "onnx"]),
    ("diagnose_an_ar_run", "calm-diagnose", ["--workdir={W}"], ["CALM"]),
    ("quickstart_workdir_is_a_file", "calm-quickstart", ["--workdir={R}/a_file"], ["a_file",
                                                                                  "is a file"]),
]


def _make_inputs(root, tokenizer_path):
  """The files, workdirs and the trained run W the cases point at."""
  (root / "a_file").write_text("not a directory")
  (root / "empty.jsonl").write_text("")
  (root / "blank.jsonl").write_text("\n\n   \n")
  (root / "binary.jsonl").write_bytes(b'{"text": "fine"}\n\x89PNG\r\n\x1a\n\x00\x00\rIHDR\n')
  (root / "broken.jsonl").write_text('{"text": "fine"}\n{"text": "cut off\n')
  garbage = root / "garbage"
  garbage.mkdir()
  (garbage / f"train-00000-of-00001{sources.ARRAYRECORD_SUFFIX}").write_bytes(
      np.random.default_rng(0).bytes(5000))
  _shard(root / "big_ids", _docs(8, 40, bad_record=0))
  for name, k in (("ae_k2", 2), ("ae_k4", 4)):
    ae = config_lib.load_config_file(f"{ROOT}/{AUTOENCODER}")
    ae.data.tokenizer = tokenizer_path
    ae.data.vocab_size = ae.model.vocab_size = VOCAB
    ae.model.patch_size = k
    config_lib.save_config(ae, str(root / name))
  other = _config(tokenizer_path, 10, 5, optim__lr=0.5)
  config_lib.save_config(other, str(root / "taken"))
  one = jax.devices()[:1]
  loop.train_and_evaluate(_config(tokenizer_path, 2, 2), str(root / "W"), one)
  loop.train_and_evaluate(_config(tokenizer_path, 2, 2), str(root / "truncated"), one)
  data = sorted(p for p in (pathlib.Path(checkpoint.checkpoint_dir(str(root / "truncated")))
                            / "2" / "params").rglob("*") if p.is_file() and p.parent.name == "d")
  data[0].write_bytes(data[0].read_bytes()[: data[0].stat().st_size // 2])


def _cases(root, tokenizer_path):
  fill = lambda args: [a.format(T=tokenizer_path, R=root, W=root / "W") for a in args]
  cases = {}
  for name, args, want in _TRAIN:
    config = next((a for a in args if a.startswith("--config=")), f"--config={AR}")
    workdir = next((a for a in args if a.startswith("--workdir=")), f"--workdir={root}/w_{name}")
    rest = [a for a in args if not a.startswith(("--config=", "--workdir="))]
    cases[name] = ("calm-train", fill([config, workdir, *_overrides(tokenizer_path, 2, 2),
                                       *rest]), fill(want))
  for name, args, want in _CALM:
    cases[name] = ("calm-train", fill([f"--config={CALM}", f"--workdir={root}/w_{name}",
                                       *_overrides(tokenizer_path, 2, 2), *args]), fill(want))
  for name, prog, args, want in _OTHER:
    cases[name] = (prog, fill(args), fill(want))
  return cases


def _checkpoint_files(workdir):
  """{path: (size, mtime)} of the files of every committed step of a workdir."""
  root = pathlib.Path(checkpoint.checkpoint_dir(str(workdir)))
  return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
          for step in checkpoint.saved_steps(str(workdir)) for p in (root / str(step)).rglob("*")
          if p.is_file()}


@pytest.fixture(scope="module")
def bad_runs(tiny_tokenizer_path, tmp_path_factory, fork_server):
  """{case: (exit status, output, expected substrings)}, and the trained run's files before/after."""
  root = tmp_path_factory.mktemp("bad")
  _make_inputs(root, tiny_tokenizer_path)
  cases = _cases(root, tiny_tokenizer_path)
  workdirs = [root / n for n in ("W", "truncated")]
  before = [_checkpoint_files(w) for w in workdirs]
  (root / "out").mkdir()
  holder = _hold(str(root / "held"))
  try:
    # Trainers on the trained run W take its writer lock: those cases run one at a time.
    on_w = {name for name, (prog, argv, _) in cases.items()
            if prog == "calm-train" and f"--workdir={root / 'W'}" in argv}
    runs = {name: (prog, argv) for name, (prog, argv, _) in cases.items()}
    codes = fork_server.run_all({n: r for n, r in runs.items() if n not in on_w}, root / "out",
                                parallel=2, timeout=1200)
    codes.update(fork_server.run_all({n: runs[n] for n in on_w}, root / "out", parallel=1,
                                     timeout=1200))
  finally:
    holder.kill()
    holder.wait()
  runs = {name: (codes[name], (root / "out" / f"{name}.log").read_text(), want)
          for name, (_, _, want) in cases.items()}
  after = [_checkpoint_files(w) for w in workdirs]
  return runs, before, after, root


def test_there_are_at_least_40_cases():
  assert len(_TRAIN) + len(_CALM) + len(_OTHER) >= 40


@pytest.mark.parametrize("case", [c[0] for c in _TRAIN + _CALM + _OTHER])
def test_bad_input_is_one_error_line_naming_the_fix(bad_runs, case):
  runs, before, after, _ = bad_runs
  code, output, want = runs[case]
  errors = [line for line in output.splitlines() if "error: " in line]
  assert code != 0 and "Traceback" not in output and len(errors) == 1, output[-3000:]
  for name in want:
    assert name in errors[0], errors[0]
  assert after == before                   # no committed checkpoint changed


def test_a_refused_rerun_leaves_the_workdir_as_it_was(bad_runs):
  root = bad_runs[3]
  assert config_lib.load_config(str(root / "taken")).optim.lr == 0.5
  assert not (root / "taken" / "checkpoints").exists()
  assert not (root / "w_missing_eval_data" / "metrics.jsonl").exists()
