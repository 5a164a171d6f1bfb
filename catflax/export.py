r"""Export a training run's model for inference and for other code bases.

    python -m catflax.export --workdir=RUN --out=DIR [--stage=2b] [--ema] [--dtype=fp32|bf16] \
        [--format=catflax|reference|diffusers]

Formats:
- `catflax` (default): the CATPipeline directory (see catflax/weights/pipeline_format.py), which
  `CATPipeline.from_pretrained` and `python -m catflax.inpaint --weights=DIR` load with nothing
  else from the run.
- `reference`: DIR/cat_diffusion.safetensors (or --out itself when it ends in .safetensors), one
  state dict with the official CAT-Diffusion / LDM names (`model.diffusion_model.*` with
  `attn3`/`norm4`, `fusion_model.*`, `first_stage_model.*`, `cond_stage_model.transformer.*`,
  `cond_stage_model2.encoder.*`, and the DDPM schedule buffers): the key set the reference's
  strict `model.load_state_dict(...)` expects (with its transformers 4.31, which does not save
  CLIP's position_ids); `CATPipeline.from_pretrained(file, config=...)` reads it back.
- `diffusers`: `unet/` (diffusers UNet2DConditionModel config and weights *without* the
  reference adapter, so diffusers loads it), `vae/`, `text_encoder/` and `image_encoder/`
  (transformers CLIPTextModel / CLIPVisionModel), `tokenizer/`, `scheduler/` (DDIM as SPEC.md §6),
  and beside them `unet_adapter.safetensors` (the adapter's ref_attn/ref_norm, diffusers-style
  names), `inpainter.safetensors` (fusion_model names without the prefix) and `cat_config.json`.

The model of a stage is what that stage trained (RUN/<stage>/final), each part it did not train
from the latest earlier stage that did (the run's own merge), and the frozen parts (CLIP, VAE)
from the run's config.weights or, where it names none, the run's seeded initialisation. The run's
config comes from the stage's last checkpoint, else RUN/config.json (written by catflax.main).
`--ema`: the stage's own trained parts are their EMA (needs config.train.ema_decay > 0).

The export is written beside OUT (a hidden staging folder, or file for the reference format) and
takes OUT's place only once complete, so a failed export leaves an earlier one as it was;
`check_out` lists the OUTs refused before anything loads.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import sys
from collections.abc import Sequence

import jax
import numpy as np
from absl import flags
from flax import nnx

from catflax.models.rngs import abstract_module
from catflax.staging import staged_dir, staged_file

FORMATS = ("catflax", "reference", "diffusers")
DTYPES = {"fp32": "float32", "float32": "float32", "bf16": "bfloat16", "bfloat16": "bfloat16"}
RUN_CONFIG = "config.json"  # WORKDIR/config.json, written by catflax.main at start
REFERENCE_FILE = "cat_diffusion.safetensors"
PARTS = ("clip_text", "clip_vision", "vae", "unet", "inpainter")


class ExportError(ValueError):
    """The run cannot be exported as asked (unfinished stage, no EMA, missing weights)."""


# ---------------------------------------------------------------------------------------------
# The run: config and the full parameters of one stage
# ---------------------------------------------------------------------------------------------


def finished_stages(workdir: str) -> list[str]:
    from catflax.train import loop, stages

    return [s for s in stages.STAGE_ORDER if loop.stage_finished(workdir, s)]


def _checkpoint_config(workdir: str, stage: str):
    """The config saved with a stage's latest checkpoint, or None."""
    import orbax.checkpoint as ocp

    from catflax.train import loop

    directory = loop.run_path(workdir, stage, "checkpoints")
    if not directory.is_dir():
        return None
    options = ocp.CheckpointManagerOptions(read_only=True)
    with ocp.CheckpointManager(directory, options=options) as manager:
        step = manager.latest_step()
        if step is None or not (directory / str(step) / "config").is_dir():
            return None
        args = ocp.args.Composite(config=ocp.args.JsonRestore())
        return manager.restore(step, args=args)["config"]


