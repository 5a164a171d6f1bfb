"""The run directory: local or on an object store (gs://), what counts as a finished stage, and
what stops a run (non-finite loss or gradient).

Object stores are stood in for by conftest's `fake_gcs` (a local folder registered with fsspec
under the gs/gcs protocols). Orbax's array data goes through TensorStore's own GCS driver, which
this cannot stand in for.
"""

import json
import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from catflax.train import loop, resume_checks
from catflax.train.metrics import MetricWriter
from catflax.train.samples import save_png


def test_run_path_keeps_urls_and_makes_local_paths_absolute(tmp_path, monkeypatch):
    assert str(loop.run_path("gs://bucket/runs/a", "1a", "final")) == "gs://bucket/runs/a/1a/final"
    monkeypatch.chdir(tmp_path)
    assert str(loop.run_path("runs/a", "1a")) == str(tmp_path / "runs" / "a" / "1a")


def test_metrics_and_images_reach_an_object_store(fake_gcs, capsys):
    stage_dir = "gs://bucket/run/1a"
    writer = MetricWriter(f"{stage_dir}/tensorboard", total_steps=10, stage="1a")
    for step in (1, 2, 3):
        writer.record(step, {"loss": 1.0 / step})
    writer.scalars(3, {"loss": 1 / 3})
    on_store = fake_gcs / "bucket" / "run" / "1a"
    assert not on_store.exists()  # written at checkpoints (flush) and at close
    writer.flush()
    lines = (on_store / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [1, 2, 3]
    events = list((on_store / "tensorboard").iterdir())
    assert len(events) == 1 and events[0].name.startswith("events.out.tfevents")
    writer.record(4, {"loss": 0.3})  # past the last checkpoint (3), written at close
    writer.close()

    # A resumed run keeps what the first one wrote up to its checkpoint (step 4 is redone);
    # its ETA counts only its own steps.
    resumed = MetricWriter(f"{stage_dir}/tensorboard", total_steps=10, stage="1a", first_step=3)
    resumed.record(4, {"loss": 0.25})
    resumed.start -= 10.0  # 10 s for its one step -> 6 steps left take 60 s
    resumed.scalars(4, {"loss": 0.25})
    assert "eta 60s" in capsys.readouterr().out
    resumed.close()
    steps = [json.loads(x)["step"] for x in (on_store / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]

    grid = np.random.default_rng(0).integers(0, 256, (8, 12, 3), dtype=np.uint8)
    save_png(f"{stage_dir}/samples/3.png", grid)
    np.testing.assert_array_equal(np.asarray(Image.open(on_store / "samples" / "3.png")), grid)


def test_a_resumed_stage_redoes_the_rows_past_its_checkpoint(tmp_path):
    """Killed at step 6 with the last checkpoint at 3: the resumed run's steps 4-6 replace the
    first run's, in metrics.jsonl and validation.jsonl (one row per step)."""
    logdir = str(tmp_path / "1a" / "tensorboard")
    first = MetricWriter(logdir, total_steps=8, stage="1a")
    for step in range(1, 7):
        first.record(step, {"loss": 1.0})
        if step % 2 == 0:
            first.record(step, {"val_loss": 1.0}, name="validation")
    first.close()
    with open(tmp_path / "1a" / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "lo')  # a write cut off by the kill: dropped, not a crash
    resumed = MetricWriter(logdir, total_steps=8, stage="1a", first_step=3)
    for step in range(4, 9):
        resumed.record(step, {"loss": 2.0})
        if step % 2 == 0:
            resumed.record(step, {"val_loss": 2.0}, name="validation")
    resumed.close()
    rows = [json.loads(x) for x in (tmp_path / "1a" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in rows] == [
        (s, 1.0 if s <= 3 else 2.0) for s in range(1, 9)
    ]
    rows = [json.loads(x) for x in (tmp_path / "1a" / "validation.jsonl").read_text().splitlines()]
    assert [(r["step"], r["val_loss"]) for r in rows] == [(2, 1.0), (4, 2.0), (6, 2.0), (8, 2.0)]


def test_a_stage_counts_as_finished_only_once_its_final_save_committed(tmp_path):
    workdir = str(tmp_path)
    params = nnx.State({"inpainter": {"w": jnp.arange(6.0).reshape(2, 3)}})
    assert not loop.stage_finished(workdir, "1a")
    loop.save_final(workdir, "1a", params)
    assert loop.stage_finished(workdir, "1a")
    # An interrupted save (killed mid-write) leaves orbax's uncommitted temporary folder.
    final = tmp_path / "1a" / "final"
    os.rename(final / "params", final / "params.orbax-checkpoint-tmp-1234567")
    assert os.path.isdir(final) and not loop.stage_finished(workdir, "1a")
    loop.save_final(workdir, "1a", params)  # the rerun saves again
    assert loop.stage_finished(workdir, "1a")
    restored = loop._restore_final(workdir, "1a", params)
    np.testing.assert_array_equal(restored["inpainter"]["w"], params["inpainter"]["w"])


@pytest.mark.parametrize("metric", ["loss", "grad_norm"])
def test_a_non_finite_loss_or_gradient_stops_with_the_step(metric):
    metrics = {"loss": jnp.float32(0.5), "grad_norm": jnp.float32(2.0)}
    metrics[metric] = jnp.float32(jnp.nan if metric == "loss" else jnp.inf)
    with pytest.raises(loop.NonFiniteLossError, match=f"{metric} is (nan|inf) at step 7"):
        loop._report((7, metrics, 0), None, None, None, 16, 0.0, 0.0)


def test_generated_data_of_a_remote_run_stays_on_local_disk(tmp_path, monkeypatch):
    """TFDS writes ArrayRecords to local files only: a gs:// run generates on each host's disk."""
    from catflax.main import generated_data_dir

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for url in ("gs://bucket/run", "s3://bucket/run"):  # any object store (catflax.paths)
        assert generated_data_dir(url) == str(tmp_path / "home" / "catflax-data")
    assert generated_data_dir(str(tmp_path / "run")) == str(tmp_path / "run" / "data")


def test_synthetic_data_generated_into_an_object_store_is_built_locally_and_copied(fake_gcs):
    import tensorflow_datasets as tfds

    from catflax.data import builders, sources

    del builders  # registers the builders
    sources._prepare("synthetic_shapes/tiny", "gs://bucket/data")
    assert tfds.builder("synthetic_shapes/tiny", data_dir="gs://bucket/data").is_prepared()
    built = fake_gcs / "bucket" / "data" / "synthetic_shapes" / "tiny"
    assert any(p.name.startswith("synthetic_shapes-train.array_record") for p in built.rglob("*"))


def test_mfu_divides_per_device_flops_by_one_device_peak(tmp_path, monkeypatch):
    """The step's FLOPs are per device (model_flops_per_device): MFU is flops / time / peak."""
    from configs import demo

    config = demo.get_config()
    config.train.peak_flops_per_device = 1e12
    writer = MetricWriter(str(tmp_path / "tensorboard"), total_steps=10, stage="2b")
    metrics = {"loss": jnp.float32(0.5), "grad_norm": jnp.float32(2.0)}
    # loop's own `time` only: freezing time.time itself stalls tensorboardX's writer thread.
    monkeypatch.setattr(loop, "time", types.SimpleNamespace(time=lambda: 102.0))
    values = loop._report((3, metrics, 0), writer, config, config.stage_2b, 16, 5e11, 100.0)
    writer.close()
    assert values["step_time_s"] == 2.0 and values["mfu"] == pytest.approx(0.25)


def test_peak_flops_come_from_the_config_or_the_device_kind():
    from catflax.train.metrics import peak_flops_per_device

    assert peak_flops_per_device(3e12, "NVIDIA H100 80GB HBM3") == 3e12
    assert peak_flops_per_device(0, "NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops_per_device(0, "NVIDIA H100 PCIe") == 756e12
    assert peak_flops_per_device(0, "TPU v5 lite") == 197e12
    assert peak_flops_per_device(0, "TPU v5") == 459e12
    assert peak_flops_per_device(0, "cpu") == 0.0


def test_a_resume_with_a_changed_data_stream_is_warned_about(tmp_path, caplog):
    """The config saved with a checkpoint comes back; a resume that changes what the data stream
    depends on (seed, batch size, mixture, resolution) is logged, field by field."""
    from catflax.train.checkpoint import Checkpointer
    from configs import demo

    config = demo.get_config()
    ckpt = Checkpointer(str(tmp_path / "checkpoints"), async_save=False)
    ckpt.save(3, {"w": jnp.zeros(2)}, None, config)
    saved = ckpt.saved_config(3)
    ckpt.close()
    assert saved["train"]["batch_size"] == config.train.batch_size
    changed = config.copy_and_resolve_references()
    changed.seed, changed.train.batch_size = 7, 2 * config.train.batch_size
    with caplog.at_level("WARNING"):
        resume_checks.warn_data_changes(saved, config, "1b")
        assert not caplog.records
        resume_checks.warn_data_changes(saved, changed, "1b")
    assert [r.getMessage().split(" was ")[0] for r in caplog.records] == [
        "stage 1b: config.seed", "stage 1b: config.train.batch_size"
    ]  # fmt: skip


def test_a_checkpoint_restores_into_an_abstract_state(tmp_path):
    """A resume frees the fresh state and restores into its shapes, dtypes and shardings only
    (no second train state on the devices): sharded arrays and typed PRNG keys come back."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from catflax.train.checkpoint import Checkpointer, abstract_state

    mesh = jax.make_mesh((8,), ("fsdp",))
    w = jax.device_put(jnp.arange(16.0).reshape(8, 2), NamedSharding(mesh, P("fsdp")))
    state = {"w": w, "rng": jax.random.key(3), "step": jnp.int32(5)}
    ckpt = Checkpointer(str(tmp_path / "checkpoints"), async_save=False)
    ckpt.save(5, state)
    like = abstract_state(state)
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(like))
    step, restored = ckpt.restore(like)
    ckpt.close()
    assert step == 5 and restored["w"].sharding == w.sharding
    np.testing.assert_array_equal(restored["w"], w)
    assert jax.dtypes.issubdtype(restored["rng"].dtype, jax.dtypes.prng_key)
    np.testing.assert_array_equal(jax.random.key_data(restored["rng"]),
                                  jax.random.key_data(state["rng"]))  # fmt: skip
    assert int(restored["step"]) == 5


def test_a_stage_whose_earlier_stages_did_not_run_is_warned_about(tmp_path, caplog):
    """Stage 2a alone: its inpainter should start from 1a's and its frozen UNet be 1b's."""
    from configs import demo

    config = demo.get_config()
    with caplog.at_level("WARNING"):
        resume_checks.warn_missing_merges(config, str(tmp_path), "2a", [])
        messages = [r.getMessage() for r in caplog.records]
        caplog.clear()
        resume_checks.warn_missing_merges(config, str(tmp_path), "2a", ["inpainter from stage 1a",
                                                                 "unet from stage 1b"])  # fmt: skip
        resume_checks.warn_missing_merges(config, str(tmp_path), "1b", [])  # nothing before it
        config.weights.cat = "/some/official/checkpoint"  # the parts come from there
        resume_checks.warn_missing_merges(config, str(tmp_path), "2b", [])
        assert not caplog.records
    assert len(messages) == 2
    assert messages[0].startswith("stage 2a: the inpainter should come from stage 1a")
    assert messages[1].startswith("stage 2a: the unet should come from stage 1b")
    assert messages[1].endswith("frozen in this stage")
