"""Semantic inpainter: parity with a PyTorch version written from SPEC.md §3 (reference names)."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torch import nn

from catflax.models import inpainter as inp
from catflax.weights.convert import WeightLoadError
from catflax.weights.io import read_state_dict, write_safetensors

TINY = inp.InpainterConfig(
    hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, grid_size=16,
    label_size=24, label_intermediate_size=40, spatial_intermediate_size=56,
    global_intermediate_size=44,
)  # fmt: skip


# ---------------------------------------------------------------- the PyTorch yardstick
def quick_gelu(x):
    return x * torch.sigmoid(1.702 * x)


class MLP(nn.Module):
    def __init__(self, d_in, hidden, d_out):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d_in, hidden), nn.Linear(hidden, d_out)

    def forward(self, x):
        return self.fc2(quick_gelu(self.fc1(x)))


class Attention(nn.Module):
    def __init__(self, width, heads):
        super().__init__()
        self.heads = heads
        self.q_proj, self.k_proj = nn.Linear(width, width), nn.Linear(width, width)
        self.v_proj, self.out_proj = nn.Linear(width, width), nn.Linear(width, width)

    def forward(self, x):
        B, L, D = x.shape
        split = lambda t: t.view(B, L, self.heads, D // self.heads).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        w = torch.softmax(q @ k.transpose(-1, -2) * (D // self.heads) ** -0.5, dim=-1)
        return self.out_proj((w @ v).transpose(1, 2).reshape(B, L, D))


class Layer(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.self_attn = Attention(c.hidden_size, c.num_heads)
        self.layer_norm2 = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.mlp = MLP(c.hidden_size, c.intermediate_size, c.hidden_size)

    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class Embeddings(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.position_embedding = nn.Embedding(c.grid_size**2, c.hidden_size)
        self.mask_embedding = nn.Embedding(2, c.hidden_size)


class Encoder(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.layers = nn.ModuleList([Layer(c) for _ in range(c.num_layers)])


class TorchInpainter(nn.Module):
    """SPEC.md §3, steps 1-5, with the reference's module names."""

    def __init__(self, c: inp.InpainterConfig):
        super().__init__()
        D = c.hidden_size
        self.embeddings, self.encoder = Embeddings(c), Encoder(c)
        self.post_layernorm = nn.LayerNorm(D, eps=c.layer_norm_eps)
        self.label_mlp = MLP(c.label_size, c.label_intermediate_size, D)
        self.spatial_mlp = MLP(D, c.spatial_intermediate_size, D)
        self.global_mlp = MLP(D, c.global_intermediate_size, D)

    def forward(self, clip_masked, mask16, label, global_masked):
        patches = clip_masked[:, 1:]
        mask = mask16.reshape(mask16.shape[0], -1).long()
        pos = self.embeddings.position_embedding.weight[None]
        h = patches + pos + self.embeddings.mask_embedding(mask)
        seq = torch.cat(
            [self.global_mlp(global_masked)[:, None], self.spatial_mlp(h),
             self.label_mlp(label)[:, None]], 1,
        )  # fmt: skip
        for layer in self.encoder.layers:
            seq = layer(seq)
        pred_spatial = seq[:, 1:-1]
        # Stage-2 tokens: blend with the teacher's patch tokens, then AvgPool2d(2) on the grid.
        m = mask[..., None].to(seq.dtype)
        blended = m * pred_spatial + (1 - m) * patches
        G = round(blended.shape[1] ** 0.5)
        grid = blended.transpose(1, 2).reshape(blended.shape[0], -1, G, G)
        tokens = nn.functional.avg_pool2d(grid, 2).flatten(2).transpose(1, 2)
        return pred_spatial, self.post_layernorm(seq[:, 0]), seq[:, -1], tokens


def make_torch_model(cfg, seed=0):
    torch.manual_seed(seed)
    model = TorchInpainter(cfg).eval()
    with torch.no_grad():  # perturb every tensor so norms and biases are not the defaults
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def random_inputs(cfg, batch=3, seed=0):
    rng = np.random.default_rng(seed)
    G, D = cfg.grid_size, cfg.hidden_size
    mask16 = rng.random((batch, G, G)) < 0.4
    mask16[0] = False  # an empty mask
    return dict(
        clip_masked=rng.standard_normal((batch, 1 + G * G, D)).astype(np.float32),
        mask16=mask16,
        label=rng.standard_normal((batch, cfg.label_size)).astype(np.float32),
        global_masked=rng.standard_normal((batch, D)).astype(np.float32),
    )