def read_run_config(workdir: str, stage: str | None = None):
    """The run's ConfigDict: from the stage's last checkpoint, else WORKDIR/config.json, else
    any stage's last checkpoint."""
    import ml_collections

    from catflax.train import loop, stages
    from catflax.weights import io

    found = _checkpoint_config(workdir, stage) if stage else None
    path = loop.run_path(workdir, RUN_CONFIG)
    if found is None and path.is_file():
        found = io.read_json(path)
    for other in reversed(stages.STAGE_ORDER):
        if found is None:
            found = _checkpoint_config(workdir, other)
    if found is None:
        raise ExportError(
            f"{workdir}: no run config ({RUN_CONFIG} or a checkpoint's); is it a catflax.main "
            "workdir?"
        )
    return ml_collections.ConfigDict(found)


_ABSTRACT_CACHE: dict = {}


def _abstract_params(config, mesh):
    """(graphdef, State of ShapeDtypeStructs carrying their target shardings, shardings); the
    abstract model is built once per (model config, rules, mesh) in a process."""
    from catflax import sharding as sharding_lib
    from catflax.train import loop

    key = (config.model.to_json(), str(config.sharding_rules), config.seed, id(mesh))
    if key not in _ABSTRACT_CACHE:
        _ABSTRACT_CACHE.clear()
        abstract = loop.abstract_model(config)
        shardings = sharding_lib.param_shardings(abstract, mesh, dict(config.sharding_rules))
        graphdef, params = nnx.split(abstract, nnx.Param)
        flat = [
            (
                path,
                var.replace(jax.ShapeDtypeStruct(var.shape, var.dtype, sharding=shardings[path])),
            )
            for path, var in nnx.to_flat_state(params)
        ]
        _ABSTRACT_CACHE[key] = (graphdef, flat, shardings)
    graphdef, flat, shardings = _ABSTRACT_CACHE[key]
    return (
        graphdef,
        nnx.from_flat_state([(p, v.replace(v.get_value())) for p, v in flat]),
        shardings,
    )


@functools.cache
def export_mesh():
    """One local device: every parameter lands there once, whatever the run's mesh was."""
    from catflax import sharding as sharding_lib

    return sharding_lib.make_mesh({"data": -1}, devices=jax.local_devices()[:1])


def _is_abstract(state) -> bool:
    return any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(state))


def _restore_checkpoint_item(workdir: str, stage: str, like, item: str, steps: int):
    """`item` ("params" or "ema") of the train state in the stage's last checkpoint."""
    import orbax.checkpoint as ocp

    from catflax.train import loop

    directory = loop.run_path(workdir, stage, "checkpoints")
    with ocp.CheckpointManager(
        directory, options=ocp.CheckpointManagerOptions(read_only=True)
    ) as manager:
        step = manager.latest_step() if directory.is_dir() else None
    if step != steps:
        raise ExportError(
            f"{directory}: the last checkpoint is {'missing' if step is None else f'step {step}'}"
            f", not the stage's last step {steps}, so its {item} cannot be exported"
        )

    def abstract(x):  # the EMA is kept in float32 (steps.ema_copy)
        floating = jax.dtypes.issubdtype(x.dtype, np.floating)
        dtype = np.float32 if item == "ema" and floating else x.dtype
        return jax.ShapeDtypeStruct(x.shape, dtype, sharding=x.sharding)

    target = {item: jax.tree.map(abstract, like)}
    args = ocp.args.PyTreeRestore(
        item=target,
        restore_args=jax.tree.map(lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding), target),
        partial_restore=True,
    )
    with ocp.PyTreeCheckpointer() as ckptr:
        restored = ckptr.restore(directory / str(step) / "state", args=args)[item]
    return jax.tree.map(lambda x, ref: x.astype(ref.dtype), restored, like)


