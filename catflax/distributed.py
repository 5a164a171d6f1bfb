"""Multi-host start-up: `initialize_distributed()` first thing in main, before any other JAX call.

Where it runs, and what it does there (first match wins; Open MPI before SLURM as in JAX, and
torchrun and MPICH before SLURM too):
- `JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES`, `JAX_PROCESS_ID` all set: those.
- a process started by Open MPI's `mpirun` (`OMPI_COMM_WORLD_SIZE`, `OMPI_COMM_WORLD_RANK`): the
  coordinator from `JAX_COORDINATOR_ADDRESS` or, as in JAX, mpirun's host.
- a torchrun-style launch (`WORLD_SIZE`, `RANK`): the coordinator from `JAX_COORDINATOR_ADDRESS`
  or `MASTER_ADDR`, on port `MASTER_PORT` + 1 (torchrun's own store holds `MASTER_PORT`).
- a process started by MPICH's or Intel MPI's `mpiexec`/`mpirun` (Hydra: `PMI_SIZE`, `PMI_RANK`):
  the coordinator from `JAX_COORDINATOR_ADDRESS` only (Hydra names no address JAX could use).
  An srun task with Slurm's own PMI-2 variables (equal to `SLURM_NTASKS`, `SLURM_PROCID`) is not.
- an srun task (`SLURM_JOB_ID`, `SLURM_NTASKS`, `SLURM_PROCID`, `SLURM_STEP_NODELIST`): the
  coordinator from `JAX_COORDINATOR_ADDRESS` or the step's first node. A job's batch shell is one
  process (it has no `SLURM_STEP_NODELIST`).
- with several processes per host under those launchers, each drives the GPU numbered by its
  local rank, unless it sees exactly one.
- a Cloud TPU VM of a multi-host slice (GKE's `TPU_WORKER_HOSTNAMES`, or the VM's metadata):
  `jax.distributed.initialize()` finds the other workers itself.
- anything else is a single process: nothing to do.
"""

from __future__ import annotations

import dataclasses
import glob
import importlib.util
import os
import re
import urllib.request
from collections.abc import Callable, Mapping

from absl import logging

# JAX's own SLURM and Open MPI detection pick a port in [61440, 65535] from the job id; so do we.
_PORT_BASE = 65535 - 2**12 + 1
_GCE_METADATA = "http://metadata.google.internal/computeMetadata/v1/instance/attributes/"


class ClusterConfigError(ValueError):
    """The environment describes a cluster inconsistently (names the variables at fault)."""


@dataclasses.dataclass(frozen=True)
class ClusterPlan:
    """How to start JAX here: `source` is "single", "env", "openmpi", "torchrun", "mpich", "slurm"
    or "tpu"."""

    source: str
    num_processes: int = 1
    process_id: int = 0
    coordinator_address: str | None = None  # None for "tpu": JAX asks the TPU metadata
    local_device_ids: tuple[int, ...] | None = None  # None: every local device

    @property
    def multi_process(self) -> bool:
        return self.num_processes > 1


@dataclasses.dataclass(frozen=True)
class ProcessInfo:
    """Where this process stands once JAX is up."""

    process_index: int
    process_count: int
    local_device_count: int
    device_count: int
    source: str


def _int_var(environ: Mapping[str, str], name: str) -> int:
    if name not in environ:
        raise ClusterConfigError(f"{name} is not set")
    value = environ[name]
    try:
        return int(value)
    except ValueError:
        raise ClusterConfigError(f"{name}={value!r} is not an integer") from None


def _count_and_id(environ: Mapping[str, str], count_var: str, id_var: str) -> tuple[int, int]:
    count, process_id = _int_var(environ, count_var), _int_var(environ, id_var)
    if not 0 <= process_id < count:
        raise ClusterConfigError(f"{id_var}={process_id} is not in [0, {count_var}={count})")
    return count, process_id


