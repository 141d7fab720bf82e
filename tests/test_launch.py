"""Tests for the multi-host flags (calm_jax/parallel/distributed.py) and the launch scripts' plans and checks.

No test calls a real gcloud, xpk or srun: the scripts run with --dry-run, or with
stub commands first on PATH that record their arguments.
"""
import os
import pathlib
import socket
import stat
import subprocess
import sys
import textwrap

import pytest

from calm_jax.parallel import distributed

pytestmark = pytest.mark.multihost

ROOT = pathlib.Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"
# Variables the scripts read; removed from the environment of every script run.
SCRIPT_VARS = (
    "TPU_NAME", "ZONE", "PROJECT", "ACCELERATOR_TYPE", "RUNTIME_VERSION", "REPO_URL", "GIT_REF",
    "SETUP_CMD", "SPOT", "SKIP_INSTALL", "RUN_NAME", "CLUSTER", "WORKLOAD", "TPU_TYPE",
    "NUM_SLICES", "DOCKER_IMAGE", "BASE_IMAGE", "EXTRA_XPK_ARGS", "XPK", "SLURM_JOB_ID",
    "SLURM_JOB_NUM_NODES", "SLURM_NTASKS_PER_NODE", "SLURM_GPUS_PER_NODE", "CALM_VENV",
    "CALM_DIR", "CALM_TRAIN", "XLA_FLAGS", "NCCL_DEBUG", "COORDINATOR_PORT", "DETACH",
    "DEVICE_TYPE", "NUM_SHARDS", "SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT",
    "SLURM_CPUS_PER_TASK", "CALM_PREPARE", "MAX_RESTARTS", "PRIORITY")
TPU_VARS = dict(TPU_NAME="calm-m", ZONE="us-east5-a", PROJECT="my-project",
                ACCELERATOR_TYPE="v5p-64", RUNTIME_VERSION="v2-alpha-tpuv5")
XPK_VARS = dict(CLUSTER="calm-cluster", WORKLOAD="calm-m-2x64", TPU_TYPE="v5p-64", NUM_SLICES="2",
                PROJECT="my-project", ZONE="us-east5-a", BASE_IMAGE="jax-tpu:latest")


# -- calm_jax.distributed.plan ------------------------------------------------------------------

def test_off_and_auto_without_cluster_run_single_process():
  assert not distributed.plan("off", environ={}).initialize
  assert not distributed.plan("auto", environ={}, tpu_chips=False).initialize


def test_explicit_flags_initialize_without_cluster_detection():
  p = distributed.plan("auto", "127.0.0.1:1234", 2, 1, environ={}, tpu_chips=False)
  assert p.initialize and p.reason == "explicit"
  assert p.kwargs == dict(coordinator_address="127.0.0.1:1234", num_processes=2, process_id=1,
                          cluster_detection_method="deactivate")


def test_env_fallback_and_flag_precedence():
  env = {"CALM_COORDINATOR_ADDRESS": "host:99", "CALM_NUM_PROCESSES": "4",
         "CALM_PROCESS_ID": "3"}
  p = distributed.plan("auto", environ=env, tpu_chips=False)
  assert p.kwargs["coordinator_address"] == "host:99"
  assert (p.kwargs["num_processes"], p.kwargs["process_id"]) == (4, 3)
  p = distributed.plan("on", process_id=0, environ=env, tpu_chips=False)
  assert p.kwargs["process_id"] == 0


@pytest.mark.parametrize("args, env, names", [
    (("127.0.0.1:1234", None, None), {}, ["--num_processes", "--process_id"]),
    ((None, 2, None), {}, ["--coordinator_address", "--process_id"]),
    ((None, None, None), {"CALM_PROCESS_ID": "0"}, ["--coordinator_address", "--num_processes"]),
    (("127.0.0.1", 2, 0), {}, ["--coordinator_address", "HOST:PORT"]),
    (("127.0.0.1:99999", 2, 0), {}, ["--coordinator_address"]),
    (("127.0.0.1:1234", 2, 2), {}, ["--process_id=2", "[0, 2)"]),
    (("127.0.0.1:1234", 0, 0), {}, ["--num_processes=0"]),
    ((None, None, None), {"CALM_COORDINATOR_ADDRESS": "h:1", "CALM_NUM_PROCESSES": "two",
                          "CALM_PROCESS_ID": "0"}, ["CALM_NUM_PROCESSES='two'"]),
])
def test_bad_settings_name_the_flag(args, env, names):
  with pytest.raises(distributed.DistributedError) as e:
    distributed.plan("auto", *args, environ=env, tpu_chips=False)
  message = str(e.value)
  assert "\n" not in message
  for name in names:
    assert name in message


