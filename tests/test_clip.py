"""CLIP towers: parity with transformers (PyTorch) through our own safetensors loader."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from catflax.models import clip
from catflax.weights.convert import WeightLoadError
from catflax.weights.io import WeightFileError, read_state_dict, write_safetensors
from tests.torch_utils import perturb_vectors

TINY_CONFIGS = {
    "quick_gelu": dict(
        text=dict(vocab_size=1000, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=77, hidden_act="quick_gelu",
                  eos_token_id=999, bos_token_id=998, pad_token_id=999),
        vision=dict(image_size=32, patch_size=8, hidden_size=48, intermediate_size=64,
                    num_hidden_layers=3, num_attention_heads=4, hidden_act="quick_gelu"),
    ),
    "gelu": dict(
        text=dict(vocab_size=500, hidden_size=48, intermediate_size=96, num_hidden_layers=3,
                  num_attention_heads=3, max_position_embeddings=20, hidden_act="gelu",
                  eos_token_id=499, bos_token_id=498, pad_token_id=1, layer_norm_eps=1e-6),
        vision=dict(image_size=28, patch_size=7, hidden_size=32, intermediate_size=40,
                    num_hidden_layers=2, num_attention_heads=2, hidden_act="gelu"),
    ),
}  # fmt: skip


def save_tiny_clip(tmp_path, name: str, seed: int = 0):
    torch.manual_seed(seed)
    cfg = TINY_CONFIGS[name]
    config = transformers.CLIPConfig(text_config=cfg["text"], vision_config=cfg["vision"])
    model = transformers.CLIPModel(config).eval()
    perturb_vectors(model)  # every LayerNorm and bias non-trivial
    path = str(tmp_path / f"clip_{name}")
    model.save_pretrained(path)
    return model, path, cfg


def random_ids(rng, batch, length, vocab, eos):
    ids = rng.integers(0, vocab - 2, size=(batch, length))
    for b in range(batch):
        end = rng.integers(2, length)
        ids[b, end] = eos
        ids[b, end + 1 :] = eos  # padded with EOS, as Stable Diffusion's tokenizer does
    return ids


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_text_and_vision_match_transformers(tmp_path, name):
    torch_model, path, cfg = save_tiny_clip(tmp_path, name)
    rng = np.random.default_rng(0)
    text_cfg, vision_cfg = cfg["text"], cfg["vision"]

    ids = random_ids(rng, 3, min(16, text_cfg["max_position_embeddings"]),
                     text_cfg["vocab_size"], text_cfg["eos_token_id"])  # fmt: skip
    with torch.no_grad():
        ref = torch_model.text_model(input_ids=torch.from_numpy(ids))
    ours = clip.CLIPTextModel.from_pretrained(path)
    assert ours.config.hidden_act == text_cfg["hidden_act"]
    last, pooled = ours(jnp.asarray(ids))
    np.testing.assert_allclose(last, ref.last_hidden_state.numpy(), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(pooled, ref.pooler_output.numpy(), atol=1e-5, rtol=1e-5)

    # With a padding attention mask too.
    attn = np.arange(ids.shape[1])[None] <= np.argmax(ids == text_cfg["eos_token_id"], 1)[:, None]
    with torch.no_grad():
        ref = torch_model.text_model(
            input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(attn.astype(np.int64))
        )
    last, pooled = ours(jnp.asarray(ids), jnp.asarray(attn))
    np.testing.assert_allclose(last, ref.last_hidden_state.numpy(), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(pooled, ref.pooler_output.numpy(), atol=1e-5, rtol=1e-5)

    size = vision_cfg["image_size"]
    pixels = rng.standard_normal((2, size, size, 3)).astype(np.float32)
    with torch.no_grad():
        ref = torch_model.vision_model(pixel_values=torch.from_numpy(pixels.transpose(0, 3, 1, 2)))
    vision = clip.CLIPVisionModel.from_pretrained(path)
    last, pooled = vision(jnp.asarray(pixels))
    np.testing.assert_allclose(last, ref.last_hidden_state.numpy(), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(pooled, ref.pooler_output.numpy(), atol=1e-5, rtol=1e-5)


def test_standalone_tower_directories_and_sharded_files(tmp_path):
    torch.manual_seed(1)
    cfg = TINY_CONFIGS["quick_gelu"]
    text = transformers.CLIPTextModel(transformers.CLIPTextConfig(**cfg["text"])).eval()
    path = str(tmp_path / "text")
    text.save_pretrained(path, max_shard_size="20KB")  # several shards with an index
    assert os.path.isfile(os.path.join(path, "model.safetensors.index.json"))
    ids = random_ids(np.random.default_rng(1), 2, 10, 1000, 999)
    with torch.no_grad():
        ref = text(input_ids=torch.from_numpy(ids)).pooler_output.numpy()
    _, pooled = clip.CLIPTextModel.from_pretrained(path)(jnp.asarray(ids))
    np.testing.assert_allclose(pooled, ref, atol=1e-5, rtol=1e-5)


def test_sharded_files_errors_name_the_shard(tmp_path):
    """A bad key in a sharded checkpoint is reported with its shard; an index that disagrees
    with its shards (stale, hand-edited) is refused rather than trusted."""
    torch.manual_seed(1)
    text = transformers.CLIPTextModel(
        transformers.CLIPTextConfig(**TINY_CONFIGS["quick_gelu"]["text"])
    )
    path = tmp_path / "text"
    text.save_pretrained(str(path), max_shard_size="20KB")
    index_file = path / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    key = "encoder.layers.1.mlp.fc1.weight"  # transformers 5 drops the text_model. prefix
    shard = index["weight_map"][key]
    state = read_state_dict(str(path / shard))
    state[key] = np.zeros((5, 32), np.float32)
    write_safetensors(str(path / shard), state)
    with pytest.raises(WeightLoadError, match=rf"fc1\.weight: \(5, 32\) vs \(37, 32\) \[{shard}\]"):
        clip.CLIPTextModel.from_pretrained(str(path))
    # With an fp16 variant's shards beside them, the error cannot tell which index was read.
    text.save_pretrained(str(path), max_shard_size="20KB", variant="fp16")
    half = json.loads((path / "model.safetensors.index.fp16.json").read_text())["weight_map"][key]
    assert half != shard and (path / shard).is_file()
    with pytest.raises(WeightLoadError, match=rf"\(37, 32\) \[{shard} or {half}\]"):
        clip.CLIPTextModel.from_pretrained(str(path))

    other = next(s for s in sorted(set(index["weight_map"].values())) if s != shard)
    stale = {**index, "weight_map": {**index["weight_map"], key: other}}
    index_file.write_text(json.dumps(stale))
    with pytest.raises(WeightFileError, match=rf"index.json: 1 keys.*{key}: {other} -> {shard}"):
        read_state_dict(str(path))
    index_file.write_text(json.dumps(index))
    write_safetensors(str(path / other), {**read_state_dict(str(path / other)), key: state[key]})
    with pytest.raises(WeightFileError, match=f"key '{key}' is also in") as e:
        read_state_dict(str(path))
    assert other in str(e.value) and shard in str(e.value)


def test_bf16_compute_stays_close(tmp_path):
    torch_model, path, _ = save_tiny_clip(tmp_path, "quick_gelu")
    pixels = np.random.default_rng(2).standard_normal((1, 32, 32, 3)).astype(np.float32)
    with torch.no_grad():
        ref = torch_model.vision_model(pixel_values=torch.from_numpy(pixels.transpose(0, 3, 1, 2)))
    vision = clip.CLIPVisionModel.from_pretrained(path, dtype="bfloat16")
    _, pooled = vision(jnp.asarray(pixels))
    assert pooled.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(pooled, np.float32), ref.pooler_output.numpy(), atol=0.1)


def _broken_copy(tmp_path, path, edit):
    state = read_state_dict(path)
    edit(state)
    out = tmp_path / "broken"
    out.mkdir(parents=True)
    write_safetensors(str(out / "model.safetensors"), state)
    with open(os.path.join(path, "config.json")) as f:
        (out / "config.json").write_text(json.dumps(json.load(f)))
    return str(out)


def test_bad_weight_files_name_the_key(tmp_path):
    _, path, _ = save_tiny_clip(tmp_path, "quick_gelu")
    key = "text_model.encoder.layers.1.mlp.fc1.weight"

    broken = _broken_copy(tmp_path / "a", path, lambda s: s.pop(key))
    with pytest.raises(WeightLoadError, match="missing keys.*" + key.replace(".", r"\.")):
        clip.CLIPTextModel.from_pretrained(broken)

    extra = "text_model.encoder.layers.1.mlp.fc3.weight"
    broken = _broken_copy(
        tmp_path / "b", path, lambda s: s.update({extra: np.zeros(3, np.float32)})
    )
    with pytest.raises(WeightLoadError, match="unexpected keys.*fc3") as e:
        clip.CLIPTextModel.from_pretrained(broken)
    assert e.value.unexpected == [extra] and not e.value.missing

    def reshape(s):
        s[key] = np.zeros((5, 32), np.float32)

    broken = _broken_copy(tmp_path / "c", path, reshape)
    with pytest.raises(WeightLoadError, match=r"mis-shaped.*fc1\.weight: \(5, 32\) vs \(37, 32\)"):
        clip.CLIPTextModel.from_pretrained(broken)


def test_pickles_load_only_when_asked(tmp_path):
    torch.manual_seed(3)
    cfg = TINY_CONFIGS["gelu"]
    model = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**cfg["vision"])).eval()
    path = tmp_path / "vision_bin"
    model.save_pretrained(str(path))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    os.remove(path / "model.safetensors")
    torch.save(state, path / "pytorch_model.bin")
    with pytest.raises(WeightFileError, match="pytorch_model.bin.*allow_pickle=True"):
        clip.CLIPVisionModel.from_pretrained(str(path))
    pixels = np.random.default_rng(4).standard_normal((1, 28, 28, 3)).astype(np.float32)
    with torch.no_grad():
        ref = model(pixel_values=torch.from_numpy(pixels.transpose(0, 3, 1, 2))).pooler_output
    vision = clip.CLIPVisionModel.from_pretrained(str(path), allow_pickle=True)
    np.testing.assert_allclose(vision(jnp.asarray(pixels))[1], ref.numpy(), atol=1e-5, rtol=1e-5)
    # A pickle torch's weights-only loader cannot read: an error that names the file.
    (path / "pytorch_model.bin").write_bytes(b"PK\x03\x04 a truncated zip")
    with pytest.raises(WeightFileError, match="pytorch_model.bin: not a readable PyTorch"):
        clip.CLIPVisionModel.from_pretrained(str(path), allow_pickle=True)


def test_malformed_weight_files_are_named(tmp_path):
    """Files that are not what their names say: errors that name the file and the problem."""
    from catflax.weights import io

    def header_file(name, header):
        raw = json.dumps(header).encode()
        (tmp_path / name).write_bytes(len(raw).to_bytes(8, "little") + raw)
        return str(tmp_path / name)

    for name, header in (("list.safetensors", [1, 2]),
                         ("offsets.safetensors", {"a": {"dtype": "F32", "shape": [1],
                                                        "data_offsets": "x"}})):  # fmt: skip
        with pytest.raises(WeightFileError, match=rf"{name}: not a safetensors file \(malformed"):
            io.read_safetensors(header_file(name, header))
    torch.save([1, 2], tmp_path / "list.bin")
    with pytest.raises(WeightFileError, match=r"list\.bin: holds a list, not a state dict"):
        io.read_pickle(str(tmp_path / "list.bin"))
    torch.save({"model": {"w": torch.zeros(2)}, "step": 3}, tmp_path / "nested.bin")
    with pytest.raises(WeightFileError, match=r"nested\.bin: no tensors at the top level, only "
                       r"the dicts \['model'\]"):  # fmt: skip
        io.read_pickle(str(tmp_path / "nested.bin"))
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "model.safetensors.index.json").write_text('{"weight_map": {"w": 3}}')
    with pytest.raises(WeightFileError, match="weight_map is not a {key: file name} mapping"):
        io.read_state_dict(str(folder))
    # As diffusers: a plain file before a variant (the pickle only when allowed), and no error
    # about several variants when a plain file is there.
    os.remove(folder / "model.safetensors.index.json")
    torch.save({"w": torch.zeros(2)}, folder / "pytorch_model.bin")
    for name in ("model.fp16.safetensors", "model.ema.safetensors"):
        write_safetensors(str(folder / name), {"w": np.ones(2, np.float16)})
    files = io.find_weight_file(str(folder), allow_pickle=True)
    assert [os.path.basename(f) for f in files] == ["pytorch_model.bin"]
    with pytest.raises(WeightFileError, match=r"the variants \['ema', 'fp16'\]"):
        io.find_weight_file(str(folder))


def test_full_size_presets_have_vit_l14_parameter_counts():
    from flax import nnx

    from catflax.weights.convert import count_params

    text = nnx.eval_shape(lambda: clip.CLIPTextModel(clip.CLIP_VIT_L14_TEXT, rngs=nnx.Rngs(0)))
    vision = nnx.eval_shape(
        lambda: clip.CLIPVisionModel(clip.CLIP_VIT_L14_VISION, rngs=nnx.Rngs(0))
    )
    # transformers towers of openai/clip-vit-large-patch14 (no projections).
    hf_text = transformers.CLIPTextModel(
        transformers.CLIPTextConfig(
            hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12
        )
    )
    assert count_params(text) == sum(p.numel() for p in hf_text.parameters())
    hf_vision_config = transformers.CLIPVisionConfig(
        hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_hidden_layers=24,
        patch_size=14)  # fmt: skip
    with torch.device("meta"):
        hf_vision = transformers.CLIPVisionModel(hf_vision_config)
    assert count_params(vision) == sum(p.numel() for p in hf_vision.parameters())


def test_every_layer_norm_has_pytorch_precision_at_a_large_mean():
    """Flax's default LayerNorm variance, E[x^2] - E[x]^2, is off by ~0.1 for rows of mean 300 and
    spread 0.5 in fp32 (PyTorch: two-pass). Every LayerNorm of the model must match PyTorch
    there to 1e-3."""
    from flax import nnx

    from catflax.models.cat import CATDiffusion
    from catflax.models.rngs import rngs
    from tests.tiny import TINY_CAT

    model = CATDiffusion(TINY_CAT, rngs=rngs(0))
    norms = [(path, m) for path, m in nnx.iter_modules(model) if isinstance(m, nnx.LayerNorm)]
    assert len(norms) > 10
    rng = np.random.default_rng(0)
    for path, norm in norms:
        width = norm.scale.get_value().shape[0]
        x = (300.0 + 0.5 * rng.standard_normal((4, width))).astype(np.float32)
        ref = torch.nn.functional.layer_norm(torch.from_numpy(x), (width,), eps=norm.epsilon)
        got = np.asarray(norm(jnp.asarray(x)))  # fresh norms: scale 1, bias 0
        np.testing.assert_allclose(got, ref.numpy(), atol=1e-3, err_msg="/".join(map(str, path)))


def test_from_pretrained_options_agree_with_config_json(tmp_path):
    _, path, cfg = save_tiny_clip(tmp_path, "quick_gelu")
    source = os.path.join(path, "config.json")
    text_width, vision_patch = cfg["text"]["hidden_size"], cfg["vision"]["patch_size"]
    # The file's own sizes and run-time options are accepted.
    text = clip.CLIPTextModel.from_pretrained(
        path, hidden_size=text_width, attention="chunked", remat=True, dtype="bfloat16"
    )
    assert text.config.hidden_size == text_width and text.config.attention == "chunked"
    assert text.config.remat and text.config.dtype == "bfloat16"
    vision = clip.CLIPVisionModel.from_pretrained(path, patch_size=vision_patch)
    assert vision.config.patch_size == vision_patch
    # eos_token_id is a setting, not a size: it overrides the file's (999), as in transformers
    # (2: legacy configs, pooled at the largest id).
    legacy = clip.CLIPTextModel.from_pretrained(path, eos_token_id=2)
    assert legacy.config.eos_token_id == legacy.text_model.eos_token_id == 2
    # A size the file contradicts: config.json, the field and both values are named.
    with pytest.raises(WeightFileError) as err:
        clip.CLIPTextModel.from_pretrained(path, hidden_size=text_width * 2)
    assert str(err.value).startswith(source + ": hidden_size is ")
    assert f"{text_width} in the file, but {text_width * 2} was asked for" in str(err.value)
    with pytest.raises(WeightFileError, match="num_layers is 3 in the file, but 5 was asked"):
        clip.CLIPVisionModel.from_pretrained(path, num_layers=5)
    # An unknown option is a TypeError naming it and the file.
    for cls in (clip.CLIPTextModel, clip.CLIPVisionModel):
        with pytest.raises(TypeError, match="bogus") as err:
            cls.from_pretrained(path, bogus=1)
        assert source in str(err.value)