def _check_address(name: str, address: str) -> str:
    if not re.fullmatch(r"\S+:\d+", address):
        raise ClusterConfigError(f"{name}={address!r} is not HOST:PORT")
    return address


def slurm_first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: 'gpu[003-010,12],cpu1' -> 'gpu003',
    'rack[1-2]-node[01-04]' -> 'rack1-node01' (each bracket group gives its first value)."""
    text, host, i = nodelist.strip(), "", 0
    while i < len(text) and text[i] != ",":
        if text[i] == "[":
            end = text.find("]", i)
            if end < 0:
                break
            host += re.split(r"[,-]", text[i + 1 : end], maxsplit=1)[0]
            i = end + 1
        else:
            host += text[i]
            i += 1
    if not host or (i < len(text) and text[i] == "["):
        raise ClusterConfigError(f"cannot read a host name from SLURM node list {nodelist!r}")
    return host


def _tasks_per_node(environ: Mapping[str, str]) -> int:
    # '8(x2)' or '8,8' or '8': the first node's count (SLURM lays tasks out evenly here).
    for name in ("SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE", "SLURM_NTASKS_PER_NODE"):
        if match := re.match(r"\d+", environ.get(name, "")):
            return int(match.group())
    return 1


def _launcher_plan(
    environ: Mapping[str, str],
    source: str,
    count_var: str,
    id_var: str,
    coordinator: Callable[[], str],
    local_id_var: str,
    per_host: int,
) -> ClusterPlan:
    """A plan from a launcher's process count and id; JAX_NUM_PROCESSES / JAX_PROCESS_ID, where
    set, must agree with them; the coordinator is JAX_COORDINATOR_ADDRESS, else `coordinator()`."""
    count, process_id = _count_and_id(environ, count_var, id_var)
    for jax_var, var, value in (("JAX_NUM_PROCESSES", count_var, count),
                                ("JAX_PROCESS_ID", id_var, process_id)):  # fmt: skip
        if environ.get(jax_var) and _int_var(environ, jax_var) != value:
            raise ClusterConfigError(
                f"{jax_var}={environ[jax_var]} but {var}={value} ({source}): unset {jax_var}"
            )
    if count == 1:
        return ClusterPlan("single")
    address = environ.get("JAX_COORDINATOR_ADDRESS")
    address = _check_address("JAX_COORDINATOR_ADDRESS", address) if address else coordinator()
    local_device_ids = None
    visible = [d for d in environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d]
    if per_host > 1 and local_id_var in environ and len(visible) != 1:
        # Several processes share the host's GPUs: each takes one. (With one GPU per task, e.g.
        # SLURM's --gpus-per-task=1, the others are hidden already: local device 0 is its own.)
        local_device_ids = (_int_var(environ, local_id_var),)
    return ClusterPlan(source, count, process_id, address, local_device_ids)


def _port(environ: Mapping[str, str], default: int) -> str:
    return environ.get("JAX_COORDINATOR_PORT") or str(default)


def _openmpi_plan(environ: Mapping[str, str]) -> ClusterPlan | None:
    if "OMPI_COMM_WORLD_SIZE" not in environ:
        return None

    def coordinator() -> str:  # as JAX's OmpiCluster: mpirun's host, a port from its job id
        uri = environ.get("OMPI_MCA_orte_hnp_uri", "")
        match = re.search(r"tcp://(.+?)[,:]|tcp6://\[(.+?)[,\]]", uri)
        job = uri.split(".", 1)[0]
        if not match or not job.isdigit():
            raise ClusterConfigError(
                f"started by mpirun, but OMPI_MCA_orte_hnp_uri={uri!r} names no launcher "
                "address (Open MPI 5 sets none): set JAX_COORDINATOR_ADDRESS=host:port, "
                "on the host of rank 0"
            )
        host = match.group(1) or f"[{match.group(2)}]"
        return f"{host}:{_port(environ, _PORT_BASE + int(job) // 2**12 % 2**12)}"

    local = environ.get("OMPI_COMM_WORLD_LOCAL_SIZE")
    per_host = _int_var(environ, "OMPI_COMM_WORLD_LOCAL_SIZE") if local else 1
    return _launcher_plan(environ, "openmpi", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK",
                          coordinator, "OMPI_COMM_WORLD_LOCAL_RANK", per_host)  # fmt: skip


def _torchrun_plan(environ: Mapping[str, str]) -> ClusterPlan | None:
    if "WORLD_SIZE" not in environ or "RANK" not in environ:
        return None

    def coordinator() -> str:
        if not environ.get("MASTER_ADDR") or not environ.get("MASTER_PORT"):
            raise ClusterConfigError(
                "WORLD_SIZE and RANK set (torchrun-style) but not MASTER_ADDR and MASTER_PORT: "
                "set JAX_COORDINATOR_ADDRESS=host:port, on the host of RANK 0"
            )
        # torchrun's own store listens on MASTER_PORT: the JAX coordinator takes the next one
        return f"{environ['MASTER_ADDR']}:{_port(environ, _int_var(environ, 'MASTER_PORT') + 1)}"

    local = environ.get("LOCAL_WORLD_SIZE")
    per_host = _int_var(environ, "LOCAL_WORLD_SIZE") if local else 1
    return _launcher_plan(environ, "torchrun", "WORLD_SIZE", "RANK", coordinator, "LOCAL_RANK",
                          per_host)  # fmt: skip


def _is_srun_task(environ: Mapping[str, str]) -> bool:
    # SLURM_STEP_NODELIST: an srun task. The job's batch shell has the job's SLURM_NTASKS and
    # SLURM_PROCID=0 too, but is one process (JAX's SLURM detection draws the same line).
    return all(name in environ for name in ("SLURM_JOB_ID", "SLURM_NTASKS", "SLURM_PROCID",
                                            "SLURM_STEP_NODELIST"))  # fmt: skip


def _mpich_plan(environ: Mapping[str, str]) -> ClusterPlan | None:
    if "PMI_SIZE" not in environ:
        return None
    # Slurm's PMI-2 (srun --mpi=pmi2) gives each task PMI_SIZE and PMI_RANK too, equal to its
    # SLURM_NTASKS and SLURM_PROCID: an srun task, for the SLURM plan. Hydra's processes in a
    # SLURM job see instead the step that srun started Hydra's proxies in (one task per node).
    srun_ids = (environ.get("SLURM_NTASKS"), environ.get("SLURM_PROCID"))
    if _is_srun_task(environ) and (environ["PMI_SIZE"], environ.get("PMI_RANK")) == srun_ids:
        return None

    def coordinator() -> str:  # Hydra publishes no address of process 0's host
        raise ClusterConfigError(
            f"PMI_SIZE={environ['PMI_SIZE']} (started by MPICH's or Intel MPI's mpiexec), but "
            "mpiexec names no coordinator: set JAX_COORDINATOR_ADDRESS=host:port, the first "
            "process's host and a port free there"
        )

    local = environ.get("MPI_LOCALNRANKS")
    per_host = _int_var(environ, "MPI_LOCALNRANKS") if local else 1
    return _launcher_plan(environ, "mpich", "PMI_SIZE", "PMI_RANK", coordinator,
                          "MPI_LOCALRANKID", per_host)  # fmt: skip


def _slurm_plan(environ: Mapping[str, str]) -> ClusterPlan | None:
    if not _is_srun_task(environ):
        return None

    def coordinator() -> str:  # as JAX's SlurmCluster: the step's first node
        host = slurm_first_host(environ["SLURM_STEP_NODELIST"])
        return f"{host}:{_port(environ, _PORT_BASE + _int_var(environ, 'SLURM_JOB_ID') % 2**12)}"

    return _launcher_plan(environ, "slurm", "SLURM_NTASKS", "SLURM_PROCID", coordinator,
                          "SLURM_LOCALID", _tasks_per_node(environ))  # fmt: skip


def tpu_workers_from_env(environ: Mapping[str, str]) -> int | None:
    """Hosts in the TPU job from GKE-style variables (x MEGASCALE_NUM_SLICES), or None."""
    hostnames = environ.get("TPU_PROCESS_ADDRESSES") or environ.get("TPU_WORKER_HOSTNAMES")
    if not hostnames:
        return None
    slices = _int_var(environ, "MEGASCALE_NUM_SLICES") if "MEGASCALE_NUM_SLICES" in environ else 1
    return len([h for h in hostnames.split(",") if h]) * slices


def gce_tpu_workers(timeout_s: float = 10.0) -> int | None:
    """Hosts in this Cloud TPU VM slice from the VM's metadata, or None when not on a TPU VM."""
    chips = glob.glob("/dev/accel*") + glob.glob("/dev/vfio/[0-9]*")
    if not chips or importlib.util.find_spec("libtpu") is None:
        return None
    request = urllib.request.Request(
        _GCE_METADATA + "worker-network-endpoints", headers={"Metadata-Flavor": "Google"}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            endpoints = response.read().decode()
    except OSError as e:
        raise ClusterConfigError(
            f"on a TPU VM ({chips[0]}), but its metadata server did not say how many workers "
            f"the slice has: {e}"
        ) from e
    return len([w for w in endpoints.split(",") if w.strip()])


def plan_cluster(
    environ: Mapping[str, str],
    tpu_workers: Callable[[], int | None] = gce_tpu_workers,
) -> ClusterPlan:
    """Decides how to start JAX from the environment (pure apart from `tpu_workers`)."""
    jax_vars = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")
    present = [name for name in jax_vars if environ.get(name)]
    if len(present) == len(jax_vars):
        count, process_id = _count_and_id(environ, "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")
        if count == 1:
            return ClusterPlan("single")
        address = _check_address("JAX_COORDINATOR_ADDRESS", environ["JAX_COORDINATOR_ADDRESS"])
        return ClusterPlan("env", count, process_id, address)
    # Open MPI, torchrun and MPICH before SLURM: run inside a SLURM job, their processes also see
    # the variables of the srun step that started their launcher (one task per node).
    for launcher_plan in (_openmpi_plan, _torchrun_plan, _mpich_plan, _slurm_plan):
        if (plan := launcher_plan(environ)) is not None:
            return plan
    if present:
        missing = [name for name in jax_vars if name not in present]
        raise ClusterConfigError(
            f"{', '.join(present)} set but not {', '.join(missing)} (and not started by srun, "
            "mpirun, mpiexec or torchrun)"
        )
    if environ.get("SLURM_NTASKS", "1") not in ("", "1") and "SLURM_JOB_ID" in environ:
        logging.warning(
            "catflax: SLURM_NTASKS=%s, but this is the job's batch shell, not an srun task: one "
            "process (start one per task with srun, e.g. launch/gpu/slurm.sbatch)",
            environ["SLURM_NTASKS"],
        )
    workers = tpu_workers_from_env(environ)
    if workers is None:
        workers = tpu_workers()
    if workers is not None and workers > 1:
        return ClusterPlan("tpu", num_processes=workers)
    return ClusterPlan("single")


TIMEOUT_VAR = "CATFLAX_DISTRIBUTED_TIMEOUT_S"  # seconds to wait for every process to join
_PLAN_SOURCES = {
    "env": "JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID",
    "openmpi": "OMPI_COMM_WORLD_SIZE and OMPI_COMM_WORLD_RANK; the coordinator from "
    "JAX_COORDINATOR_ADDRESS or mpirun's host",
    "torchrun": "WORLD_SIZE and RANK; the coordinator from JAX_COORDINATOR_ADDRESS or "
    "MASTER_ADDR, port MASTER_PORT + 1",
    "mpich": "PMI_SIZE and PMI_RANK (MPICH or Intel MPI mpiexec); the coordinator from "
    "JAX_COORDINATOR_ADDRESS",
    "slurm": "SLURM_NTASKS and SLURM_PROCID; the coordinator from JAX_COORDINATOR_ADDRESS or the "
    "step's first node",
    "tpu": "the Cloud TPU slice's workers",
}


def initialize_distributed(
    environ: Mapping[str, str] | None = None, timeout_s: int = 300
) -> ProcessInfo:
    """Starts multi-host JAX when the environment says there are several processes; logs where
    this process stands. Call it once, before anything else touches JAX devices."""
    import jax

    environ = os.environ if environ is None else environ
    plan = plan_cluster(environ)
    timeout_s = _int_var(environ, TIMEOUT_VAR) if environ.get(TIMEOUT_VAR) else timeout_s
    if timeout_s <= 0:
        raise ClusterConfigError(f"{TIMEOUT_VAR}={timeout_s}: must be a positive number of seconds")
    if plan.multi_process and not jax.distributed.is_initialized():
        where = (
            f"{_PLAN_SOURCES[plan.source]}: process {plan.process_id} of {plan.num_processes}, "
            f"coordinator {plan.coordinator_address or 'from the TPU runtime'}"
        )
        # A coordinator that never answers makes jax abort the process (DEADLINE_EXCEEDED)
        # rather than raise: this line is what says where the address came from.
        logging.info(
            "catflax: starting JAX distributed (%s); waiting up to %d s (%s) for every process",
            where, timeout_s, TIMEOUT_VAR,
        )  # fmt: skip
        try:
            if plan.source == "tpu":
                jax.distributed.initialize(initialization_timeout=timeout_s)
            else:
                # Explicit values, with JAX's own detection off so it does not override them
                # (its SLURM path would pin every process to one GPU even with one task per node).
                jax.distributed.initialize(
                    coordinator_address=plan.coordinator_address,
                    num_processes=plan.num_processes,
                    process_id=plan.process_id,
                    local_device_ids=list(plan.local_device_ids) if plan.local_device_ids else None,
                    cluster_detection_method="deactivate",
                    initialization_timeout=timeout_s,
                )
        except Exception as e:  # jax raises its runtime's errors (DEADLINE_EXCEEDED, ...)
            raise ClusterConfigError(
                f"JAX distributed start-up failed ({where}); check that process 0 runs and "
                f"that its host and port are reachable ({TIMEOUT_VAR} sets the wait): {e}"
            ) from e
    info = ProcessInfo(
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        local_device_count=jax.local_device_count(),
        device_count=jax.device_count(),
        source=plan.source,
    )
    logging.info(
        "catflax: process %d of %d (%s), %d local of %d devices: %s",
        info.process_index,
        info.process_count,
        info.source,
        info.local_device_count,
        info.device_count,
        jax.local_devices()[0].device_kind,
    )
    return info


def is_main_process() -> bool:
    """True on process 0, the one that writes logs, summaries and sample images."""
    import jax

    return jax.process_index() == 0


def describe_mesh(mesh) -> str:
    """One line: axis sizes, devices, and how many of them each process holds."""
    import numpy as np

    devices = np.asarray(mesh.devices).ravel()
    axes = " ".join(f"{name}={size}" for name, size in mesh.shape.items())
    per_process: dict[int, int] = {}
    for device in devices:
        per_process[device.process_index] = per_process.get(device.process_index, 0) + 1
    counts = sorted(set(per_process.values()))
    layout = "/".join(str(c) for c in counts)
    return (
        f"mesh {axes}: {devices.size} x {devices[0].device_kind} devices, "
        f"{len(per_process)} process(es) with {layout} each"
    )


def log_mesh(mesh) -> None:
    """Logs `describe_mesh(mesh)` and, at debug verbosity, the device id grid."""
    import numpy as np

    logging.info("catflax: %s", describe_mesh(mesh))
    ids = np.vectorize(lambda d: d.id)(np.asarray(mesh.devices))
    logging.debug("catflax: mesh device ids %s:\n%s", tuple(mesh.axis_names), ids)
