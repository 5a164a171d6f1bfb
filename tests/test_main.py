"""The entry point: configs, overrides and errors, as a user runs it."""

import subprocess
import sys

import numpy as np
import pytest

from catflax import preprocess


def run_main(tmp_path, *args):
    cmd = [
        sys.executable,
        "-m",
        "catflax.main",
        "--config=configs/demo.py",
        f"--workdir={tmp_path}",
    ]
    return subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=300)


def test_demo_config_builds_every_part(tmp_path):
    # The full demo run (all four stages) is tests/test_train_run.py's end-to-end test.
    result = run_main(tmp_path / "wd", "--config.dry_run=True")
    assert result.returncode == 0, result.stderr
    assert "clip_text: 1,600,672 parameters" in result.stdout
    for part in ("clip_vision", "vae", "unet", "inpainter"):
        assert f"{part}: " in result.stdout


def test_unknown_config_field_is_a_clear_error(tmp_path):
    result = run_main(tmp_path, "--config.nonexistent=1")
    assert result.returncode != 0
    assert "unknown config field 'nonexistent'" in result.stderr
    assert "Traceback" not in result.stderr


def test_override_changes_the_model(tmp_path):
    result = run_main(tmp_path, "--config.dry_run=True", "--config.model.clip_text.num_layers=3",
                      "--config.sharding_rules.linear_in=fsdp")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "'num_layers': 3" in result.stdout
    assert "'linear_in': ('fsdp',)" in result.stderr  # a replicated rule can be overridden


def test_bad_training_settings_are_refused_up_front(tmp_path):
    for override, message in (
        ("--config.train.keep_checkpoints=0", "config.train.keep_checkpoints=0 must be at least 1"),
        ("--config.sharding_rules.linear_out=fsdp,nope", "['nope'] not mesh axes"),
        ("--config.train.loss_group_size=7", "config.train.loss_group_size=7 must be 0 or divide"),
        (
            "--config.train.batch_size=12",
            "(global) = 12 does not split over the mesh's 8",
        ),
        ("--config.data.eval_batch_size=4", "eval_batch_size x processes = 4 does not split"),
    ):
        result = run_main(tmp_path, override)
        assert result.returncode != 0 and "catflax: bad config" in result.stderr, result.stderr
        assert message in result.stderr and "Traceback" not in result.stderr


def test_bad_report_settings_are_refused_before_training():
    """The report runs after the last stage: a setting it cannot run with is refused first."""
    from catflax import main
    from catflax.models.cat import ConfigError
    from configs import demo

    config = demo.get_config()
    main.check_config(config)
    config.report.grid_rows = 0
    with pytest.raises(ConfigError, match=r"config.report.grid_rows=0 must be a positive"):
        main.check_config(config)
    config.report.enabled = False  # no report: its settings do not matter
    main.check_config(config)


def test_a_missing_config_file_and_bad_cluster_variables_are_one_line_errors(monkeypatch):
    """Both were tracebacks (ml_collections defers the file's error to the config's first use)."""
    from absl import flags

    from catflax import main

    argv = ["catflax", "--config=configs/nope.py", "--workdir=/tmp/x"]
    message = (r"^catflax: cannot load the config file: \[Errno 2\] No such file or directory: "
               r"'configs/nope.py'$")  # fmt: skip
    try:
        for args in (argv, [*argv, "--config.seed=3"]):  # without and with an override
            monkeypatch.setattr(sys, "argv", args)  # ml_collections reads overrides from there
            with pytest.raises(SystemExit, match=message):
                main.parse_flags(args)
    finally:
        flags.FLAGS.unparse_flags()
    for name in ("JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "SLURM_STEP_NODELIST", "WORLD_SIZE",
                 "OMPI_COMM_WORLD_SIZE"):  # fmt: skip
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "head:1234")
    message = "^catflax: JAX_COORDINATOR_ADDRESS set but not JAX_NUM_PROCESSES, JAX_PROCESS_ID"
    with pytest.raises(SystemExit, match=message):
        main.main(["catflax"])


def test_clip_normalize_uses_clip_mean_and_std():
    images = np.random.default_rng(0).integers(0, 256, (2, 4, 4, 3), dtype=np.uint8)
    mean = np.array([0.48145466, 0.4578275, 0.40821073])
    std = np.array([0.26862954, 0.26130258, 0.27577711])
    np.testing.assert_allclose(
        preprocess.clip_normalize(images), (images / 255 - mean) / std, atol=1e-6
    )
    import jax.numpy as jnp

    np.testing.assert_allclose(
        preprocess.clip_normalize(jnp.asarray(images)), (images / 255 - mean) / std, atol=1e-6
    )


def test_training_refuses_random_frozen_parts_unless_asked(tmp_path):
    """CLIP and the VAE never train: without weights for them a run would use random features
    throughout, so it stops before anything compiles (the demo opts in)."""
    result = run_main(tmp_path, "--config.weights.random_frozen=False")
    assert result.returncode != 0
    assert "bad config" in result.stderr and "weights.clip" in result.stderr
    assert "the VAE" not in result.stderr  # the demo's pooling VAE is given
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "1a").exists()


def test_misspelt_config_fields_name_the_override_and_a_suggestion(tmp_path):
    cases = {
        "--config.stage_1b.step=3": (
            "catflax: unknown config field 'step' in --config.stage_1b.step=3 "
            "(did you mean 'steps'?)"
        ),
        "--config.seedd=3": (
            "catflax: unknown config field 'seedd' in --config.seedd=3 (did you mean 'seed'?)"
        ),
        "--config.model.unett.num_heads=1": (
            "catflax: unknown config field 'unett' in --config.model.unett.num_heads=1 "
            "(did you mean 'unet'?)"
        ),
        "--config.model.unet.bogus.deep=1": (
            "catflax: unknown config field 'bogus' in --config.model.unet.bogus.deep=1"
        ),
        "--config.stages.x=1": "catflax: --config.stages.x=1: no such config field",
    }
    for override, message in cases.items():
        # A valid override beside the bad one is not blamed.
        result = run_main(tmp_path, "--config.seed=3", override)
        assert result.returncode != 0
        err = result.stderr.strip()
        assert message in err, err
        assert "\n" not in err and "\\" not in err and "Traceback" not in err, err