def _stage_parts(workdir: str, stage: str, target: str, params, config, ema: bool):
    """The parts `stage` trained, as the export of `target` takes them."""
    from catflax.train import loop, stages

    like = nnx.State({p: params[p] for p in stages.STAGES[stage].trains})
    final_is_ema = config.train.ema_decay > 0 and config.train.get("export_ema", False)
    if stage != target or ema == final_is_ema:  # earlier stages: what the run handed over
        return loop._restore_final(workdir, stage, like)
    steps = int(config[f"stage_{stage}"].steps)
    return _restore_checkpoint_item(workdir, stage, like, "ema" if ema else "params", steps)


def resolve_run(workdir: str, stage: str | None = None, *, ema: bool = False):
    """(the stage to export: `stage`, default the last finished; the run's config), checked
    to be exportable as asked, without loading any weights."""
    from catflax.train import loop, stages

    done = finished_stages(workdir)
    if not loop.run_path(workdir).is_dir():
        raise ExportError(f"{workdir}: no such run directory")
    stage = stage or (done[-1] if done else None)
    if stage is None:
        raise ExportError(f"{workdir}: no finished stage (no <stage>/final directory)")
    if stage not in stages.STAGES:
        raise ExportError(f"unknown stage {stage!r}; stages are {list(stages.STAGE_ORDER)}")
    if stage not in done:
        raise ExportError(
            f"{workdir}: stage {stage} is not finished (no {loop.final_dir(workdir, stage)}); "
            f"finished stages: {done or 'none'}"
        )
    config = read_run_config(workdir, stage)
    if ema and config.train.ema_decay <= 0:
        raise ExportError(
            f"--ema: the run trained without EMA (config.train.ema_decay = "
            f"{config.train.ema_decay}), so it has no EMA parameters; export without --ema"
        )
    return stage, config


def load_run(workdir: str, stage: str | None = None, *, ema: bool = False, mesh=None):
    """(CATDiffusion with every parameter of `stage` (default: the last finished), the run's
    config, notes on where each part came from)."""
    stage, config = resolve_run(workdir, stage, ema=ema)
    model, notes = load_stage(workdir, stage, config, ema=ema, mesh=mesh)
    return model, config, notes


def load_stage(workdir: str, stage: str, config, *, ema: bool = False, mesh=None):
    """(CATDiffusion with every parameter of `stage`, notes on where each part came from), for
    a (stage, config) that `resolve_run` gave."""
    from catflax.train import loop, stages

    done = finished_stages(workdir)
    mesh = mesh or export_mesh()
    graphdef, params, shardings = _abstract_params(config, mesh)
    try:
        notes = loop.load_pretrained(config, params, shardings)
    except (OSError, ValueError) as e:
        raise ExportError(f"the run's pretrained weights (config.weights) did not load: {e}") from e
    restored = {}
    order = stages.STAGE_ORDER[: stages.STAGE_ORDER.index(stage) + 1]
    for part in ("inpainter", "unet"):
        source = next((s for s in reversed(order) if part in stages.STAGES[s].trains and s in done),
                      None)  # fmt: skip
        if source is None:
            continue
        if source not in restored:
            restored[source] = _stage_parts(workdir, source, stage, params, config, ema)
        params[part] = restored[source][part]
        notes.append(f"{part} from stage {source}" + (" (EMA)" if ema and source == stage else ""))
    missing = [p for p in PARTS if _is_abstract(params[p])]
    if missing:  # the run initialised these from config.seed: do exactly that again
        _, init, _ = loop.init_params(config, mesh)
        for part in missing:
            params[part] = init[part]
        notes.append(f"{', '.join(missing)}: the run's seeded initialisation (seed {config.seed})")
    return nnx.merge(graphdef, params), notes


# ---------------------------------------------------------------------------------------------
# Formats
# ---------------------------------------------------------------------------------------------


