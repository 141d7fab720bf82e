"""Multi-host setup: the plan from flags and environment, the one jax.distributed.initialize() of a run, barriers.

Every process of a multi-host run calls initialize() first thing in main(),
before any other JAX call. How it finds its peers:

  explicit   --coordinator_address=HOST:PORT --num_processes=N --process_id=I
             (or the env vars CALM_COORDINATOR_ADDRESS / CALM_NUM_PROCESSES /
             CALM_PROCESS_ID; a flag wins over its env var). All three or none.
             launch/local_multiprocess.sh uses this, over gloo on 127.0.0.1.
  slurm      srun with more than one task: JAX reads the SLURM env (one process
             per GPU, launch/slurm.sbatch).
  tpu        a Cloud TPU VM (chips on the PCI bus) or a GKE TPU pod / multi-slice
             (TPU_WORKER_HOSTNAMES, MEGASCALE_*): JAX asks the TPU metadata.
  ompi       mpirun with more than one rank.

--distributed=auto (the default) initializes when one of these is found and
otherwise runs as a single process; =on always initializes (JAX's own cluster
detection when nothing above is found) and =off never does. CPU collectives go
over gloo, so N local CPU processes form one global device mesh.
"""
import dataclasses
import glob
import logging
import os
import pathlib

from calm_jax import errors

MODES = ("auto", "on", "off")
ENV_COORDINATOR = "CALM_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "CALM_NUM_PROCESSES"
ENV_PROCESS_ID = "CALM_PROCESS_ID"
_ENV = {"coordinator_address": ENV_COORDINATOR, "num_processes": ENV_NUM_PROCESSES,
        "process_id": ENV_PROCESS_ID}
# PCI device ids of Cloud TPU chips (Google vendor 0x1ae0; gVNIC shares the vendor id).
_GOOGLE_PCI_VENDOR = "0x1ae0"
_TPU_PCI_DEVICES = ("0x0027", "0x0056", "0x005e", "0x0062", "0x0063", "0x006f", "0x0076")

_initialized = False
_barriers = 0


class DistributedError(errors.UserError):
  """The multi-host flags or environment are inconsistent, or the peers could not be reached."""


@dataclasses.dataclass(frozen=True)
class Plan:
  """What initialize() will do.

  initialize: whether to call jax.distributed.initialize().
  reason: one line for the log ('explicit', 'slurm', 'tpu', ...).
  kwargs: the keyword arguments for jax.distributed.initialize() (empty: let JAX detect).
  """
  initialize: bool
  reason: str
  kwargs: dict = dataclasses.field(default_factory=dict)


def _value(flag_name, flag_value, env_name, environ, parse):
  """(value, source name) of one setting: the flag if given, else its env var, else (None, None)."""
  if flag_value is not None:
    return flag_value, f"--{flag_name}"
  raw = environ.get(env_name, "").strip()
  if not raw:
    return None, None
  try:
    return parse(raw), env_name
  except ValueError:
    raise DistributedError(f"{env_name}={raw!r} is not an integer; set it to e.g. 0.") from None


def explicit_settings(coordinator_address, num_processes, process_id, environ):
  """Validated explicit settings as jax.distributed.initialize() kwargs, or None when none given."""
  values = {
      "coordinator_address": _value("coordinator_address", coordinator_address, ENV_COORDINATOR,
                                    environ, str),
      "num_processes": _value("num_processes", num_processes, ENV_NUM_PROCESSES, environ, int),
      "process_id": _value("process_id", process_id, ENV_PROCESS_ID, environ, int),
  }
  given = {k: v for k, (v, source) in values.items() if source is not None}
  if not given:
    return None
  missing = [k for k in values if k not in given]
  if missing:
    names = " and ".join(f"--{k} (or {_ENV[k]})" for k in missing)
    have = ", ".join(values[k][1] for k in given)
    raise DistributedError(
        f"{have} given but {names} missing: an explicit multi-process run needs all three of "
        "--coordinator_address, --num_processes and --process_id.")
  address, address_source = values["coordinator_address"]
  host, _, port = address.rpartition(":")
  if not host or not port.isdigit() or not 0 < int(port) < 65536:
    raise DistributedError(
        f"{address_source}={address!r} is not HOST:PORT; use e.g. 10.0.0.1:8476 (the address "
        "of process 0 and a free port).")
  count, count_source = values["num_processes"]
  if count < 1:
    raise DistributedError(f"{count_source}={count} must be at least 1.")
  index, index_source = values["process_id"]
  if not 0 <= index < count:
    raise DistributedError(
        f"{index_source}={index} is not in [0, {count}) ({count_source}={count}); number the "
        "processes 0..num_processes-1.")
  return {"coordinator_address": address, "num_processes": count, "process_id": index}


