"""catflax.distributed: cluster detection from fake environments; a real 2-process start-up."""

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest
from jax._src.clusters.ompi_cluster import OmpiCluster
from jax._src.clusters.slurm_cluster import SlurmCluster

from catflax import distributed
from catflax.distributed import ClusterConfigError, ClusterPlan, plan_cluster

ROOT = Path(__file__).resolve().parents[1]


def no_tpu() -> None:
    return None


def must_not_ask() -> int:
    raise AssertionError("the TPU metadata must not be consulted here")


# ---------------------------------------------------------------------------------------------
# explicit JAX_* variables


def test_explicit_jax_variables():
    env = {
        "JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234",
        "JAX_NUM_PROCESSES": "4",
        "JAX_PROCESS_ID": "2",
    }
    assert plan_cluster(env, must_not_ask) == ClusterPlan("env", 4, 2, "10.0.0.1:1234")


def test_one_process_is_single():
    env = {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "1", "JAX_PROCESS_ID": "0"}
    assert plan_cluster(env, must_not_ask) == ClusterPlan("single")
    assert plan_cluster({}, no_tpu) == ClusterPlan("single")
    assert not ClusterPlan("single").multi_process


@pytest.mark.parametrize(
    "env, message",
    [
        ({"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0"}, "not JAX_COORDINATOR_ADDRESS"),
        ({"JAX_COORDINATOR_ADDRESS": "h:1"}, "not JAX_NUM_PROCESSES, JAX_PROCESS_ID"),
        (
            {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "two", "JAX_PROCESS_ID": "0"},
            "JAX_NUM_PROCESSES='two' is not an integer",
        ),
        (
            {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "2"},
            r"JAX_PROCESS_ID=2 is not in \[0, JAX_NUM_PROCESSES=2\)",
        ),
        (
            {
                "JAX_COORDINATOR_ADDRESS": "10.0.0.1",
                "JAX_NUM_PROCESSES": "2",
                "JAX_PROCESS_ID": "0",
            },
            "JAX_COORDINATOR_ADDRESS='10.0.0.1' is not HOST:PORT",
        ),
    ],
)
def test_bad_jax_variables_are_named(env, message):
    with pytest.raises(ClusterConfigError, match=message):
        plan_cluster(env, must_not_ask)


# ---------------------------------------------------------------------------------------------
# SLURM


def slurm_env(**overrides: str) -> dict[str, str]:
    env = {
        "SLURM_JOB_ID": "1234",
        "SLURM_NTASKS": "16",
        "SLURM_PROCID": "9",
        "SLURM_LOCALID": "1",
        "SLURM_JOB_NODELIST": "gpu[003-004]",
        "SLURM_STEP_NODELIST": "gpu[003-004]",
        "SLURM_TASKS_PER_NODE": "8(x2)",
    }
    env.update(overrides)
    return env


def assert_jax_agrees(cluster, env: dict[str, str], plan: ClusterPlan, monkeypatch) -> None:
    """JAX's own detection (`cluster`, from jax._src.clusters), given the same variables, picks
    the same coordinator, count, id and local device."""
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert cluster.is_env_present()
    assert cluster.get_coordinator_address(None, None) == plan.coordinator_address
    assert cluster.get_process_count() == plan.num_processes
    assert cluster.get_process_id() == plan.process_id
    assert (cluster.get_local_process_id(),) == plan.local_device_ids


def test_slurm_one_process_per_gpu(monkeypatch):
    env = slurm_env()
    plan = plan_cluster(env, must_not_ask)
    assert plan == ClusterPlan("slurm", 16, 9, "gpu003:62674", (1,))
    # JAX's own SLURM detection, given the same variables, picks the same coordinator and ids.
    assert_jax_agrees(SlurmCluster, env, plan, monkeypatch)


def test_slurm_one_process_per_host_sees_all_gpus():
    env = slurm_env(SLURM_NTASKS="2", SLURM_PROCID="1", SLURM_LOCALID="0")
    env["SLURM_TASKS_PER_NODE"] = "1(x2)"
    assert plan_cluster(env, must_not_ask) == ClusterPlan("slurm", 2, 1, "gpu003:62674", None)


