"""The training run as users start it: resume after SIGKILL, SIGTERM, NaN (all four stages end to
end, and skipping finished stages: tests/test_demo.py)."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import orbax.checkpoint as ocp
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The demo config made smaller still: every stage a few steps of batch 4.
TINY = [
    "--config=configs/demo.py",
    "--config.train.batch_size=4",
    "--config.train.log_every=1",
    "--config.model.clip_text.num_layers=1",
    "--config.model.clip_vision.num_layers=1",
    "--config.model.inpainter.num_layers=1",
    "--config.sampling.num_steps=2",  # the stage-end sample grids
    "--config.report.enabled=False",  # the demo's report: tests/test_demo.py
]


def steps(n: int, stages=("1a", "1b", "2a", "2b")) -> list[str]:
    return [f"--config.stage_{s}.steps={n}" for s in stages] + [
        f"--config.stages=({','.join(repr(s) for s in stages)},)"
    ]


def env_for(extra=None, devices: int = 4, compile_cache: bool = True):
    # conftest.py's session-wide persistent compilation cache (JAX_COMPILATION_CACHE_*), unless
    # compile_cache is False; `extra` may name another cache directory.
    keep = ("JAX_COMPILATION_CACHE", "JAX_PERSISTENT_CACHE") if compile_cache else ()
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_") or k.startswith(keep)}
    env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu")
    env.update(extra or {})
    return env


def run_main(workdir, *args, env=None, timeout=600):
    cmd = [sys.executable, "-m", "catflax.main", f"--workdir={workdir}", *TINY, *args]
    return subprocess.run(cmd, cwd=ROOT, env=env or env_for(), capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip


def losses(workdir, stage):
    with open(os.path.join(workdir, stage, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return [r["step"] for r in rows], [r["loss"] for r in rows]


def final_params(workdir, stage):
    with ocp.StandardCheckpointer() as ckptr:
        return ckptr.restore(os.path.join(os.path.abspath(workdir), stage, "final", "params"))


def flat(tree, prefix=""):
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from flat(v, f"{prefix}/{k}")
    else:
        yield prefix, np.asarray(tree)


def test_exact_resume_after_sigkill(tmp_path):
    """A straight run and a run killed at step 4 and resumed end bitwise equal. The three runs
    share a compilation cache of their own: the first compiles, the others load its programs, as
    a user's resumed run does with a persistent cache."""
    args = [*steps(6, ("1b",)), "--config.train.checkpoint_every=3"]
    cache = {"JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jax-cache")}
    straight = run_main(tmp_path / "a", *args, env=env_for(cache))
    assert straight.returncode == 0, straight.stderr[-3000:]

    # the stage-end sample grid, in the straight run (the runs below skip it: sampling comes
    # after the last step and changes no training state)
    assert os.path.isfile(tmp_path / "a" / "1b" / "samples" / "6.png")
    args.append("--config.train.sample_every=-1")
    kill = {"CATFLAX_TEST_KILL_AT_STEP": "4"}
    killed = run_main(tmp_path / "b", *args, env=env_for({**cache, **kill}))
    assert killed.returncode == -signal.SIGKILL
    assert not os.path.isdir(tmp_path / "b" / "1b" / "final")
    resumed = run_main(tmp_path / "b", *args, env=env_for(cache))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed at step 3" in resumed.stderr

    steps_a, losses_a = losses(tmp_path / "a", "1b")
    steps_b, losses_b = losses(tmp_path / "b", "1b")
    assert steps_a == steps_b == [1, 2, 3, 4, 5, 6]
    assert losses_a == losses_b  # bitwise: same batches, same noise, same updates
    a, b = (
        dict(flat(final_params(tmp_path / "a", "1b"))),
        dict(flat(final_params(tmp_path / "b", "1b"))),
    )
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_plateau_lowers_the_rate_and_survives_a_resume(tmp_path):
    """Stage 1a validates every 2 steps; threshold 0.9 and patience 0 make every validation after
    the first a plateau. Killed after the step-4 checkpoint and resumed, steps 5-6 still run at
    the reduced rate and the step-6 validation still compares with the restored best loss.
    (It also sets a peak, so the trainer counts FLOPs and logs MFU.)"""
    args = [*steps(6, ("1a",)), "--config.train.checkpoint_every=2",
            "--config.stage_1a.plateau_every=2", "--config.stage_1a.plateau_eval_batches=1",
            "--config.stage_1a.plateau_patience=0", "--config.stage_1a.plateau_threshold=0.9",
            "--config.stage_1a.lr_fast=1e-3",
            "--config.train.peak_flops_per_device=1e11"]  # fmt: skip
    killed = run_main(tmp_path, *args, env=env_for({"CATFLAX_TEST_KILL_AT_STEP": "5"}))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    # Clipping turned on adds optimiser state the checkpoint lacks: refused, the field named
    # (not orbax's tree mismatch).
    clipped = run_main(tmp_path, *args, "--config.optimizer.grad_clip_norm=1.0")
    assert clipped.returncode != 0 and "Traceback" not in clipped.stderr
    assert "catflax: stage 1a: cannot resume: config.optimizer.grad_clip_norm was 0.0 and is " \
        "1.0 now" in clipped.stderr  # fmt: skip
    # restore_data=False: model and optimiser (the plateau state with them) restored, the data
    # stream restarted (the exact resume of the data: test_exact_resume_after_sigkill).
    resumed = run_main(tmp_path, *args, "--config.train.restore_data=False")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed at step 4" in resumed.stderr and "starts afresh" in resumed.stderr

    with open(tmp_path / "1a" / "validation.jsonl") as f:
        validations = [json.loads(line) for line in f]
    assert [v["step"] for v in validations] == [2, 4, 6]
    assert [v["lr_scale"] for v in validations] == pytest.approx([1.0, 0.1, 0.01])
    assert all(np.isfinite(v["val_loss"]) and v["val_loss"] > 0 for v in validations)
    with open(tmp_path / "1a" / "metrics.jsonl") as f:
        rows = {r["step"]: r for r in map(json.loads, f)}
    assert [rows[s]["lr_scale"] for s in range(1, 7)] == pytest.approx([1, 1, 1, 1, 0.1, 0.1])
    assert rows[5]["lr_fast"] == pytest.approx(1e-4)
    # With a peak given, every step has an MFU from the step's FLOPs (per device, counted once).
    assert all(0 < rows[s]["mfu"] < 1 for s in range(1, 7))
    assert "GFLOP/step/device" in resumed.stderr
    assert os.path.isdir(tmp_path / "1a" / "final")


