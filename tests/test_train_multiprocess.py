"""Multi-host training as it runs on a cluster: two `catflax.main` processes on this machine,
joined by jax.distributed (CPU, gloo collectives), each with 2 of the 4 devices and its own shard
of the data.

Not compared with a one-process run: each process reads its own records
(`process_index::process_count`) with its own shuffle and augmentation seeds
(catflax/data/pipeline.py), so one process with 4 devices sees other batches. That a sharded step
equals the single-device step on the same batch is tests/test_train_steps.py's job.
"""

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import jax
import numpy as np
import orbax.checkpoint as ocp
from PIL import Image

from catflax.data import sources
from tests.test_train_run import ROOT, TINY, env_for, flat, losses, steps

STAGES = ("1a", "1b")  # a distillation stage, then a denoising stage that merges it
DONE = re.compile(
    r"stage (\w+) done: process (\d), (\d+) steps, loss (\S+) \(first step\) -> (\S+)"
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def restore_here(path) -> dict:
    """A checkpoint saved by the two processes (4 devices), restored onto one device here."""
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    with ocp.StandardCheckpointer() as ckptr:
        saved = ckptr.metadata(path).item_metadata
        like = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=one), saved)
        return ckptr.restore(path, like)


# The XLA flags: unoptimised CPU code compiles about twice as fast; both processes use the same.
FAST_COMPILE = " --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def run_two_processes(workdir, args, timeout=600, while_running=None) -> list[tuple[int, str, str]]:
    """(returncode, stdout, stderr) of each process. Output goes to files, not pipes: a process
    blocked on a full pipe would stall the other one in its next collective. `while_running`
    gets the two Popen objects once both have started."""
    port, procs = free_port(), []
    logs = [(workdir / f"process{i}.out", workdir / f"process{i}.err") for i in range(2)]
    with contextlib.ExitStack() as files:
        for i, (out, err) in enumerate(logs):
            env = env_for({
                "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "JAX_NUM_PROCESSES": "2",
                "JAX_PROCESS_ID": str(i), "JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo",
            }, devices=2, compile_cache=False)  # fmt: skip
            env["XLA_FLAGS"] += FAST_COMPILE
            env["PYTHONFAULTHANDLER"] = "1"
            cmd = [sys.executable, "-m", "catflax.main", f"--workdir={workdir / 'run'}", *TINY,
                   *args]  # fmt: skip
            stdout = files.enter_context(open(out, "w"))
            stderr = files.enter_context(open(err, "w"))
            procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=stdout, stderr=stderr))
        deadline = time.time() + timeout
        try:
            if while_running is not None:
                while_running(procs)
            while any(p.poll() is None for p in procs) and time.time() < deadline:
                time.sleep(1)
            hung = [p for p in procs if p.poll() is None]
            for proc in hung:  # PYTHONFAULTHANDLER: SIGABRT prints where each thread sits
                proc.send_signal(signal.SIGABRT)
            if hung:
                time.sleep(5)
        finally:
            for proc in procs:
                proc.kill()
                proc.wait()
    results = [
        (p.returncode, out.read_text(), err.read_text()) for p, (out, err) in zip(procs, logs)
    ]
    if hung:
        tails = "\n".join(f"--- process {i} stderr:\n{r[2][-5000:]}" for i, r in enumerate(results))
        raise AssertionError(f"two-process run still going after {timeout} s\n{tails}")
    return results