def cast_model(model, dtype: str):
    """The model with parameters (and their config's param_dtype) in `dtype`."""
    from catflax.models.cat import CATConfig, CATDiffusion

    cfg = model.config
    if all(getattr(cfg, p).param_dtype == dtype for p in PARTS):
        return model
    new = CATConfig(**{p: dataclasses.replace(getattr(cfg, p), param_dtype=dtype) for p in PARTS})
    graphdef, _ = nnx.split(abstract_module(lambda rngs: CATDiffusion(new, rngs=rngs)))
    return nnx.merge(graphdef, jax.tree.map(lambda x: x.astype(dtype), nnx.state(model)))


def write_catflax(model, out: str, *, tokenizer, resolution: int, sampling, dtype: str) -> None:
    from catflax.pipeline import CATPipeline

    pipe = CATPipeline.from_model(
        cast_model(model, dtype), tokenizer, resolution=resolution, sampling=sampling
    )
    pipe.save_pretrained(out)


def reference_path(out: str) -> str:
    """The file a reference export writes: `out` itself if it names a .safetensors file."""
    return out if out.endswith(".safetensors") else os.path.join(out, REFERENCE_FILE)


def write_reference(model, out: str, dtype: str) -> str:
    """Writes the reference state dict to reference_path(out) atomically; returns that path."""
    from catflax.weights import io, ldm

    path = reference_path(out)
    tensors = ldm.reference_state_dict(model, dtype)
    with staged_file(path) as tmp:
        io.write_safetensors(tmp, tensors, metadata={"format": "pt"})
    return path


def write_diffusers(model, out: str, *, tokenizer, resolution: int, sampling, dtype: str) -> None:
    from catflax.weights.diffusers_export import write_diffusers_dirs

    write_diffusers_dirs(model, out, tokenizer=tokenizer, resolution=resolution,
                         sampling=sampling, dtype=dtype)  # fmt: skip


def _export_marker(fmt: str) -> tuple[str, str, tuple[str, ...]]:
    """(the file that says a folder is an export of `fmt`, its "format" value, every entry
    such a folder holds) for the folder formats."""
    from catflax.weights import diffusers_export, pipeline_format

    if fmt == "catflax":
        return "config.json", pipeline_format.FORMAT, pipeline_format.ENTRIES
    return diffusers_export.CONFIG_FILE, diffusers_export.FORMAT, diffusers_export.ENTRIES


def check_out(out: str, fmt: str) -> None:
    """Refuses, before anything loads, an `out` the export would fail on or spoil: an object
    store URL (the writers write local files), a file where a folder goes, a folder where the
    reference file goes, or (catflax and diffusers formats, whose export replaces the whole
    folder) a non-empty folder that is not an earlier export of the same format (a training
    run's workdir, another model) or that holds other files beside one."""
    from catflax import paths
    from catflax.weights import io

    if paths.is_remote(out):
        raise ExportError(
            f"--out={out}: export writes local files; export to a local folder, then copy it "
            "there (gcloud storage cp -r DIR URL)"
        )
    if fmt == "reference":
        path = reference_path(out)
        if os.path.isdir(path):
            raise ExportError(f"--out={out}: {path} is a directory, not a file")
        if path == out:
            return
    if os.path.exists(out) and not os.path.isdir(out):
        raise ExportError(f"--out={out}: exists and is not a directory")
    if fmt == "reference" or not os.path.isdir(out) or not os.listdir(out):
        return  # the reference file replaces only itself; a new or empty folder takes anything
    marker, name, entries = _export_marker(fmt)
    config = os.path.join(out, marker)
    if not os.path.isfile(config):
        raise ExportError(
            f"--out={out}: not empty and not a {fmt} export (no {marker}); the export replaces "
            "the whole folder, so export to a new or empty one"
        )
    try:
        ours = io.read_json(config).get("format") == name
    except (io.WeightFileError, AttributeError):
        ours = False
    if not ours:
        what = "catflax pipeline config" if fmt == "catflax" else f"{fmt} export's config"
        raise ExportError(
            f"--out={out}: {config} exists and is not a {what} (a training run's?); export to "
            "another folder"
        )
    # NAME.tmp: what an interrupted io.write_safetensors leaves (exports before staging)
    others = sorted(n for n in os.listdir(out) if n.removesuffix(".tmp") not in entries)
    if others:
        raise ExportError(
            f"--out={out}: holds {others} beside the {fmt} export; the export replaces the "
            "whole folder, so move them out or export to another folder"
        )