def test_off_conflicts_with_explicit_flags():
  with pytest.raises(distributed.DistributedError, match="--distributed=off conflicts with"):
    distributed.plan("off", coordinator_address="h:1", environ={})
  assert not distributed.plan("off", environ={"CALM_PROCESS_ID": "0"}).initialize
  with pytest.raises(distributed.DistributedError, match="--distributed='maybe'"):
    distributed.plan("maybe", environ={})


SLURM_ENV = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "gpu[1-4]", "SLURM_NTASKS": "32",
             "SLURM_PROCID": "5", "SLURM_LOCALID": "5"}


@pytest.mark.parametrize("env, tpu_chips, cluster", [
    (SLURM_ENV, False, "slurm"),
    (dict(SLURM_ENV, SLURM_NTASKS="1"), False, None),                  # one task: single process
    ({k: v for k, v in SLURM_ENV.items() if k != "SLURM_STEP_NODELIST"}, False, None),  # no srun
    ({"TPU_WORKER_HOSTNAMES": "w0,w1,w2,w3"}, False, "tpu"),
    ({"TPU_WORKER_HOSTNAMES": "w0"}, False, None),
    ({"MEGASCALE_COORDINATOR_ADDRESS": "w0:8080"}, False, "tpu"),
    ({}, True, "tpu"),                                                  # a TPU VM
    ({"OMPI_MCA_orte_hnp_uri": "1.0;tcp://10.0.0.1:1", "OMPI_COMM_WORLD_SIZE": "2"}, False, "ompi"),
    ({}, False, None),
])
def test_cluster_detection(env, tpu_chips, cluster):
  assert distributed.detect_cluster(env, tpu_chips) == cluster
  p = distributed.plan("auto", environ=env, tpu_chips=tpu_chips)
  assert p.initialize == (cluster is not None)
  assert p.kwargs == {}                        # JAX reads the cluster environment itself


def test_on_without_cluster_lets_jax_detect():
  p = distributed.plan("on", environ={}, tpu_chips=False)
  assert p.initialize and p.kwargs == {}


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


_INIT_SCRIPT = textwrap.dedent("""\
    import sys
    from absl import app
    from absl import flags
    from calm_jax import errors
    from calm_jax.cli import train as cli_train
    from calm_jax.parallel import distributed

    cli_train.define_distributed_flags()
    F = flags.FLAGS

    def main(argv):
      with errors.exit_on_user_error():
        if argv[1:] == ["use_jax_first"]:
          import jax
          jax.devices()
        args = (F.distributed, F.coordinator_address, F.num_processes, F.process_id)
        first = distributed.initialize(*args)
        second = distributed.initialize(*args)
        import jax
        print("RESULT", first, second, jax.process_index(), jax.process_count())

    app.run(main)
    """)


def _run_python(script, *args, env=None):
  env = dict(os.environ if env is None else env, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu",
             JAX_NUM_CPU_DEVICES="1")
  return subprocess.run([sys.executable, "-c", script, *args], env=env, capture_output=True,
                        text=True, timeout=120, check=False)


def test_initialize_once_in_a_subprocess():
  env = {k: v for k, v in os.environ.items() if not k.startswith(("CALM_", "SLURM_", "TPU_"))}
  r = _run_python(_INIT_SCRIPT, "--distributed=on", f"--coordinator_address=127.0.0.1:{_free_port()}",
                  "--num_processes=1", "--process_id=0", env=env)
  assert r.returncode == 0, r.stderr
  assert "RESULT True False 0 1" in r.stdout
  r = _run_python(_INIT_SCRIPT, "--distributed=off", env=env)
  assert r.returncode == 0, r.stderr
  assert "RESULT False False 0 1" in r.stdout


def test_initialize_errors_are_one_line():
  r = _run_python(_INIT_SCRIPT, "--coordinator_address=127.0.0.1:1234")
  assert r.returncode == 1
  assert r.stderr.strip().splitlines()[-1].startswith("error: --coordinator_address given but")
  assert "Traceback" not in r.stderr
  r = _run_python(_INIT_SCRIPT, "use_jax_first", "--coordinator_address=127.0.0.1:1234",
                  "--num_processes=1", "--process_id=0")
  assert r.returncode == 1
  assert "before any other JAX call" in r.stderr and "Traceback" not in r.stderr