def checkpoint_state(torch_model, prefix="fusion_model."):
    """As in the official checkpoint: the inpainter under `prefix`, beside other models' keys."""
    state = {prefix + k: v.numpy() for k, v in torch_model.state_dict().items()}
    state["model.diffusion_model.out.2.weight"] = np.zeros((4, 320, 3, 3), np.float32)
    state["cond_stage_model.transformer.text_model.final_layer_norm.bias"] = np.zeros(768, "f")
    return state


# ---------------------------------------------------------------- tests
@pytest.mark.parametrize("overrides", [{}, {"attention": "chunked", "remat": True, "num_heads": 2}])
def test_matches_torch_through_checkpoint_file(tmp_path, overrides):
    cfg = dataclasses.replace(TINY, **overrides)
    torch_model = make_torch_model(cfg)
    path = str(tmp_path / "cat.safetensors")
    write_safetensors(path, checkpoint_state(torch_model))
    ours = inp.SemanticInpainter.from_checkpoint(path, cfg)

    x = random_inputs(cfg)
    with torch.no_grad():
        ref = [t.numpy() for t in torch_model(*(torch.from_numpy(v) for v in x.values()))]
    out = ours(*(jnp.asarray(v) for v in x.values()))
    tokens, out2 = ours.predict_tokens(*(jnp.asarray(v) for v in x.values()))
    assert tokens.shape == (3, (cfg.grid_size // 2) ** 2, cfg.hidden_size)
    got = [out.pred_spatial, out.pred_global, out.label_out, tokens]
    for name, a, b in zip(["pred_spatial", "pred_global", "label_out", "tokens"], got, ref):
        err = np.abs(np.asarray(a) - b).max()
        print(f"inpainter {overrides or 'default'} {name}: max abs error {err:.1e}")
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5, err_msg=name)
    np.testing.assert_array_equal(out2.pred_spatial, out.pred_spatial)
    flat = ours(jnp.asarray(x["clip_masked"]), jnp.asarray(x["mask16"].reshape(3, -1)),
                jnp.asarray(x["label"]), jnp.asarray(x["global_masked"]))  # fmt: skip
    np.testing.assert_array_equal(flat.pred_spatial, out.pred_spatial)  # a flat (B,P) mask

    # Export gives back the same keys and values.
    exported = ours.state_dict()
    source = {
        k: v for k, v in checkpoint_state(torch_model).items() if k.startswith("fusion_model.")
    }
    assert sorted(exported) == sorted(source)
    for k, v in source.items():
        np.testing.assert_array_equal(exported[k], v, err_msg=k)


def _ks_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sample Kolmogorov-Smirnov statistic: the largest gap between the empirical CDFs."""
    a, b = np.sort(a.ravel()), np.sort(b.ravel())
    grid = np.concatenate([a, b])
    cdf = lambda x: np.searchsorted(x, grid, side="right") / x.size  # noqa: E731
    return float(np.abs(cdf(a) - cdf(b)).max())


def test_fresh_initialisation_matches_pytorch_defaults():
    """Stage 1a trains the inpainter from scratch; the reference's fresh layers carry PyTorch's
    default initialisation (nn.Linear U(+-1/sqrt(fan_in)) for weight and bias, nn.Embedding
    N(0, 1), LayerNorm ones and zeros). Every tensor is compared with PyTorch's by a two-sample
    Kolmogorov-Smirnov test at alpha ~1e-4 (constant tensors exactly)."""
    from catflax.models.rngs import rngs

    cfg = dataclasses.replace(
        TINY, hidden_size=128, intermediate_size=256, label_size=96, label_intermediate_size=192,
        spatial_intermediate_size=256, global_intermediate_size=160,
    )  # fmt: skip
    torch.manual_seed(0)
    reference = {k: v.numpy() for k, v in TorchInpainter(cfg).state_dict().items()}
    ours = inp.SemanticInpainter(cfg, rngs=rngs(0)).state_dict(prefix="")
    assert sorted(ours) == sorted(reference)
    for name, ref in reference.items():
        got = ours[name]
        assert got.shape == ref.shape, name
        if np.all(ref == ref.flat[0]):  # LayerNorm scale and bias
            np.testing.assert_array_equal(got, ref, err_msg=name)
            continue
        n = ref.size
        distance, critical = _ks_distance(got, ref), 2.15 * np.sqrt(2 / n)
        assert distance < critical, f"{name}: KS distance {distance:.3f} >= {critical:.3f}"


def test_token_functions_match_torch():
    rng = np.random.default_rng(1)
    B, G, D = 2, 16, 8
    pred = rng.standard_normal((B, G * G, D)).astype(np.float32)
    hidden = rng.standard_normal((B, 1 + G * G, D)).astype(np.float32)
    mask16 = rng.random((B, G, G)) < 0.5

    pool = lambda t: (  # noqa: E731  AvgPool2d(2) on the (h w) grid, as the reference
        nn.functional.avg_pool2d(torch.from_numpy(t).transpose(1, 2).reshape(B, D, G, G), 2)
        .flatten(2).transpose(1, 2).numpy()
    )  # fmt: skip
    m = mask16.reshape(B, -1, 1).astype(np.float32)
    ref = pool(m * pred + (1 - m) * hidden[:, 1:])
    ours = inp.semantic_tokens(jnp.asarray(pred), jnp.asarray(hidden[:, 1:]), jnp.asarray(mask16))
    np.testing.assert_allclose(ours, ref, atol=1e-6)
    # Stage 1b: the unmasked image's patch tokens (CLS dropped), pooled.
    np.testing.assert_allclose(
        inp.teacher_tokens(jnp.asarray(hidden)), pool(hidden[:, 1:]), atol=1e-6
    )


def reference_patchify(mask, num_patches=16):
    """The reference's patchify_mask, with numpy reshapes in place of the patchify package."""
    S = mask.shape[0]
    p = S // num_patches
    blocks = mask.reshape(num_patches, p, num_patches, p).transpose(0, 2, 1, 3)
    blocks = (blocks.reshape(num_patches, num_patches, p * p) / 255.0).round()
    return np.sum(blocks, axis=-1) > 0


def test_mask16_rule():
    m = np.zeros((224, 224), np.uint8)
    assert not inp.mask16_from_mask224(m).any()
    m[14 * 3 + 13, 14 * 5] = 128  # one pixel >= 128 in patch (3, 5): masked
    m[14 * 7, 14 * 2 + 6] = 127  # 127/255 rounds to 0: not masked
    expected = np.zeros((16, 16), bool)
    expected[3, 5] = True
    np.testing.assert_array_equal(inp.mask16_from_mask224(m), expected)
    m[:, 14 * 15 :] = 255  # the last patch column
    expected[:, 15] = True
    np.testing.assert_array_equal(inp.mask16_from_mask224(m), expected)

    rng = np.random.default_rng(0)
    soft = rng.integers(0, 256, (3, 224, 224)).astype(np.float32)
    soft = np.where(rng.random((3, 224, 224)) < 0.999, 0, soft)  # sparse soft masks
    soft[2, 100, 100] = 127.5  # rounds (half to even) to 0
    ours = inp.mask16_from_mask224(soft)
    assert ours.shape == (3, 16, 16)
    for b in range(3):
        np.testing.assert_array_equal(ours[b], reference_patchify(soft[b]))
    with pytest.raises(ValueError, match="square"):
        inp.mask16_from_mask224(np.zeros((224, 200)))


def distillation_inputs(seed: int):
    """(inpainter output, teacher features, teacher pooled, inputs) for 3 examples."""
    x = random_inputs(TINY, seed=seed)
    rng = np.random.default_rng(seed)
    out = inp.InpainterOutput(
        pred_spatial=jnp.asarray(rng.standard_normal((3, 256, 32)), jnp.float32),
        pred_global=jnp.asarray(rng.standard_normal((3, 32)), jnp.float32),
        label_out=jnp.zeros((3, 32)),
    )
    target = rng.standard_normal((3, 257, 32)).astype(np.float32)
    pooled = rng.standard_normal((3, 32)).astype(np.float32)
    return out, target, pooled, x


def test_distillation_loss_matches_reference_formula():
    out, target, pooled, x = distillation_inputs(2)
    ps, tgt = torch.tensor(np.asarray(out.pred_spatial)), torch.from_numpy(target[:, 1:])
    m = torch.from_numpy(x["mask16"].reshape(3, -1).astype(np.float32))
    per_patch = ((ps - tgt) ** 2).mean(-1)
    glob = ((torch.from_numpy(pooled) - torch.tensor(np.asarray(out.pred_global))) ** 2).mean()
    for masked_only, numerator in ((False, per_patch), (True, m * per_patch)):
        ref = numerator.sum() / (m.sum() + 1.0) + glob
        loss, parts = inp.distillation_loss(out, target, pooled, x["mask16"], masked_only)
        np.testing.assert_allclose(loss, ref.item(), rtol=1e-5)
        np.testing.assert_allclose(parts["global_loss"], glob.item(), rtol=1e-5)


def test_distillation_loss_per_group_is_the_mean_of_group_losses():
    """`group_size`: the reference's per-GPU loss (each GPU's batch normalised by its own masked
    patches + 1), averaged over the GPUs as DDP averages their gradients."""
    out, target, pooled, x = distillation_inputs(4)
    x["mask16"][0] = 0  # an example with no masked patch: groups differ in their denominators
    for masked_only in (False, True):
        args = (out, target, pooled, x["mask16"], masked_only)
        whole, _ = inp.distillation_loss(*args)
        np.testing.assert_allclose(inp.distillation_loss(*args, group_size=3)[0], whole, rtol=1e-6)
        one = [slice(i, i + 1) for i in range(3)]
        per_example = [
            inp.distillation_loss(
                inp.InpainterOutput(*(a[i] for a in out)),
                target[i],
                pooled[i],
                x["mask16"][i],
                masked_only,
            )[0]
            for i in one
        ]
        grouped, _ = inp.distillation_loss(*args, group_size=1)
        np.testing.assert_allclose(grouped, np.mean(per_example), rtol=1e-6)
        assert abs(float(grouped) - float(whole)) > 1e-3
    with pytest.raises(ValueError, match="group_size=2 does not divide the batch of 3"):
        inp.distillation_loss(out, target, pooled, x["mask16"], group_size=2)


def test_strict_loading_errors():
    torch_model = make_torch_model(TINY)
    state = checkpoint_state(torch_model)
    missing = dict(state)
    del missing["fusion_model.encoder.layers.1.mlp.fc2.bias"]
    with pytest.raises(WeightLoadError, match=r"fusion_model\.encoder\.layers\.1\.mlp\.fc2\.bias"):
        inp.SemanticInpainter.from_state_dict(missing, TINY)
    extra = {**state, "fusion_model.concat_mlp.fc1.weight": np.zeros((2, 2), np.float32)}
    with pytest.raises(WeightLoadError, match="concat_mlp"):
        inp.SemanticInpainter.from_state_dict(extra, TINY)
    with pytest.raises(WeightLoadError, match="label_mlp.fc1.weight"):  # wrong label width
        inp.SemanticInpainter.from_state_dict(state, dataclasses.replace(TINY, label_size=16))
    with pytest.raises(WeightLoadError, match="no key starts with"):
        inp.SemanticInpainter.from_state_dict({"x": np.zeros(1)}, TINY)
    # A bare state dict (no prefix) loads with prefix="".
    bare = {
        k.removeprefix("fusion_model."): v
        for k, v in state.items()
        if k.startswith("fusion_model.")
    }
    inp.SemanticInpainter.from_state_dict(bare, TINY, prefix="")


def test_bad_input_shapes(tmp_path):
    path = str(tmp_path / "w.safetensors")
    write_safetensors(path, checkpoint_state(make_torch_model(TINY)))
    assert "fusion_model.post_layernorm.weight" in read_state_dict(path)
    model = inp.SemanticInpainter.from_checkpoint(path, TINY)
    x = {k: jnp.asarray(v) for k, v in random_inputs(TINY, batch=1).items()}
    with pytest.raises(ValueError, match=r"clip_masked: expected .*257"):
        model(x["clip_masked"][:, 1:], x["mask16"], x["label"], x["global_masked"])
    with pytest.raises(ValueError, match="label"):
        model(x["clip_masked"], x["mask16"], x["global_masked"], x["global_masked"])


@pytest.mark.parametrize("masked_only", [False, True])
def test_distillation_loss_weights_drop_padding(masked_only):
    """Validation weights padding 0: the loss equals the plain loss of the valid examples."""
    out, target, pooled, x = distillation_inputs(3)
    args = (out, target, pooled, x["mask16"], masked_only)
    plain, _ = inp.distillation_loss(*args)
    ones, _ = inp.distillation_loss(*args, weights_B=jnp.ones(3))
    np.testing.assert_allclose(ones, plain, rtol=1e-6)
    keep = np.array([True, False, True])
    subset = inp.InpainterOutput(out.pred_spatial[keep], out.pred_global[keep], out.label_out[keep])
    expected, _ = inp.distillation_loss(
        subset, target[keep], pooled[keep], x["mask16"][keep], masked_only
    )
    weighted, _ = inp.distillation_loss(*args, weights_B=jnp.asarray(keep))
    np.testing.assert_allclose(weighted, expected, rtol=1e-6)
    assert abs(float(plain) - float(expected)) > 1e-3  # the padded example does change the loss