def test_slurm_gpus_per_task_leaves_the_one_visible_gpu():
    env = slurm_env(CUDA_VISIBLE_DEVICES="5")
    assert plan_cluster(env, must_not_ask).local_device_ids is None


def test_slurm_coordinator_overrides():
    env = slurm_env(JAX_COORDINATOR_ADDRESS="head:9999")
    assert plan_cluster(env, must_not_ask).coordinator_address == "head:9999"
    env = slurm_env(JAX_COORDINATOR_PORT="4242")
    assert plan_cluster(env, must_not_ask).coordinator_address == "gpu003:4242"
    # the step's first node, not the job's: `srun -N2` in a larger job may skip the job's first
    env = slurm_env(SLURM_JOB_NODELIST="gpu[001-004]", SLURM_STEP_NODELIST="gpu[003-004]")
    assert plan_cluster(env, must_not_ask).coordinator_address == "gpu003:62674"
    with pytest.raises(ClusterConfigError, match="JAX_COORDINATOR_ADDRESS='head' is not HOST"):
        plan_cluster(slurm_env(JAX_COORDINATOR_ADDRESS="head"), must_not_ask)


def test_slurm_batch_shell_is_one_process(caplog):
    """A job's batch shell (or salloc's) has the job's SLURM_NTASKS and SLURM_PROCID=0 but no
    step: `python -m catflax.main` run there is one process, as JAX's SLURM detection has it,
    not process 0 of 16 waiting for 15 that never come."""
    env = slurm_env(SLURM_PROCID="0", SLURM_LOCALID="0")
    del env["SLURM_STEP_NODELIST"]
    assert plan_cluster(env, no_tpu) == ClusterPlan("single")
    assert "batch shell, not an srun task" in caplog.text


def test_slurm_single_task_is_single():
    env = slurm_env(SLURM_NTASKS="1", SLURM_PROCID="0")
    assert plan_cluster(env, must_not_ask) == ClusterPlan("single")


def test_slurm_bad_value_is_named():
    with pytest.raises(ClusterConfigError, match="SLURM_PROCID='x'"):
        plan_cluster(slurm_env(SLURM_PROCID="x"), must_not_ask)
    with pytest.raises(
        ClusterConfigError, match=r"SLURM_PROCID=16 is not in \[0, SLURM_NTASKS=16\)"
    ):
        plan_cluster(slurm_env(SLURM_PROCID="16"), must_not_ask)


def test_a_process_count_or_id_that_contradicts_the_launcher_is_refused():
    """JAX_NUM_PROCESSES / JAX_PROCESS_ID left in the environment (e.g. exported for an earlier
    job) must agree with the launcher's: 8 of 16 tasks would otherwise form a group alone."""
    with pytest.raises(ClusterConfigError, match="JAX_NUM_PROCESSES=8 but SLURM_NTASKS=16"):
        plan_cluster(slurm_env(JAX_NUM_PROCESSES="8"), must_not_ask)
    with pytest.raises(ClusterConfigError, match="JAX_PROCESS_ID=0 but SLURM_PROCID=9"):
        plan_cluster(slurm_env(JAX_PROCESS_ID="0"), must_not_ask)
    agreeing = slurm_env(JAX_NUM_PROCESSES="16", JAX_PROCESS_ID="9")
    assert plan_cluster(agreeing, must_not_ask) == plan_cluster(slurm_env(), must_not_ask)


@pytest.mark.parametrize(
    "nodelist", ["node001", "node001,host2", "node[001-0015],host2", "node[001,007-015],host2"]
)
def test_first_host_matches_jax(monkeypatch, nodelist):
    monkeypatch.setenv("SLURM_STEP_NODELIST", nodelist)
    monkeypatch.setenv("SLURM_JOB_ID", "0")
    jax_host = SlurmCluster.get_coordinator_address(None, "1").rsplit(":", 1)[0]
    assert distributed.slurm_first_host(nodelist) == jax_host