def test_nan_loss_stops_with_the_step_and_keeps_the_checkpoint(tmp_path):
    blow_up = ["--config.stage_1a.lr_fast=1e30", "--config.optimizer.grad_clip_norm=0"]
    result = run_main(tmp_path, *steps(20, ("1a",)), *blow_up, "--config.train.checkpoint_every=1")
    assert result.returncode != 0
    assert "NonFiniteLossError" in result.stderr and "at step" in result.stderr
    bad_step = int(re.search(r"(?:loss|grad_norm) is \S+ at step (\d+)", result.stderr).group(1))
    saved = sorted(int(d) for d in os.listdir(tmp_path / "1a" / "checkpoints") if d.isdigit())
    assert saved and max(saved) == bad_step - 1
    assert not os.path.isdir(tmp_path / "1a" / "final")


def test_sigterm_saves_and_exits_zero(tmp_path):
    cmd = [sys.executable, "-m", "catflax.main", f"--workdir={tmp_path}", *TINY,
           *steps(100000, ("1a",)), "--config.train.checkpoint_every=100000"]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env_for(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    metrics = tmp_path / "1a" / "metrics.jsonl"
    deadline = time.time() + 300
    while not (metrics.exists() and metrics.stat().st_size > 0) and time.time() < deadline:
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    saved = [int(d) for d in os.listdir(tmp_path / "1a" / "checkpoints") if d.isdigit()]
    assert saved and 0 < max(saved) < 100000
    assert "SIGTERM" in err
    # A notice that comes after a stage's last batch (here: during its final save) stops the
    # run before the next stage starts, still with exit code 0.
    late = run_main(tmp_path / "late", *steps(2, ("1a", "1b")),
                    env=env_for({"CATFLAX_TEST_TERM_AT": "1a:final"}))  # fmt: skip
    assert late.returncode == 0, late.stderr[-3000:]
    assert "stage 1a: preempted (SIGTERM) after its last step" in late.stderr
    assert os.path.isdir(tmp_path / "late" / "1a" / "final")
    assert not os.path.exists(tmp_path / "late" / "1b")
    # One during the stage's start-up (model build, restore, compilation) reaches the first
    # batch: the step after it saves (the default handler used to end the run with 143).
    early = run_main(tmp_path / "early", *steps(4, ("1a",)),
                     "--config.train.checkpoint_every=100000",
                     env=env_for({"CATFLAX_TEST_TERM_AT": "1a:start"}))  # fmt: skip
    assert early.returncode == 0, early.stderr[-3000:]
    assert "stage 1a: preempted (SIGTERM) at step 2; checkpoint saved" in early.stderr
    assert os.listdir(tmp_path / "early" / "1a" / "checkpoints") == ["2"]


def test_a_notice_before_a_stage_stops_the_run_there(tmp_path):
    """A notice between stages (or before the first) stops the run before the stage builds
    anything, with exit code 0."""
    from catflax.train.loop import run_stage
    from catflax.train.preemption import PreemptionNotice
    from configs import demo

    before = signal.getsignal(signal.SIGTERM)
    with PreemptionNotice() as notice:
        os.kill(os.getpid(), signal.SIGTERM)
        assert notice.requested
        with pytest.raises(SystemExit) as stopped:
            run_stage(demo.get_config(), "1b", str(tmp_path), None, None, None, notice)
    assert stopped.value.code == 0
    assert os.listdir(tmp_path) == []
    assert signal.getsignal(signal.SIGTERM) is before  # the handler before it is back


def test_resume_after_an_interrupted_final_save(tmp_path):
    """Killed while saving a stage's final parameters (after its last checkpoint): the stage is
    not taken as finished; the rerun restores the last step's checkpoint and saves them again."""
    args = steps(2, ("1a",))
    first = run_main(tmp_path, *args)
    assert first.returncode == 0, first.stderr[-3000:]
    expected = dict(flat(final_params(tmp_path, "1a")))
    final = tmp_path / "1a" / "final"
    os.rename(final / "params", final / "params.orbax-checkpoint-tmp-1700000000")  # uncommitted
    again = run_main(tmp_path, *args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "stage 1a done: process 0, resumed at its last step" in again.stdout
    got = dict(flat(final_params(tmp_path, "1a")))
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        np.testing.assert_array_equal(got[name], value, err_msg=name)


def test_resume_checks_name_what_changed():
    from ml_collections import config_dict

    from catflax.train.resume_checks import ResumeError, check_resumable

    def config(**train):
        return config_dict.ConfigDict(dict(
            optimizer=dict(grad_clip_norm=0.0), stage_1a=dict(plateau_every=1000),
            train=dict(dict(ema_decay=0.0, restore_data=True), **train),
            data=dict(num_workers=2),
        ))  # fmt: skip

    saved = json.loads(config().to_json())
    check_resumable(saved, config(), "1a", ["process_0-of-1.json"])  # the same: fine
    changed = config()
    changed.stage_1a.plateau_every, changed.train.ema_decay = 0, 0.999
    changed.data.num_workers = 4
    with pytest.raises(ResumeError) as e:
        check_resumable(saved, changed, "1a", ["process_0-of-1.json"])
    for part in ("stage_1a.plateau_every was 1000 and is 0", "train.ema_decay was 0.0 and is "
                 "0.999", "data.num_workers was 2 and is 4"):  # fmt: skip
        assert part in str(e.value)
    with pytest.raises(ResumeError, match=r"saved by other processes \(process_0-of-2.json"):
        check_resumable(saved, config(), "1a", ["process_0-of-2.json", "process_1-of-2.json"])
    check_resumable(saved, config(restore_data=False), "1a", ["process_0-of-2.json"])


def test_each_stage_starts_from_the_latest_earlier_stage_that_trained_a_part(tmp_path):
    """SPEC.md §5's merge: 2a takes the inpainter of 1a and the UNet of 1b; 2b the inpainter of
    2a (not 1a) and the UNet of 1b; an unfinished stage hands nothing over."""
    import jax
    from flax import nnx

    from catflax.models.cat import CATDiffusion
    from catflax.train import loop
    from tests.tiny import TINY_CAT

    base = nnx.state(CATDiffusion(TINY_CAT, rngs=nnx.Rngs(0)), nnx.Param)

    def fresh():  # a new State (merge_earlier_stages replaces its parts) over the same arrays
        return jax.tree.map(lambda x: x, base)

    def shifted(part: str, by: float) -> nnx.State:
        return nnx.State({part: jax.tree.map(lambda x: x + by, fresh()[part])})

    workdir = str(tmp_path)
    loop.save_final(workdir, "1a", shifted("inpainter", 1.0))
    loop.save_final(workdir, "1b", shifted("unet", 2.0))

    def offsets(params, base):
        return {
            part: {float(np.round(np.mean(np.asarray(a) - np.asarray(b)), 4))
                   for a, b in zip(jax.tree.leaves(params[part]), jax.tree.leaves(base[part]))}
            for part in ("inpainter", "unet", "vae")
        }  # fmt: skip

    params = fresh()
    assert loop.merge_earlier_stages(workdir, "2a", params) == [
        "inpainter from stage 1a", "unet from stage 1b"]  # fmt: skip
    assert offsets(params, fresh()) == {"inpainter": {1.0}, "unet": {2.0}, "vae": {0.0}}
    params = fresh()
    loop.merge_earlier_stages(workdir, "2b", params)  # 2a not finished: the inpainter of 1a
    assert offsets(params, fresh())["inpainter"] == {1.0}
    loop.save_final(workdir, "2a", shifted("inpainter", 3.0))
    params = fresh()
    assert loop.merge_earlier_stages(workdir, "2b", params) == [
        "inpainter from stage 2a", "unet from stage 1b"]  # fmt: skip
    assert offsets(params, fresh()) == {"inpainter": {3.0}, "unet": {2.0}, "vae": {0.0}}