def _int_env(environ, name):
  try:
    return int(environ.get(name, ""))
  except ValueError:
    return 0


def has_tpu_chips():
  """True on a Cloud TPU VM: TPU chips on the PCI bus or /dev/accel* (no network access)."""
  if glob.glob("/dev/accel[0-9]*"):
    return True
  for vendor_path in glob.glob("/sys/bus/pci/devices/*/vendor"):
    try:
      if pathlib.Path(vendor_path).read_text().strip() != _GOOGLE_PCI_VENDOR:
        continue
      device = pathlib.Path(os.path.dirname(vendor_path), "device").read_text().strip()
    except OSError:
      continue
    if device in _TPU_PCI_DEVICES:
      return True
  return False


def detect_cluster(environ, tpu_chips=False):
  """The cluster environment JAX can bootstrap from, or None.

  Returns 'slurm' (inside srun with >1 task), 'tpu' (TPU VM or GKE TPU pod /
  multi-slice), 'ompi' (mpirun with >1 rank) or None.
  """
  if _int_env(environ, "SLURM_NTASKS") > 1 and all(
      k in environ for k in ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_PROCID",
                             "SLURM_LOCALID")):
    return "slurm"
  hosts = environ.get("TPU_PROCESS_ADDRESSES") or environ.get("TPU_WORKER_HOSTNAMES") or ""
  if ("," in hosts or environ.get("MEGASCALE_COORDINATOR_ADDRESS")
      or _int_env(environ, "MEGASCALE_NUM_SLICES") > 1 or tpu_chips):
    return "tpu"
  if "OMPI_MCA_orte_hnp_uri" in environ and _int_env(environ, "OMPI_COMM_WORLD_SIZE") > 1:
    return "ompi"
  return None


def plan(mode, coordinator_address=None, num_processes=None, process_id=None, environ=None,
         tpu_chips=None):
  """Decides whether and how to initialize, without touching JAX (a pure function for tests).

  Args:
    mode: 'auto' | 'on' | 'off' (the --distributed flag).
    coordinator_address, num_processes, process_id: the flags (None: not given).
    environ: the environment (default os.environ).
    tpu_chips: whether TPU chips are attached (default: look at the PCI bus).
  Returns:
    A Plan.
  Raises:
    DistributedError: inconsistent or invalid settings, naming the flag or env var.
  """
  if mode not in MODES:
    raise DistributedError(f"--distributed={mode!r}: use one of {', '.join(MODES)}.")
  environ = os.environ if environ is None else environ
  if mode == "off":
    flags_given = [f"--{k}" for k, v in (("coordinator_address", coordinator_address),
                                         ("num_processes", num_processes),
                                         ("process_id", process_id)) if v is not None]
    if flags_given:
      raise DistributedError(
          f"--distributed=off conflicts with {', '.join(flags_given)}; drop them or use "
          "--distributed=on.")
    return Plan(False, "--distributed=off")
  explicit = explicit_settings(coordinator_address, num_processes, process_id, environ)
  if explicit is not None:
    # Explicit values: no cluster auto-detection, so a stray SLURM/TPU env cannot override them.
    return Plan(True, "explicit", dict(explicit, cluster_detection_method="deactivate"))
  cluster = detect_cluster(environ, has_tpu_chips() if tpu_chips is None else tpu_chips)
  if cluster is not None:
    return Plan(True, cluster)
  if mode == "on":
    return Plan(True, "--distributed=on (JAX cluster detection)")
  if _int_env(environ, "SLURM_NTASKS") > 1:
    logging.warning(
        "SLURM allocation with %s tasks but not started by srun: running as one process. "
        "Launch with srun (see launch/slurm.sbatch).", environ["SLURM_NTASKS"])
  return Plan(False, "no cluster detected")


