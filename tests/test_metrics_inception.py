"""FID InceptionV3: parity with a PyTorch FID Inception (pytorch-fid's architecture, written here
from its description since pytorch-fid needs torchvision), through our loaders and converter."""

import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import nnx
from torch import nn

from catflax.metrics import convert_inception, features, inception
from catflax.models.rngs import abstract_module
from catflax.weights.convert import WeightLoadError
from catflax.weights.io import WeightFileError, read_state_dict, write_safetensors

# ---------------------------------------------------------------------------------------------
# The reference: torchvision's Inception3 with pytorch-fid's FID patches, same state-dict names.
# ---------------------------------------------------------------------------------------------


class TorchConv(nn.Module):
    def __init__(self, cin, cout, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def tf_avg_pool(x):  # FID patch: padded zeros are not averaged
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class TorchA(nn.Module):
    def __init__(self, cin, pool_features):
        super().__init__()
        self.branch1x1 = TorchConv(cin, 64, 1)
        self.branch5x5_1 = TorchConv(cin, 48, 1)
        self.branch5x5_2 = TorchConv(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = TorchConv(cin, 64, 1)
        self.branch3x3dbl_2 = TorchConv(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = TorchConv(96, 96, 3, padding=1)
        self.branch_pool = TorchConv(cin, pool_features, 1)

    def forward(self, x):
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), b5, b3, self.branch_pool(tf_avg_pool(x))], 1)


class TorchB(nn.Module):
    def __init__(self, cin):
        super().__init__()
        self.branch3x3 = TorchConv(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = TorchConv(cin, 64, 1)
        self.branch3x3dbl_2 = TorchConv(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = TorchConv(96, 96, 3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), b3, F.max_pool2d(x, 3, stride=2)], 1)


