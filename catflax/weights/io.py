"""Reading and writing flat state dicts: safetensors (default), pickles only on request."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping

import numpy as np

SAFETENSORS_NAMES = ("model.safetensors", "diffusion_pytorch_model.safetensors")
SAFETENSORS_INDEX_NAMES = (
    "model.safetensors.index.json",
    "diffusion_pytorch_model.safetensors.index.json",
)
PICKLE_NAMES = ("pytorch_model.bin", "diffusion_pytorch_model.bin")
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth")
PICKLE_STARTS = tuple(bytes([0x80, protocol]) for protocol in range(2, 6))


class WeightFileError(ValueError):
    """A weight file is missing, unreadable or of a format the caller did not allow."""


def read_safetensors(path: str) -> dict[str, np.ndarray]:
    """Reads a .safetensors file into numpy arrays (bf16 via ml_dtypes), checking its size."""
    from safetensors.numpy import load_file

    _check_safetensors_header(path)
    try:
        return dict(load_file(path))
    except Exception as e:  # the library's messages do not name the file
        raise WeightFileError(f"{path}: not a readable safetensors file ({e})") from e


def _check_safetensors_header(path: str) -> None:
    """Raises a clear error for a truncated or non-safetensors file before the library does."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise WeightFileError(f"{path}: truncated safetensors file ({size} bytes, no header)")
        header_len = int.from_bytes(head, "little")
        # torch's zip container or a raw pickle (protocol 2-5); checked only once the bytes are
        # not a plausible safetensors header, which may itself begin with 0x80
        if header_len > size - 8 and head.startswith((b"PK\x03\x04", *PICKLE_STARTS)):
            raise WeightFileError(
                f"{path}: a pickled PyTorch file, not safetensors; pickles can run code and load "
                f"only with allow_pickle=True, named {'/'.join(PICKLE_SUFFIXES)}"
            )
        if header_len > size - 8:
            raise WeightFileError(
                f"{path}: truncated or not a safetensors file (header of {header_len} bytes "
                f"announced, file has {size})"
            )
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise WeightFileError(f"{path}: not a safetensors file (bad header: {e})") from e
    try:
        data_end = max(
            (int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"),
            default=0,
        )
    except (AttributeError, KeyError, IndexError, TypeError, ValueError) as e:
        raise WeightFileError(f"{path}: not a safetensors file (malformed header: {e!r})") from e
    if 8 + header_len + data_end > size:
        raise WeightFileError(
            f"{path}: truncated safetensors file: tensors need {8 + header_len + data_end} "
            f"bytes, file has {size}"
        )


def write_safetensors(path: str, tensors: Mapping[str, np.ndarray], metadata=None) -> None:
    """Writes numpy arrays (any dtype ml_dtypes knows) to a .safetensors file, atomically."""
    from safetensors.numpy import save_file

    tmp = path + ".tmp"
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, tmp, metadata=metadata)
    os.replace(tmp, path)


def cast_floats(tensors: Mapping[str, np.ndarray], dtype: str) -> dict[str, np.ndarray]:
    """Floating-point arrays cast to `dtype` ("float32", "bfloat16", ...); others as they are."""
    import ml_dtypes

    target = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(dtype)
    floating = lambda a: a.dtype.kind == "f" or a.dtype == ml_dtypes.bfloat16  # noqa: E731
    return {k: v.astype(target) if floating(v) else v for k, v in tensors.items()}