def test_two_processes_train_two_stages_and_agree(tmp_path):
    # stage 1a also validates (reduce-on-plateau) at its last step: over both processes' shards
    plateau = ["--config.stage_1a.plateau_every=2", "--config.stage_1a.plateau_eval_batches=2"]
    results = run_two_processes(tmp_path, [*steps(2, STAGES), *plateau])
    for i, (code, _, err) in enumerate(results):
        assert code == 0, f"process {i} exited {code}:\n{err[-3000:]}"

    # Every process ran every stage, and saw the same global loss.
    done = [{m[1]: m.groups() for m in DONE.finditer(out)} for _, out, _ in results]
    assert set(done[0]) == set(done[1]) == set(STAGES)
    for stage in STAGES:
        (_, p0, n0, *loss0), (_, p1, n1, *loss1) = done[0][stage], done[1][stage]
        assert (p0, p1, n0, n1) == ("0", "1", "2", "2")
        assert loss0 == loss1, stage
        # process 0 alone writes the per-step curve, once
        logged_steps, logged = losses(tmp_path / "run", stage)
        assert logged_steps == [1, 2]
        assert [f"{x:.4g}" for x in (logged[0], logged[-1])] == loss0
        assert np.all(np.isfinite(logged))

    # One validation, written once (process 0), with the same loss on both processes.
    with open(tmp_path / "run" / "1a" / "validation.jsonl") as f:
        (validation,) = [json.loads(line) for line in f]
    assert validation["step"] == 2 and validation["val_batches"] == 2
    seen = [re.findall(r"validation loss (\S+) over", err) for _, _, err in results]
    assert seen[0] == seen[1] == [f"{validation['val_loss']:.5g}"]

    # The stage-end sample grid of the denoising stage: both processes sampled their share of
    # one batch over the mesh; process 0 wrote the grid of all four (masked | mask | sample).
    grid = np.asarray(Image.open(tmp_path / "run" / "1b" / "samples" / "2.png"))
    R = grid.shape[1] // 3
    assert grid.shape == (4 * R, 3 * R, 3) and R > 0
    assert len({grid[i * R : (i + 1) * R, :R].tobytes() for i in range(4)}) == 4  # 4 examples
    for _, _, err in results:
        assert "sample grid skipped" not in err

    # The second stage started from the first one's inpainter (on both processes).
    for _, _, err in results:
        assert "stage 1b: inpainter from stage 1a" in err

    # One final checkpoint per stage, complete, readable here (a third process, one device).
    run = tmp_path / "run"
    for stage in STAGES:
        assert os.listdir(run / stage / "final") == ["params"]
        assert os.path.exists(run / stage / "final" / "params" / "commit_success.txt")
        params = dict(flat(restore_here(run / stage / "final" / "params")))
        assert params and all(np.all(np.isfinite(v)) for v in params.values())
        assert len(os.listdir(run / stage / "tensorboard")) == 1  # process 0's event file
    with open(run / "config.json") as f:
        assert json.load(f)["stages"] == list(STAGES)
    # The generated dataset: made once (process 0), nothing half-written left behind.
    dataset = run / "data" / "synthetic_shapes" / "default"
    assert os.listdir(dataset) == ["1.0.0"]
    assert sum("downloaded and prepared" in out for _, out, _ in results) == 1


def test_synthetic_data_prepared_at_once_into_one_directory(tmp_path):
    """Two preparers of one generated dataset in one data_dir (processes on a host that does not
    see process 0's files): the one that finishes second reads the first one's copy."""
    start = threading.Barrier(2)

    def open_split(_):
        start.wait()
        return len(sources.open_tfds("synthetic_shapes/tiny", "train", str(tmp_path)))

    with ThreadPoolExecutor(2) as pool:
        assert list(pool.map(open_split, range(2))) == [64, 64]
    assert os.listdir(tmp_path / "synthetic_shapes" / "tiny") == ["1.0.0"]


def test_sigterm_to_one_process_stops_both_at_one_step(tmp_path):
    """A preemption notice reaches one worker: both save the same step and exit 0 (the one that
    got it must not stop alone: the other would wait in the next step's collectives), and the
    run resumes from that checkpoint."""
    args = [*steps(100000, ("1a",)), "--config.train.checkpoint_every=100000"]
    metrics = tmp_path / "run" / "1a" / "metrics.jsonl"

    def preempt_process_1(procs):
        deadline = time.time() + 400
        while not (metrics.exists() and metrics.stat().st_size > 0) and time.time() < deadline:
            assert all(p.poll() is None for p in procs), "a process ended before training"
            time.sleep(0.5)
        procs[1].send_signal(signal.SIGTERM)

    results = run_two_processes(tmp_path, args, while_running=preempt_process_1)
    stopped = []
    for i, (code, _, err) in enumerate(results):
        assert code == 0, f"process {i} exited {code}:\n{err[-3000:]}"
        stopped += re.findall(r"preempted \(SIGTERM\) at step (\d+); checkpoint saved", err)
    assert len(stopped) == 2 and stopped[0] == stopped[1], stopped
    saved = [int(d) for d in os.listdir(tmp_path / "run" / "1a" / "checkpoints") if d.isdigit()]
    assert saved == [int(stopped[0])]

    # The run goes on from there: two more steps on both processes.
    more = [*steps(int(stopped[0]) + 2, ("1a",))]
    results = run_two_processes(tmp_path, more)
    for i, (code, out, err) in enumerate(results):
        assert code == 0, f"process {i} exited {code}:\n{err[-3000:]}"
        assert f"resumed at step {stopped[0]}" in err and "stage 1a done" in out