def test_first_host_keeps_suffix():
    assert distributed.slurm_first_host("a[7-9]-ib,b1") == "a7-ib"
    assert distributed.slurm_first_host("rack[1-2]-node[01-04],x") == "rack1-node01"
    assert distributed.slurm_first_host("n[3,5-6]") == "n3"
    for bad in ("", "n[1-4"):
        with pytest.raises(ClusterConfigError, match="node list"):
            distributed.slurm_first_host(bad)


# ---------------------------------------------------------------------------------------------
# Open MPI (mpirun) and torchrun-style launchers


def ompi_env(**overrides: str) -> dict[str, str]:
    env = {  # what mpirun -np 16 -npernode 8 gives rank 9
        "OMPI_COMM_WORLD_SIZE": "16",
        "OMPI_COMM_WORLD_RANK": "9",
        "OMPI_COMM_WORLD_LOCAL_RANK": "1",
        "OMPI_COMM_WORLD_LOCAL_SIZE": "8",
        "OMPI_MCA_orte_hnp_uri": "1531576320.0;tcp://10.96.0.1,10.148.0.1:34911",
    }
    env.update(overrides)
    return env


def test_openmpi_matches_jax(monkeypatch):
    """mpirun's processes were single ones before (each training alone into one workdir)."""
    env = ompi_env()
    plan = plan_cluster(env, must_not_ask)
    assert plan == ClusterPlan("openmpi", 16, 9, "10.96.0.1:62624", (1,))
    assert_jax_agrees(OmpiCluster, env, plan, monkeypatch)
    # mpirun inside a SLURM job: the srun step that started mpirun's daemons is not the count
    in_slurm = {**slurm_env(SLURM_NTASKS="2", SLURM_PROCID="1"), **env}
    assert plan_cluster(in_slurm, must_not_ask) == plan
    # Open MPI 5 names no launcher address: JAX_COORDINATOR_ADDRESS then
    del env["OMPI_MCA_orte_hnp_uri"]
    with pytest.raises(ClusterConfigError, match="set JAX_COORDINATOR_ADDRESS=host:port"):
        plan_cluster(env, must_not_ask)
    env["JAX_COORDINATOR_ADDRESS"] = "node0:1234"
    assert plan_cluster(env, must_not_ask).coordinator_address == "node0:1234"
    one_per_host = ompi_env(OMPI_COMM_WORLD_LOCAL_SIZE="1", OMPI_COMM_WORLD_LOCAL_RANK="0")
    assert plan_cluster(one_per_host, must_not_ask).local_device_ids is None
    assert plan_cluster(ompi_env(OMPI_COMM_WORLD_SIZE="1", OMPI_COMM_WORLD_RANK="0"),
                        must_not_ask) == ClusterPlan("single")  # fmt: skip


def test_torchrun_style_variables():
    env = {"WORLD_SIZE": "8", "RANK": "5", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4",
           "MASTER_ADDR": "node0", "MASTER_PORT": "29500"}  # fmt: skip
    # torchrun's own store listens on MASTER_PORT: the coordinator takes the next port
    assert plan_cluster(env, must_not_ask) == ClusterPlan("torchrun", 8, 5, "node0:29501", (1,))
    port_set = {**env, "JAX_COORDINATOR_PORT": "7000"}
    assert plan_cluster(port_set, must_not_ask).coordinator_address == "node0:7000"
    del env["MASTER_ADDR"]
    with pytest.raises(ClusterConfigError, match="not MASTER_ADDR and MASTER_PORT"):
        plan_cluster(env, must_not_ask)
    with pytest.raises(ClusterConfigError, match=r"RANK=8 is not in \[0, WORLD_SIZE=8\)"):
        plan_cluster({**env, "RANK": "8"}, must_not_ask)


def mpich_env(**overrides: str) -> dict[str, str]:
    env = {  # what MPICH's or Intel MPI's mpiexec (Hydra) -n 16 -ppn 8 gives rank 9
        "PMI_SIZE": "16",
        "PMI_RANK": "9",
        "PMI_FD": "6",
        "MPI_LOCALRANKID": "1",
        "MPI_LOCALNRANKS": "8",
        "JAX_COORDINATOR_ADDRESS": "node0:1234",
    }
    env.update(overrides)
    return env