def read_pickle(path: str) -> dict[str, np.ndarray]:
    """Reads a PyTorch pickle (.bin/.ckpt) with torch's weights_only loader."""
    try:
        import torch
    except ImportError as e:
        raise WeightFileError(
            f"{path}: a pickled PyTorch file needs torch installed; convert it to safetensors "
            "or install torch"
        ) from e
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zips, objects the weights-only unpickler refuses, ...
        raise WeightFileError(f"{path}: not a readable PyTorch weights file ({e})") from e
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise WeightFileError(f"{path}: holds a {type(obj).__name__}, not a state dict")
    nested = sorted(k for k, v in obj.items() if isinstance(v, dict))
    if nested and not any(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightFileError(
            f"{path}: no tensors at the top level, only the dicts {nested[:10]}; save the state "
            "dict itself (e.g. checkpoint['model'])"
        )
    out = {}
    for k, v in obj.items():
        if isinstance(v, torch.Tensor):
            if v.dtype == torch.bfloat16:
                import ml_dtypes

                out[k] = v.float().numpy().astype(ml_dtypes.bfloat16)
            else:
                out[k] = v.numpy()
    return out


def _variant_names(variant: str | None) -> tuple[list[str], list[str], list[str]]:
    """(single safetensors, sharded indexes, pickles) file names, diffusers/transformers style:
    `model.fp16.safetensors`, `model.safetensors.index.fp16.json`, `pytorch_model.fp16.bin`."""
    if not variant:
        return list(SAFETENSORS_NAMES), list(SAFETENSORS_INDEX_NAMES), list(PICKLE_NAMES)
    add = lambda name, ext: f"{name.removesuffix(ext)}.{variant}{ext}"  # noqa: E731
    return (
        [add(n, ".safetensors") for n in SAFETENSORS_NAMES],
        [add(n, ".json") for n in SAFETENSORS_INDEX_NAMES],
        [add(n, ".bin") for n in PICKLE_NAMES],
    )


_VARIANT_FILE = re.compile(
    r"(?:model|diffusion_pytorch_model)"
    r"(?:\.(\w+)(?:-\d+-of-\d+)?\.safetensors|\.safetensors\.index\.(\w+)\.json)"
)
_VARIANT_PICKLE = re.compile(r"(?:pytorch_model|diffusion_pytorch_model)\.(\w+)\.bin")


def weight_variants(directory: str, pickles: bool = False) -> list[str]:
    """Variants (`fp16`, `ema`, ...) of which `directory` holds safetensors weights (and, with
    `pickles`, pickled ones)."""
    names = os.listdir(directory)
    found = {m.group(1) or m.group(2) for m in map(_VARIANT_FILE.fullmatch, names) if m}
    if pickles:
        found |= {m.group(1) for m in map(_VARIANT_PICKLE.fullmatch, names) if m}
    return sorted(found)


def read_weight_map(index_path: str) -> dict[str, str]:
    """A sharded checkpoint's index: {key: shard file name}."""
    try:
        with open(index_path) as f:
            weight_map = json.load(f)["weight_map"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise WeightFileError(f"{index_path}: not a sharded-checkpoint index ({e!r})") from e
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise WeightFileError(f"{index_path}: weight_map is not a {{key: file name}} mapping")
    return weight_map


def shard_of_keys(directory: str) -> dict[str, str]:
    """{key: shard file name} from the sharded-checkpoint indexes in `directory` (empty when it
    holds none): lets a load error name the shard a bad key came from. A key that several
    indexes (plain and variants) place in different shards gets "a or b"."""
    if not os.path.isdir(directory):
        return {}
    found: dict[str, set[str]] = {}
    for path in _index_files(directory):
        try:
            weight_map = read_weight_map(path)
        except (WeightFileError, OSError):
            continue  # only used to annotate an error already being raised
        for key, shard in weight_map.items():
            found.setdefault(key, set()).add(shard)
    return {key: " or ".join(sorted(shards)) for key, shards in found.items()}


def _index_files(folder: str) -> list[str]:
    """The sharded-checkpoint indexes in `folder`, plain and of every variant."""
    return [
        os.path.join(folder, name)
        for name in sorted(os.listdir(folder))
        if name in SAFETENSORS_INDEX_NAMES
        or (name.endswith(".json") and _VARIANT_FILE.fullmatch(name))
    ]


def _safetensors_files(directory: str, singles: list[str], indexes: list[str]) -> list[str]:
    for name in singles:
        if os.path.isfile(os.path.join(directory, name)):
            return [os.path.join(directory, name)]
    for name in indexes:
        index_path = os.path.join(directory, name)
        if os.path.isfile(index_path):
            shards = sorted(set(read_weight_map(index_path).values()))
            missing = [s for s in shards if not os.path.isfile(os.path.join(directory, s))]
            if missing:
                raise WeightFileError(f"{index_path}: shard files missing: {missing}")
            return [os.path.join(directory, s) for s in shards]
    return []


def _index_of(shards: list[str]) -> str | None:
    """The index file (in the shards' folder) that lists exactly these shards."""
    names = {os.path.basename(f) for f in shards}
    for path in _index_files(os.path.dirname(shards[0])):
        try:
            if set(read_weight_map(path).values()) == names:
                return path
        except WeightFileError:
            continue  # another variant's index, not this load's
    return None


def check_no_variant(path: str, variant: str | None) -> None:
    """A `variant` names files in a model directory: refused for a single file."""
    if variant:
        raise ValueError(
            f"{path}: variant={variant!r} picks files in a model directory; a single file has none"
        )


def _check_shards(shards: list[str], keys_per_shard: list[set[str]]) -> None:
    """Each key in one shard only, and in the one the index names (diffusers and transformers
    trust the index: a stale one would silently drop or misplace tensors)."""
    found_in: dict[str, str] = {}
    for shard, keys in zip(shards, keys_per_shard, strict=True):
        for key in keys:
            if key in found_in:
                raise WeightFileError(f"{shard}: key {key!r} is also in {found_in[key]}")
            found_in[key] = os.path.basename(shard)
    index = _index_of(shards)
    if index is None:
        return
    weight_map = read_weight_map(index)
    wrong = sorted(k for k, shard in weight_map.items() if found_in.get(k) != shard)
    if wrong:
        shown = ", ".join(f"{k}: {weight_map[k]} -> {found_in.get(k, 'none')}" for k in wrong[:10])
        raise WeightFileError(
            f"{index}: {len(wrong)} keys are not in the shard the index names "
            f"(key: index's shard -> shard holding it): {shown}"
        )
    unlisted = sorted(set(found_in) - set(weight_map))
    if unlisted:
        shown = ", ".join(f"{k} ({found_in[k]})" for k in unlisted[:10])
        raise WeightFileError(f"{index}: {len(unlisted)} keys of the shards are not in it: {shown}")


def find_weight_file(
    directory: str, allow_pickle: bool = False, variant: str | None = None
) -> list[str]:
    """The weight files of a model directory: one safetensors file, a sharded set, or a pickle.

    `variant` picks e.g. `diffusion_pytorch_model.fp16.safetensors`. Without one, as diffusers:
    the plain safetensors files, else a plain pickle (with allow_pickle), else the files of
    the one variant the directory has (several: an error naming them)."""
    singles, indexes, pickles = _variant_names(variant)
    found = _safetensors_files(directory, singles, indexes)
    if found:
        return found
    plain_pickle = allow_pickle and any(os.path.isfile(os.path.join(directory, p)) for p in pickles)
    if not variant and not plain_pickle:
        variants = weight_variants(directory, pickles=allow_pickle)
        if len(variants) == 1:
            return find_weight_file(directory, allow_pickle, variants[0])
        if variants:
            raise WeightFileError(
                f"{directory}: no plain weight file but the variants {variants}; pick one "
                "with variant=NAME (the models' from_pretrained, io.read_state_dict), or keep one"
            )
    for name in pickles:
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            if not allow_pickle:
                raise WeightFileError(
                    f"{path}: only a pickled PyTorch file was found; pickles can run code, so "
                    "they load only with allow_pickle=True (and torch installed)"
                )
            return [path]
    present = sorted(os.listdir(directory))
    raise WeightFileError(
        f"{directory}: no weights found (looked for {', '.join(singles)}, a sharded index "
        f"({', '.join(indexes)}), or {', '.join(pickles)}); the directory holds "
        f"{present[:20]}{' ...' if len(present) > 20 else ''}"
    )


def read_state_dict(
    path: str, allow_pickle: bool = False, variant: str | None = None
) -> dict[str, np.ndarray]:
    """Reads a model directory (its `variant` files, see find_weight_file) or a single weight
    file into a flat {name: array} dict."""
    if not os.path.exists(path):
        raise WeightFileError(f"{path}: no such file or directory")
    files = find_weight_file(path, allow_pickle, variant) if os.path.isdir(path) else [path]
    state: dict[str, np.ndarray] = {}
    contents = []
    for file in files:
        if file.endswith(PICKLE_SUFFIXES):
            if not allow_pickle:
                raise WeightFileError(
                    f"{file}: pickled checkpoints can run arbitrary code and load only with "
                    "allow_pickle=True (and torch installed); prefer a .safetensors file"
                )
            part = read_pickle(file)
        else:
            part = read_safetensors(file)
        contents.append(set(part))
        state.update(part)
    if len(files) > 1:
        _check_shards(files, contents)
    return state


def read_json(path: str | os.PathLike) -> dict:
    """Reads a JSON file (local or a URL such as gs://) with an error that names it."""
    from etils import epath

    file = epath.Path(path)
    if not file.is_file():
        raise WeightFileError(f"{path}: config file not found")
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise WeightFileError(f"{path}: invalid JSON ({e})") from e