def initialize(mode=None, coordinator_address=None, num_processes=None, process_id=None):
  """Calls jax.distributed.initialize() once when the flags/environment ask for it.

  Call it first in main(), before any other JAX call. The arguments are the flags of
  cli/train.py (mode None: 'auto'); the CALM_* env vars fill what they leave out. CPU
  collectives use gloo.

  Returns:
    True if this call initialized the distributed system, False otherwise
    (single process, or already initialized by an earlier call).
  Raises:
    DistributedError: bad settings, JAX already in use, or the peers unreachable.
  """
  global _initialized
  import jax  # pylint: disable=g-import-not-at-top

  if _initialized or jax.distributed.is_initialized():
    return False
  the_plan = plan(mode or "auto", coordinator_address, num_processes, process_id)
  if not the_plan.initialize:
    logging.info("Single process (%s).", the_plan.reason)
    return False
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  logging.info("jax.distributed.initialize(%s) [%s]",
               ", ".join(f"{k}={v!r}" for k, v in the_plan.kwargs.items()), the_plan.reason)
  try:
    jax.distributed.initialize(**the_plan.kwargs)
  except RuntimeError as e:
    if "before any JAX calls" in str(e):
      raise DistributedError(
          "calm_jax.distributed.initialize() ran after JAX was already in use; call it first "
          "in main(), before any other JAX call.") from e
    raise DistributedError(f"jax.distributed.initialize() failed ({the_plan.reason}): {e}") from e
  except ValueError as e:
    raise DistributedError(
        f"jax.distributed.initialize() found no cluster to join ({e}); pass "
        "--coordinator_address, --num_processes and --process_id (or CALM_COORDINATOR_ADDRESS, "
        "CALM_NUM_PROCESSES, CALM_PROCESS_ID), or use --distributed=off.") from e
  _initialized = True
  logging.info("JAX process %d of %d: %d local / %d global devices (%s).",
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count(), jax.devices()[0].platform)
  return True


def _coordination(name):
  """(client, a fresh key for `name`) of the coordination service; (None, None) on one process.

  Every process calls the same sequence of barrier/from_primary/all_processes, so the
  counter in the key agrees across processes.
  """
  global _barriers
  import jax  # pylint: disable=g-import-not-at-top
  from jax._src import distributed as jax_distributed  # pylint: disable=g-import-not-at-top

  client = jax_distributed.global_state.client
  if jax.process_count() == 1 or client is None:
    return None, None
  _barriers += 1
  return client, f"calm_jax:{name}:{_barriers}"


def _waited(what, timeout_s, error):
  import jax  # pylint: disable=g-import-not-at-top
  return DistributedError(
      f"Process {jax.process_index()} waited {timeout_s:.0f} s for {what} ({error}); check the "
      "other processes' logs for the one that failed or hangs.")


def barrier(name, timeout_s=1800):
  """Waits until every process reaches barrier `name` (no-op with one process).

  Uses the coordination service, not a device collective: gloo creates each CPU
  collective context with a fixed 30 s deadline, so processes whose compiles
  finish far apart (a loaded machine) should meet here between compiling a step
  (jit(...).lower(...).compile()) and running it.
  """
  client, key = _coordination(name)
  if client is None:
    return
  try:
    client.wait_at_barrier(key, timeout_in_ms=int(timeout_s * 1000))
  except Exception as e:  # pylint: disable=broad-except
    raise _waited(f"the others at barrier {name!r}", timeout_s, e) from e


def from_primary(name, compute, timeout_s=1800):
  """compute() run on process 0 only; its result (a str) returned on every process.

  For a check whose verdict every process must share (e.g. a checkpoint's digest, read
  once from a shared filesystem instead of once per host). Uses the coordination
  service's key-value store, not a device collective.
  """
  import jax  # pylint: disable=g-import-not-at-top
  client, key = _coordination(name)
  if client is None:
    return compute()
  if jax.process_index() == 0:
    value = compute()
    client.key_value_set(key, value)
    return value
  try:
    return client.blocking_key_value_get(key, int(timeout_s * 1000))
  except Exception as e:  # pylint: disable=broad-except
    raise _waited(f"process 0's {name!r}", timeout_s, e) from e


def all_processes(name, value, timeout_s=1800):
  """[value of process 0, value of process 1, ...] (str values), on every process.

  An all-gather of small host values through the coordination service's key-value
  store (no device collective), e.g. how many tokens each process has left to
  evaluate. With one process: [value].
  """
  import jax  # pylint: disable=g-import-not-at-top
  client, key = _coordination(name)
  if client is None:
    return [value]
  client.key_value_set(f"{key}/{jax.process_index()}", value)
  try:
    return [client.blocking_key_value_get(f"{key}/{i}", int(timeout_s * 1000))
            for i in range(jax.process_count())]
  except Exception as e:  # pylint: disable=broad-except
    raise _waited(f"the others' {name!r}", timeout_s, e) from e