def test_mpich_hydra_variables():
    """mpiexec's processes were single ones before (each training alone into one workdir)."""
    expected = ClusterPlan("mpich", 16, 9, "node0:1234", (1,))
    assert plan_cluster(mpich_env(), must_not_ask) == expected
    one_per_host = mpich_env(MPI_LOCALNRANKS="1", MPI_LOCALRANKID="0")
    assert plan_cluster(one_per_host, must_not_ask).local_device_ids is None
    with pytest.raises(ClusterConfigError, match=r"PMI_RANK=16 is not in \[0, PMI_SIZE=16\)"):
        plan_cluster(mpich_env(PMI_RANK="16"), must_not_ask)
    with pytest.raises(ClusterConfigError, match="JAX_COORDINATOR_ADDRESS='node0' is not HOST"):
        plan_cluster(mpich_env(JAX_COORDINATOR_ADDRESS="node0"), must_not_ask)


def test_mpich_needs_a_coordinator_address():
    """Hydra publishes no address of process 0's host: JAX_COORDINATOR_ADDRESS must say it."""
    env = mpich_env()
    del env["JAX_COORDINATOR_ADDRESS"]
    with pytest.raises(ClusterConfigError, match="PMI_SIZE=16 .*set JAX_COORDINATOR_ADDRESS"):
        plan_cluster(env, must_not_ask)
    single = {"PMI_SIZE": "1", "PMI_RANK": "0", "MPI_LOCALRANKID": "0", "MPI_LOCALNRANKS": "1"}
    assert plan_cluster(single, must_not_ask) == ClusterPlan("single")


def test_mpich_count_or_id_that_contradicts_jax_variables_is_refused():
    with pytest.raises(ClusterConfigError, match=r"JAX_NUM_PROCESSES=8 but PMI_SIZE=16 \(mpich\)"):
        plan_cluster(mpich_env(JAX_NUM_PROCESSES="8"), must_not_ask)
    with pytest.raises(ClusterConfigError, match="JAX_PROCESS_ID=0 but PMI_RANK=9"):
        plan_cluster(mpich_env(JAX_PROCESS_ID="0"), must_not_ask)


def test_mpich_in_slurm_and_srun_with_pmi2():
    """mpiexec in a SLURM job starts its proxies with srun (one task per node): its processes
    see that step's SLURM_* too, but PMI_* say the count. An srun task with Slurm's PMI-2
    (srun --mpi=pmi2) has PMI_* equal to SLURM_NTASKS / SLURM_PROCID: the SLURM plan."""
    proxy_step = slurm_env(SLURM_NTASKS="2", SLURM_PROCID="1", SLURM_LOCALID="0",
                           SLURM_TASKS_PER_NODE="1(x2)")  # fmt: skip
    in_slurm = {**proxy_step, **mpich_env()}
    assert plan_cluster(in_slurm, must_not_ask) == ClusterPlan("mpich", 16, 9, "node0:1234", (1,))
    del in_slurm["JAX_COORDINATOR_ADDRESS"]  # not the proxy step's first node: the error
    with pytest.raises(ClusterConfigError, match="PMI_SIZE=16 .*set JAX_COORDINATOR_ADDRESS"):
        plan_cluster(in_slurm, must_not_ask)
    pmi2_task = slurm_env(PMI_SIZE="16", PMI_RANK="9", PMI_FD="7", PMI_JOBID="1234.0")
    expected = ClusterPlan("slurm", 16, 9, "gpu003:62674", (1,))
    assert plan_cluster(pmi2_task, must_not_ask) == expected


# ---------------------------------------------------------------------------------------------
# TPU


def test_tpu_from_gke_variables():
    env = {"TPU_WORKER_HOSTNAMES": "w0,w1,w2,w3", "TPU_WORKER_ID": "2"}
    assert plan_cluster(env, must_not_ask) == ClusterPlan("tpu", num_processes=4)
    env["MEGASCALE_NUM_SLICES"] = "2"
    assert plan_cluster(env, must_not_ask).num_processes == 8
    assert plan_cluster({"TPU_WORKER_HOSTNAMES": "w0"}, must_not_ask) == ClusterPlan("single")