_TWO_PROCESS_SCRIPT = textwrap.dedent("""\
    import time
    from absl import app, flags
    from calm_jax.cli import train as cli_train
    from calm_jax.parallel import distributed

    flags.DEFINE_string("config", None, "unused")
    flags.DEFINE_string("workdir", None, "unused")
    cli_train.define_distributed_flags()
    F = flags.FLAGS

    def main(argv):
      assert distributed.initialize(F.distributed, F.coordinator_address, F.num_processes,
                                    F.process_id)
      import jax, jax.numpy as jnp
      from jax.sharding import NamedSharding, PartitionSpec as P
      mesh = jax.make_mesh((jax.device_count(),), ("d",))
      x = jax.make_array_from_process_local_data(
          NamedSharding(mesh, P("d")), jnp.arange(2.0) + 10 * jax.process_index())
      total = jax.jit(jnp.sum, out_shardings=NamedSharding(mesh, P())).lower(x).compile()
      if jax.process_index() == 1:
        time.sleep(2)                       # a slower compile
      distributed.barrier("compiled")
      print("SUM", float(total(x)), jax.process_index(), jax.process_count(), jax.device_count())

    app.run(main)
    """)


def test_two_local_processes_form_one_mesh(tmp_path):
  script = tmp_path / "two.py"
  script.write_text(_TWO_PROCESS_SCRIPT)
  work = tmp_path / "w"
  r = _script("local_multiprocess.sh", "2", "unused.py", str(work),
              env=_env({"CALM_TRAIN": f"{sys.executable} {script}", "JAX_NUM_CPU_DEVICES": "2",
                        "PYTHONPATH": str(ROOT)}))
  logs = [(work / "logs" / f"process_{k}.log").read_text() for k in (0, 1)]
  assert r.returncode == 0, r.stderr + "\n".join(logs)
  for k, log in enumerate(logs):
    assert f"SUM 22.0 {k} 2 4" in log         # 0+1+10+11 over 2 processes x 2 devices


# -- launch scripts -----------------------------------------------------------------------------

def _env(extra=None, path_prefix=None):
  env = {k: v for k, v in os.environ.items() if k not in SCRIPT_VARS}
  if path_prefix:
    env["PATH"] = f"{path_prefix}{os.pathsep}{env['PATH']}"
  env.update(extra or {})
  return env


def _script(name, *args, env=None):
  return subprocess.run(["bash", str(LAUNCH / name), *args], env=env if env else _env(),
                        capture_output=True, text=True, timeout=60, check=False, cwd=ROOT)