class TorchC(nn.Module):
    def __init__(self, cin, c7):
        super().__init__()
        self.branch1x1 = TorchConv(cin, 192, 1)
        self.branch7x7_1 = TorchConv(cin, c7, 1)
        self.branch7x7_2 = TorchConv(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = TorchConv(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = TorchConv(cin, c7, 1)
        self.branch7x7dbl_2 = TorchConv(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = TorchConv(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = TorchConv(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = TorchConv(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = TorchConv(cin, 192, 1)

    def forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = self.branch7x7dbl_1(x)
        bd = self.branch7x7dbl_3(self.branch7x7dbl_2(bd))
        bd = self.branch7x7dbl_5(self.branch7x7dbl_4(bd))
        return torch.cat([self.branch1x1(x), b7, bd, self.branch_pool(tf_avg_pool(x))], 1)


class TorchD(nn.Module):
    def __init__(self, cin):
        super().__init__()
        self.branch3x3_1 = TorchConv(cin, 192, 1)
        self.branch3x3_2 = TorchConv(192, 320, 3, stride=2)
        self.branch7x7x3_1 = TorchConv(cin, 192, 1)
        self.branch7x7x3_2 = TorchConv(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = TorchConv(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = TorchConv(192, 192, 3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_2(self.branch7x7x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(b7))
        return torch.cat([b3, b7, F.max_pool2d(x, 3, stride=2)], 1)


class TorchE(nn.Module):
    def __init__(self, cin, max_pool):
        super().__init__()
        self.max_pool = max_pool  # FID patch: Mixed_7c max-pools
        self.branch1x1 = TorchConv(cin, 320, 1)
        self.branch3x3_1 = TorchConv(cin, 384, 1)
        self.branch3x3_2a = TorchConv(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = TorchConv(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = TorchConv(cin, 448, 1)
        self.branch3x3dbl_2 = TorchConv(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = TorchConv(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = TorchConv(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = TorchConv(cin, 192, 1)

    def forward(self, x):
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)
        pool = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else tf_avg_pool(x)
        return torch.cat([self.branch1x1(x), b3, bd, self.branch_pool(pool)], 1)


class TorchFIDInception(nn.Module):
    """pytorch-fid's InceptionV3(output_blocks=[3]) forward: resize, 2x-1, blocks 0..3."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = TorchConv(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = TorchConv(32, 32, 3)
        self.Conv2d_2b_3x3 = TorchConv(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = TorchConv(64, 80, 1)
        self.Conv2d_4a_3x3 = TorchConv(80, 192, 3)
        self.Mixed_5b, self.Mixed_5c, self.Mixed_5d = (
            TorchA(192, 32),
            TorchA(256, 64),
            TorchA(288, 64),
        )
        self.Mixed_6a = TorchB(288)
        self.Mixed_6b, self.Mixed_6c = TorchC(768, 128), TorchC(768, 160)
        self.Mixed_6d, self.Mixed_6e = TorchC(768, 160), TorchC(768, 192)
        self.Mixed_7a = TorchD(768)
        self.Mixed_7b, self.Mixed_7c = TorchE(1280, False), TorchE(2048, True)
        self.fc = nn.Linear(2048, 1008)

    def forward(self, x, resize_to=299):
        if resize_to:
            x = F.interpolate(x, size=(resize_to,) * 2, mode="bilinear", align_corners=False)
        x = 2 * x - 1
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, 3, stride=2)
        x = F.max_pool2d(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)), 3, stride=2)
        for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
            x = getattr(self, f"Mixed_{name}")(x)
        return F.adaptive_avg_pool2d(x, (1, 1)).flatten(1)


@pytest.fixture(scope="module")
def torch_inception(tmp_path_factory):
    """A randomly initialised reference whose activations stay O(1) through all 94 convs, saved
    as the standard pickled state dict."""
    torch.manual_seed(0)
    model = TorchFIDInception().eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                fan_in = m.weight[0].numel()
                m.weight.normal_(0.0, (2.0 / fan_in) ** 0.5)
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.6, 1.2)
                m.bias.uniform_(-0.2, 0.2)
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.8, 1.6)
    path = tmp_path_factory.mktemp("fid") / inception.FID_WEIGHTS_NAME.replace("-6726825d", "")
    # The legacy (pre-zip) pickle format of the 2019 file, with BatchNorm's num_batches_tracked.
    torch.save(model.state_dict(), path, _use_new_zipfile_serialization=False)
    return model, str(path)


def _features_torch(model, images_BHWC, resize_to):
    with torch.no_grad():
        x = torch.from_numpy(images_BHWC.transpose(0, 3, 1, 2))
        return model(x, resize_to=resize_to).numpy()


def test_pool3_features_match_pytorch_fid_architecture(torch_inception):
    model, path = torch_inception
    ours = inception.InceptionV3.from_pretrained(path, allow_pickle=True, resize_to=None)
    rng = np.random.default_rng(0)
    # 139x107: odd sizes so padding/ceil edge cases of every pool show up (3x3 at Mixed_7x).
    images = rng.uniform(0, 1, (2, 139, 107, 3)).astype(np.float32)
    ref = _features_torch(model, images, resize_to=None)
    got = np.asarray(jax.jit(lambda m, x: m(x))(ours, jnp.asarray(images)))
    assert got.shape == (2, 2048) and np.abs(ref).mean() > 0.05  # not a degenerate network
    err = np.abs(got - ref).max()
    print(f"inception pool3 max abs err {err:.2e} (mean |feature| {np.abs(ref).mean():.3f})")
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=1e-4)

    with pytest.raises(ValueError, match="at least 75 px"):
        ours(jnp.zeros((1, 74, 80, 3)))
    with pytest.raises(ValueError, match=r"float images in \[0, 1\], got uint8"):
        ours(np.zeros((1, 80, 80, 3), np.uint8))  # not silently 255 times too bright

    logits_ref = model.fc(torch.from_numpy(ref)).detach().numpy()
    np.testing.assert_allclose(ours.logits(jnp.asarray(ref)), logits_ref, atol=1e-4, rtol=1e-4)


def test_resize_matches_torch_interpolate():
    rng = np.random.default_rng(1)
    for h, w in ((64, 75), (512, 384), (299, 299)):
        x = rng.uniform(0, 1, (2, h, w, 3)).astype(np.float32)
        x_torch = torch.from_numpy(x.transpose(0, 3, 1, 2))
        ref = F.interpolate(x_torch, size=(299, 299), mode="bilinear", align_corners=False)
        ref = ref.numpy().transpose(0, 2, 3, 1)
        np.testing.assert_allclose(inception.resize_bilinear(x, 299), ref, atol=2e-6)
        np.testing.assert_allclose(inception.resize_bilinear(jnp.asarray(x), 299), ref, atol=2e-6)


def test_uint8_feature_extraction_with_resize_matches_reference(torch_inception, tmp_path):
    """The evaluate path: uint8 images of mixed sizes -> /255 -> bilinear resize -> pool3 (to 139
    rather than 299 here, to keep the test fast; the resize itself is checked at 299 above)."""
    model, path = torch_inception
    out = str(tmp_path / "fid.safetensors")
    convert_inception.main([path, out])
    ours = inception.InceptionV3.from_pretrained(out, resize_to=139)  # safetensors: no pickle
    rng = np.random.default_rng(2)
    images = [rng.integers(0, 256, (80, 96, 3), dtype=np.uint8),
              rng.integers(0, 256, (90, 90, 3), dtype=np.uint8)]  # fmt: skip
    got = features.inception_features(ours, images, batch_size=2)
    ref = np.concatenate(
        [_features_torch(model, (im[None] / 255.0).astype(np.float32), 139) for im in images]
    )
    print(f"inception uint8+resize max abs err {np.abs(got - ref).max():.2e}")
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=1e-4)


def test_weight_files_are_checked(torch_inception, tmp_path):
    _, path = torch_inception
    with pytest.raises(WeightFileError, match="allow_pickle=True"):
        inception.InceptionV3.from_pretrained(path)
    state = read_state_dict(path, allow_pickle=True)

    missing = {k: v for k, v in state.items() if k != "Mixed_6c.branch7x7_2.bn.running_var"}
    write_safetensors(str(tmp_path / "missing.safetensors"), missing)
    with pytest.raises(
        WeightLoadError, match=r"missing keys.*Mixed_6c\.branch7x7_2\.bn\.running_var"
    ):
        inception.InceptionV3.from_pretrained(str(tmp_path / "missing.safetensors"))

    imagenet = {**state, "AuxLogits.fc.weight": np.zeros((1000, 768), np.float32)}
    write_safetensors(str(tmp_path / "tv.safetensors"), imagenet)
    with pytest.raises(WeightFileError, match="torchvision's ImageNet"):
        inception.InceptionV3.from_pretrained(str(tmp_path / "tv.safetensors"))

    bad = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    bad.write_bytes(Path(path).read_bytes())
    with pytest.raises(WeightFileError, match="does not start with the 6726825d"):
        convert_inception.main([str(bad), str(tmp_path / "x.safetensors")])
    assert not os.path.exists(tmp_path / "x.safetensors")


class _MeanColour(nnx.Module):
    """Stands in for the network where only inception_features' host side is tested."""

    config = inception.InceptionConfig(resize_to=None)

    def __call__(self, x):
        return x.mean(axis=(1, 2))


def test_float_images_outside_unit_range_are_refused():
    """0..255 floats (uint8 converted without /255) would give wrong features: refused by the
    network called directly and by inception_features; [0, 1] floats pass, traced ones unchecked."""
    cfg = inception.InceptionConfig(resize_to=None)
    net = abstract_module(lambda rngs: inception.InceptionV3(cfg, rngs=rngs))  # no weights made
    bright = np.full((1, 74, 80, 3), 254.7, np.float32)
    bright[0, 0, 0] = 0.0
    unit = np.full((1, 74, 80, 3), 1.0005, np.float32)  # within the tolerance of [0, 1]
    expect = r"float values in \[0.0, 254.7\]; expected \[0, 1\] \(divide uint8 images by 255\)"
    for images in (bright, jnp.asarray(bright)):
        with pytest.raises(ValueError, match="images_BHWC: " + expect):
            net(images)
    # Valid input gets past the check to the size check (so the network never runs), and so
    # does any traced input (under jit the values are not known, nor checked).
    for images in (unit, jnp.asarray(unit)):
        with pytest.raises(ValueError, match="at least 75 px"):
            net(images)
    with pytest.raises(ValueError, match="at least 75 px"):
        jax.eval_shape(net, jax.ShapeDtypeStruct(bright.shape, jnp.float32))

    stand_in = _MeanColour()
    for images in (bright, list(bright)):
        with pytest.raises(ValueError, match=r"^images: float values in \[0.0, 254.7\]; expected"):
            features.inception_features(stand_in, images)
    got = features.inception_features(stand_in, np.concatenate([unit, bright / 255]))
    np.testing.assert_allclose(got, [[1.0005] * 3, (bright / 255).mean((1, 2))[0]], rtol=1e-4)