def test_tpu_from_vm_metadata():
    assert plan_cluster({}, lambda: 4) == ClusterPlan("tpu", num_processes=4)
    assert plan_cluster({}, lambda: 1) == ClusterPlan("single")


class FakeMetadata:
    """Stands in for urlopen's answer from the TPU VM metadata server."""

    def __init__(self, body: str):
        self.body = body

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def read(self) -> bytes:
        return self.body.encode()


def test_tpu_vm_metadata_is_read_only_on_a_tpu_vm(monkeypatch):
    asked = []

    def urlopen(request, timeout):
        asked.append((request.full_url, request.get_header("Metadata-flavor"), timeout))
        return FakeMetadata("10.0.0.2,10.0.0.3,10.0.0.4,10.0.0.5")

    monkeypatch.setattr(distributed.urllib.request, "urlopen", urlopen)
    chips = {"/dev/accel*": ["/dev/accel0"], "/dev/vfio/[0-9]*": []}
    monkeypatch.setattr(distributed.glob, "glob", lambda pattern: [])
    assert distributed.gce_tpu_workers() is None  # no TPU chips: not a TPU VM
    monkeypatch.setattr(distributed.glob, "glob", lambda pattern: chips[pattern])
    monkeypatch.setattr(distributed.importlib.util, "find_spec", lambda name: None)
    assert distributed.gce_tpu_workers() is None  # chips but no libtpu: not for JAX
    assert asked == []
    monkeypatch.setattr(distributed.importlib.util, "find_spec", lambda name: object())
    assert distributed.gce_tpu_workers(timeout_s=3) == 4
    assert asked == [(distributed._GCE_METADATA + "worker-network-endpoints", "Google", 3)]

    def unreachable(request, timeout):
        raise OSError("connection refused")

    monkeypatch.setattr(distributed.urllib.request, "urlopen", unreachable)
    with pytest.raises(ClusterConfigError, match="/dev/accel0.*connection refused"):
        distributed.gce_tpu_workers()


# ---------------------------------------------------------------------------------------------
# in this (single) process


def test_initialize_single_process_and_mesh():
    info = distributed.initialize_distributed(environ={})
    assert info == distributed.ProcessInfo(0, 1, 8, 8, "single")
    assert distributed.is_main_process()
    mesh = jax.make_mesh((2, 4), ("data", "fsdp"))
    text = distributed.describe_mesh(mesh)
    assert text == "mesh data=2 fsdp=4: 8 x cpu devices, 1 process(es) with 8 each"
    distributed.log_mesh(mesh)