def _stubs(tmp_path, *names, fail_on=""):
  """Stub commands that append their argv to tmp_path/calls.txt (exit 1 when argv has fail_on)."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir(exist_ok=True)
  for name in names:
    stub = bin_dir / name
    stub.write_text(textwrap.dedent(f"""\
        #!/usr/bin/env bash
        echo "{name} $*" >> {tmp_path}/calls.txt
        if [[ -n "{fail_on}" && "$*" == *"{fail_on}"* ]]; then exit 1; fi
        """))
    stub.chmod(stub.stat().st_mode | stat.S_IEXEC)
  return bin_dir


def _calls(tmp_path):
  path = tmp_path / "calls.txt"
  return path.read_text().splitlines() if path.exists() else []


ALL_SCRIPTS = ("local_multiprocess.sh", "tpu_pod.sh", "xpk.sh", "slurm.sbatch")


@pytest.mark.parametrize("name", ALL_SCRIPTS)
def test_scripts_parse_and_document_a_worked_example(name):
  assert subprocess.run(["bash", "-n", str(LAUNCH / name)], check=False).returncode == 0
  text = (LAUNCH / name).read_text()
  assert "set -euo pipefail" in text and "--dry-run" in text
  r = _script(name, "--help")
  assert r.returncode == 0 and "example" in r.stdout.lower()


@pytest.mark.parametrize("name", ALL_SCRIPTS)
def test_scripts_refuse_missing_arguments(name):
  r = _script(name, "--dry-run")
  assert r.returncode != 0
  assert "WORKDIR" in r.stderr


def test_local_multiprocess_dry_run_prints_one_command_per_process(tmp_path):
  r = _script("local_multiprocess.sh", "--dry-run", "2", "experiments/ar_baseline.py:size=tiny",
              str(tmp_path / "w"), "--config.train.steps=3",
              env=_env({"JAX_NUM_CPU_DEVICES": "2", "COORDINATOR_PORT": "4321"}))
  assert r.returncode == 0, r.stderr
  lines = [l for l in r.stdout.splitlines() if l.startswith("process ")]
  assert len(lines) == 2
  for k, line in enumerate(lines):
    assert "JAX_PLATFORMS=cpu JAX_NUM_CPU_DEVICES=2 calm-train" in line
    assert "--config experiments/ar_baseline.py:size=tiny" in line
    assert "--distributed=on --coordinator_address=127.0.0.1:4321 --num_processes=2" in line
    assert f"--process_id={k} --config.train.steps=3" in line
    assert f"logs/process_{k}.log" in line
  assert not (tmp_path / "w").exists()


def test_local_multiprocess_rejects_bad_process_count():
  r = _script("local_multiprocess.sh", "--dry-run", "two", "c.py", "w")
  assert r.returncode != 0 and "N='two'" in r.stderr


def _fake_trainer(tmp_path, body):
  fake = tmp_path / "fake_train.sh"
  fake.write_text("#!/usr/bin/env bash\n" + textwrap.dedent(body))
  fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
  return str(fake)


def test_local_multiprocess_runs_and_logs_every_process(tmp_path):
  fake = _fake_trainer(tmp_path, """\
      echo "devices=$JAX_NUM_CPU_DEVICES args=$*"
      """)
  work = tmp_path / "w"
  r = _script("local_multiprocess.sh", "3", "cfg.py", str(work), "--config.x=1",
              env=_env({"CALM_TRAIN": fake, "JAX_NUM_CPU_DEVICES": "2"}))
  assert r.returncode == 0, r.stderr
  for k in range(3):
    log = (work / "logs" / f"process_{k}.log").read_text()
    assert "devices=2" in log and f"--process_id={k} --config.x=1" in log


def test_local_multiprocess_fails_fast_and_stops_the_others(tmp_path):
  fake = _fake_trainer(tmp_path, """\
      case "$*" in *--process_id=1*) echo "process one breaks"; exit 3;; esac
      exec sleep 60
      """)
  r = _script("local_multiprocess.sh", "2", "cfg.py", str(tmp_path / "w"),
              env=_env({"CALM_TRAIN": fake}))
  assert r.returncode == 3
  assert "process 1 exited with status 3" in r.stderr and "process one breaks" in r.stderr


def test_tpu_pod_dry_run_prints_the_plan(tmp_path):
  bin_dir = _stubs(tmp_path, "gcloud")
  r = _script("tpu_pod.sh", "--dry-run", "experiments/calm.py:size=M", "/mnt/shared/calm_m",
              "--config.mesh.fsdp=8", env=_env(TPU_VARS, bin_dir))
  assert r.returncode == 0, r.stderr
  out = r.stdout
  assert ("gcloud compute tpus tpu-vm create calm-m --zone=us-east5-a --project=my-project "
          "--accelerator-type=v5p-64 --version=v2-alpha-tpuv5") in out
  assert "tpu-vm describe calm-m" in out
  assert "git -C" in out and "archive" in out and "tpu-vm scp" in out
  assert "pip install --quiet -e ." in out
  run = [l for l in out.splitlines() if l.startswith("+") and "calm-train" in l]
  assert len(run) == 1 and "--worker=all" in run[0]
  assert ("calm-train --config experiments/calm.py:size=M --workdir /mnt/shared/calm_m "
          "--distributed=on --config.mesh.fsdp=8") in run[0]
  assert "calm_logs/" in run[0] and "$(hostname).log" in run[0]
  assert _calls(tmp_path) == []               # nothing external ran


def test_tpu_pod_git_pull_variant(tmp_path):
  r = _script("tpu_pod.sh", "--dry-run", "c.py", "/w",
              env=_env(dict(TPU_VARS, REPO_URL="https://example.com/calm_jax.git", GIT_REF="v1",
                            SPOT="1", DETACH="1")))
  assert r.returncode == 0, r.stderr
  assert "git clone --quiet https://example.com/calm_jax.git" in r.stdout
  assert "checkout --quiet v1" in r.stdout and "--spot" in r.stdout
  assert "archive" not in r.stdout
  assert "nohup ~/calm_venv/bin/calm-train --config c.py --workdir /w --distributed=on" in r.stdout


def test_tpu_pod_refuses_missing_variables():
  r = _script("tpu_pod.sh", "--dry-run", "c.py", "/w",
              env=_env({k: v for k, v in TPU_VARS.items() if k not in ("ZONE", "RUNTIME_VERSION")}))
  assert r.returncode != 0
  assert "ZONE, RUNTIME_VERSION" in r.stderr and "ZONE=us-east5-a" in r.stderr


def test_tpu_pod_runs_gcloud_create_copy_install_train(tmp_path):
  bin_dir = _stubs(tmp_path, "gcloud", fail_on="describe")
  r = _script("tpu_pod.sh", "c.py", "/w", "--config.train.steps=5",
              env=_env(dict(TPU_VARS, TMPDIR=str(tmp_path), RUN_NAME="t"), bin_dir))
  assert r.returncode == 0, r.stderr
  calls = _calls(tmp_path)
  assert [c.split()[4] for c in calls] == ["describe", "create", "scp", "ssh", "ssh", "ssh"]
  assert "--worker=all" in calls[-1] and "--distributed=on --config.train.steps=5" in calls[-1]
  assert (tmp_path / "calm_jax-t.tar.gz").exists()


def test_xpk_dry_run_prints_the_plan(tmp_path):
  bin_dir = _stubs(tmp_path, "xpk")
  r = _script("xpk.sh", "--dry-run", "experiments/calm.py:size=M", "/shared/calm_m",
              "--config.mesh.fsdp=8", env=_env(XPK_VARS, bin_dir))
  assert r.returncode == 0, r.stderr
  line = next(l for l in r.stdout.splitlines() if l.startswith("+ xpk workload create"))
  for part in ("--cluster=calm-cluster", "--workload=calm-m-2x64", "--tpu-type=v5p-64",
               "--num-slices=2", "--project=my-project", "--zone=us-east5-a",
               "--base-docker-image=jax-tpu:latest", f"--script-dir={ROOT}",
               "pip install --quiet -e . && calm-train --config experiments/calm.py:size=M "
               "--workdir /shared/calm_m --distributed=on --config.mesh.dcn_data=2 "
               "--config.mesh.fsdp=8"):
    assert part in line
  assert _calls(tmp_path) == []


def test_xpk_checks_images_and_variables(tmp_path):
  r = _script("xpk.sh", "--dry-run", "c.py", "/w", env=_env({"CLUSTER": "c"}))
  assert r.returncode != 0 and "WORKLOAD, TPU_TYPE, NUM_SLICES, PROJECT, ZONE" in r.stderr
  no_image = {k: v for k, v in XPK_VARS.items() if k != "BASE_IMAGE"}
  r = _script("xpk.sh", "--dry-run", "c.py", "/w", env=_env(no_image))
  assert r.returncode != 0 and "DOCKER_IMAGE" in r.stderr and "BASE_IMAGE" in r.stderr
  r = _script("xpk.sh", "--dry-run", "c.py", "/w", env=_env(dict(XPK_VARS, DOCKER_IMAGE="i")))
  assert r.returncode != 0 and "exactly one" in r.stderr
  bin_dir = _stubs(tmp_path, "xpk")
  r = _script("xpk.sh", "c.py", "/w", env=_env(dict(no_image, NUM_SLICES="1", DOCKER_IMAGE="img"),
                                                bin_dir))
  assert r.returncode == 0, r.stderr
  (call,) = _calls(tmp_path)
  assert "--docker-image=img" in call and "dcn_data" not in call and "pip install" not in call


def test_slurm_dry_run_prints_the_plan(tmp_path):
  bin_dir = _stubs(tmp_path, "srun")
  r = _script("slurm.sbatch", "--dry-run", "experiments/calm.py:size=M", "/shared/calm_m",
              "--config.mesh.fsdp=8", env=_env(path_prefix=bin_dir))
  assert r.returncode == 0, r.stderr
  out = r.stdout
  assert "4 nodes x 8 processes" in out
  assert "NCCL_DEBUG=WARN" in out and "--xla_gpu_enable_latency_hiding_scheduler=true" in out
  assert ("+ srun --kill-on-bad-exit=1 --output=/shared/calm_m/logs/process_%t.log calm-train "
          "--config experiments/calm.py:size=M --workdir /shared/calm_m --distributed=on "
          "--config.mesh.fsdp=8") in out
  assert _calls(tmp_path) == []
  text = (LAUNCH / "slurm.sbatch").read_text()
  for line in ("#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8"):
    assert line in text


def test_slurm_refuses_outside_a_job_and_runs_srun_inside(tmp_path):
  r = _script("slurm.sbatch", "c.py", str(tmp_path / "w"))
  assert r.returncode != 0 and "SLURM_JOB_ID" in r.stderr and "sbatch" in r.stderr
  bin_dir = _stubs(tmp_path, "srun")
  r = _script("slurm.sbatch", "c.py", str(tmp_path / "w"), "--config.x=1",
              env=_env({"SLURM_JOB_ID": "9", "SLURM_JOB_NUM_NODES": "2",
                        "SLURM_NTASKS_PER_NODE": "4", "SLURM_SUBMIT_DIR": str(ROOT)}, bin_dir))
  assert r.returncode == 0, r.stderr
  assert "2 nodes x 4 processes" in r.stdout
  (call,) = _calls(tmp_path)
  assert call.startswith("srun --kill-on-bad-exit=1")
  assert call.endswith("calm-train --config c.py --workdir " + str(tmp_path / "w") +
                       " --distributed=on --config.x=1")
  assert (tmp_path / "w" / "logs").is_dir()


# -- calm-prepare across machines: launch/prepare_slurm.sbatch, launch/prepare_xpk.sh ----------

PREPARE_XPK_VARS = dict(CLUSTER="calm-cpu", WORKLOAD="pile-prepare", DEVICE_TYPE="n2-standard-32-4",
                        NUM_SHARDS="4", PROJECT="my-project", ZONE="us-east5-a",
                        DOCKER_IMAGE="calm:latest")


@pytest.mark.parametrize("name", ("prepare_slurm.sbatch", "prepare_xpk.sh"))
def test_prepare_scripts_parse_document_an_example_and_refuse_missing_arguments(name):
  assert subprocess.run(["bash", "-n", str(LAUNCH / name)], check=False).returncode == 0
  r = _script(name, "--help")
  assert r.returncode == 0 and "example" in r.stdout.lower() and "--dry-run" in r.stdout
  r = _script(name, "--dry-run", "jsonl:x", env=_env(PREPARE_XPK_VARS))
  assert r.returncode != 0 and "SPEC TOKENIZER OUTPUT" in r.stderr


def test_prepare_slurm_array_task_runs_its_shard(tmp_path):
  r = _script("prepare_slurm.sbatch", "--dry-run", "jsonl:/d/*.jsonl.zst", "/t.model", "/out",
              "--part_mb", "32")
  assert r.returncode == 0, r.stderr
  assert ("+ calm-prepare --data 'jsonl:/d/*.jsonl.zst' --tokenizer /t.model --output /out "
          "--num_shards 16 --shard_index 0 --num_workers 32 --part_mb 32") in r.stdout
  r = _script("prepare_slurm.sbatch", "jsonl:x", "/t", "/o")
  assert r.returncode != 0 and "SLURM_ARRAY_TASK_ID is not set" in r.stderr
  bin_dir = _stubs(tmp_path, "calm-prepare")
  r = _script("prepare_slurm.sbatch", "jsonl:x", "/t", "/o", env=_env(
      dict(SLURM_ARRAY_TASK_ID="2", SLURM_ARRAY_TASK_COUNT="4", SLURM_CPUS_PER_TASK="3"),
      bin_dir))
  assert r.returncode == 0, r.stderr
  assert _calls(tmp_path) == ["calm-prepare --data jsonl:x --tokenizer /t --output /o "
                              "--num_shards 4 --shard_index 2 --num_workers 3"]


def test_prepare_xpk_dry_run_prints_one_shard_per_node(tmp_path):
  bin_dir = _stubs(tmp_path, "xpk")
  r = _script("prepare_xpk.sh", "--dry-run", "jsonl:/d/*.zst", "/t", "/o", "--part_mb", "8",
              env=_env(PREPARE_XPK_VARS, bin_dir))
  assert r.returncode == 0, r.stderr
  line = next(l for l in r.stdout.splitlines() if l.startswith("+ xpk workload create"))
  for part in ("--cluster=calm-cpu", "--device-type=n2-standard-32-4", "--num-nodes=4",
               "--docker-image=calm:latest", "--max-restarts=2",
               "--num_shards 4 --shard_index \"$JOB_COMPLETION_INDEX\" --part_mb 8"):
    assert part in line
  assert _calls(tmp_path) == []
  r = _script("prepare_xpk.sh", "--dry-run", "jsonl:x", "/t", "/o", env=_env({"CLUSTER": "c"}))
  assert r.returncode != 0 and "DEVICE_TYPE, NUM_SHARDS" in r.stderr