def run_tokenizer(config):
    """The run's CLIP tokenizer: config.weights.tokenizer ("": built from openai-clip's BPE)."""
    from catflax.tokenizer import load_tokenizer

    try:
        return load_tokenizer(config.weights.get("tokenizer", "") or None)
    except (OSError, ValueError) as e:
        raise ExportError(f"the run's tokenizer (config.weights.tokenizer) failed: {e}") from e


def export_run(
    workdir: str, out: str, stage: str | None = None, fmt: str = "catflax", dtype: str = "fp32",
    ema: bool = False, report=print,
) -> list[str]:  # fmt: skip
    """Exports `stage` of the run in WORKDIR to `out` in format `fmt`; returns the notes. An
    earlier export at `out` is replaced only once the new one is complete."""
    if fmt not in FORMATS:
        raise ExportError(f"--format={fmt!r}: choose one of {list(FORMATS)}")
    if dtype not in DTYPES:
        raise ExportError(f"--dtype={dtype!r}: choose one of {sorted(DTYPES)}")
    dtype = DTYPES[dtype]
    check_out(out, fmt)
    stage, config = resolve_run(workdir, stage, ema=ema)
    # The tokenizer before the weights: a bad folder fails in seconds.
    tokenizer = None if fmt == "reference" else run_tokenizer(config)
    model, notes = load_stage(workdir, stage, config, ema=ema)
    for note in notes:
        report(f"export: {note}")
    if fmt == "reference":
        out = write_reference(model, out, dtype)  # one file, replaced atomically
    else:
        write = write_catflax if fmt == "catflax" else write_diffusers
        with staged_dir(out) as staging:  # `out` is replaced only by a complete export
            write(model, staging, tokenizer=tokenizer, resolution=int(config.data.resolution),
                  sampling=dict(config.sampling), dtype=dtype)  # fmt: skip
    report(f"export: wrote {out} ({fmt}, {dtype})")
    return notes


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------

_FLAGS = (  # (define, name, default, help)
    (flags.DEFINE_string, "workdir", None, "the run's directory (catflax.main --workdir)"),
    (flags.DEFINE_string, "out", None, "output directory (reference: or a .safetensors file)"),
    (flags.DEFINE_string, "stage", None, "stage to export (default: the last finished, 2b)"),
    (flags.DEFINE_bool, "ema", False, "export the EMA of the stage's trained parameters"),
    (flags.DEFINE_string, "dtype", "fp32", "parameter dtype of the export: fp32 or bf16"),
    (flags.DEFINE_string, "format", "catflax", "catflax | reference | diffusers"),
)


def _flag_values() -> flags.FlagValues:
    """The command's flags on a private FlagValues (no clash with catflax.main's)."""
    fv = flags.FlagValues()
    for define, name, default, help_ in _FLAGS:
        define(name, default, help_, flag_values=fv)
    return fv


def parse(argv: Sequence[str]) -> flags.FlagValues:
    fv = _flag_values()
    fv(["export", *argv])
    return fv


def main(argv: Sequence[str]) -> int:
    if {"-h", "--help", "--helpshort"} & set(argv):
        print(__doc__ + "\nflags:\n" + _flag_values().get_help())
        return 0
    try:
        fv = parse(argv)
        missing = [f"--{n}" for n in ("workdir", "out") if not fv[n].value]
        if missing:
            raise ExportError(f"missing {', '.join(missing)}")
        export_run(fv.workdir, fv.out, fv.stage, fv["format"].value, fv.dtype, fv.ema)
    # ValueError: ExportError and the other errors of bad input (WeightFileError, ConfigError).
    except (flags.Error, ValueError, OSError) as e:
        print(f"export: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