def test_a_coordinator_that_never_answers_is_named_before_the_wait(tmp_path):
    """jax aborts the process when the coordinator does not answer in time (it does not raise),
    so the line before the wait must say where the address came from; the wait is settable."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "JAX_NUM_PROCESSES": "2",
           "JAX_PROCESS_ID": "1", distributed.TIMEOUT_VAR: "2"}  # fmt: skip
    result = subprocess.run(
        [sys.executable, "-m", "catflax.main", "--config=configs/demo.py", f"--workdir={tmp_path}"],
        capture_output=True, text=True, timeout=120, env=env, cwd=Path(__file__).parents[1],
    )  # fmt: skip
    assert result.returncode != 0
    assert (
        "JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID: process 1 of 2, "
        f"coordinator 127.0.0.1:{port}); waiting up to 2 s" in result.stderr
    )
    assert not (tmp_path / "config.json").exists()


def test_a_tensor_axis_across_processes_is_refused():
    """8 devices on 2 hosts (4 each, in id order): tensor=2 within a host is fine; tensor=2 over
    devices 0 and 4 (of hosts 0 and 1) would give two processes one batch shard."""
    from types import SimpleNamespace

    from catflax import sharding

    devices = np.array([SimpleNamespace(id=i, process_index=i // 4) for i in range(8)])

    def mesh(grid):  # (data, fsdp, tensor) device grid
        return SimpleNamespace(devices=grid, shape=dict(zip(sharding.MESH_AXES, grid.shape)))

    sharding.check_batch_split(mesh(devices.reshape(2, 2, 2)))  # tensor pairs (0,1), (2,3), ...
    across = devices.reshape(2, 4).T.reshape(1, 4, 2)  # tensor pairs (0,4), (1,5), ...
    with pytest.raises(ValueError, match=r"split over processes \[0, 1\].*tensor axis spans"):
        sharding.check_batch_split(mesh(across))


# ---------------------------------------------------------------------------------------------
# two real processes on this machine

CHILD = textwrap.dedent(
    """
    import json, sys
    import jax
    import numpy as np
    from jax.experimental import multihost_utils
    from jax.sharding import NamedSharding, PartitionSpec as P

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    from catflax import distributed

    info = distributed.initialize_distributed(timeout_s=60)
    gathered = multihost_utils.process_allgather(np.array([10 * info.process_index + 1]))
    mesh = jax.make_mesh((jax.device_count(),), ("data",))
    local = np.arange(jax.local_device_count(), dtype=np.float32) + 100 * info.process_index
    data = jax.make_array_from_process_local_data(NamedSharding(mesh, P("data")), local)
    psum = jax.jit(
        jax.shard_map(
            lambda x: jax.lax.psum(x, "data"), mesh=mesh, in_specs=P("data"), out_specs=P()
        )
    )(data)
    from catflax.train.preemption import sum_over_processes  # e.g. records skipped per process
    skipped = sum_over_processes(3 + 4 * info.process_index)
    print("RESULT " + json.dumps({
        "skipped": skipped,
        "info": info.__dict__,
        "main": distributed.is_main_process(),
        "gathered": np.asarray(gathered).ravel().tolist(),
        "psum": np.asarray(psum).ravel().tolist(),
        "mesh": distributed.describe_mesh(mesh),
    }))
    """
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cluster_env(style: str, process_id: int, port: int) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SLURM_", "JAX_", "TPU_", "MEGASCALE_", "OMPI_", "PMI_"))
        and k not in ("WORLD_SIZE", "RANK")
    }
    env.update(XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    if style == "jax":
        env.update(
            JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
            JAX_NUM_PROCESSES="2",
            JAX_PROCESS_ID=str(process_id),
        )
    else:  # what srun gives two tasks on one node
        env.update(
            SLURM_JOB_ID="77",
            SLURM_NTASKS="2",
            SLURM_PROCID=str(process_id),
            SLURM_LOCALID=str(process_id),
            SLURM_JOB_NODELIST="localhost",
            SLURM_STEP_NODELIST="localhost",
            SLURM_TASKS_PER_NODE="2",
            JAX_COORDINATOR_PORT=str(port),
        )
    return env


@pytest.mark.parametrize("style", ["jax", "slurm"])
def test_two_processes_meet_and_reduce(tmp_path, style):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    port = free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, str(script)],
            env=cluster_env(style, i, port),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=90)[0])
    finally:
        for proc in procs:
            proc.kill()
    results = []
    for proc, out in zip(procs, outputs):
        assert proc.returncode == 0, out[-3000:]
        line = next(x for x in out.splitlines() if x.startswith("RESULT "))
        results.append(json.loads(line.removeprefix("RESULT ")))
    source = "env" if style == "jax" else "slurm"
    for i, result in enumerate(results):
        assert result["info"] == {
            "process_index": i,
            "process_count": 2,
            "local_device_count": 2,
            "device_count": 4,
            "source": source,
        }
        assert result["main"] == (i == 0)
        assert result["skipped"] == 3 + 7  # both processes get the sum
        assert result["gathered"] == [1, 11]
        # devices hold 0, 1 (process 0) and 100, 101 (process 1)
        np.testing.assert_allclose(result["psum"], [202.0])
        assert result["mesh"] == "mesh data=4: 4 x cpu devices, 2 process(es) with 2 each"
