"""FVD: the I3D network's layout, loading it from a local file (state dict or TorchScript), and the distance itself.

Runs on tiny clips (8 frames, 32 x 32) with random weights: no real I3D file is needed or downloaded.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from genie_core.errors import GenieError
from genie_core.eval.fvd import I3DFeatures, InceptionI3d, frechet_distance, fvd, load_i3d

SIZE = 32
FRAMES = 8
NUM_CLIPS = 12


def clips(n: int, seed: int = 0) -> torch.Tensor:
    """Smooth clips that drift sideways, [n, FRAMES, 3, SIZE, SIZE] in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(n, 3, 6, 6, generator=g)
    base = nn.functional.interpolate(base, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    return torch.stack([torch.roll(base, shifts=t, dims=-1) for t in range(FRAMES)], dim=1).clamp(0, 1)


class TorchScriptI3D(nn.Module):
    """Has the call signature of the TorchScript I3D that common FVD code loads."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor, rescale: bool = False, resize: bool = False,
                return_features: bool = True) -> torch.Tensor:
        return self.net(x)


def script(module: nn.Module) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script is deprecated, but FVD files use it
        return torch.jit.script(module)


@pytest.fixture(scope="module")
def calibrated_net() -> InceptionI3d:
    """Random weights with realistic BatchNorm statistics. With the default running stats (mean 0, var 1) eval-mode
    BN passes the shrinking activations of random convs straight through, and every clip maps to nearly the same
    logits (covariance trace ~1e-12): the distance would be all rounding. A few batches in train mode, with a
    cumulative average instead of momentum 0.01, set each layer's statistics to those of real inputs."""
    torch.manual_seed(0)
    net = InceptionI3d()
    batch_norms = [m for m in net.modules() if isinstance(m, nn.BatchNorm3d)]
    for bn in batch_norms:
        bn.momentum = None
    net.train()
    with torch.no_grad():
        for seed in (100, 101):
            net(clips(8, seed).permute(0, 2, 1, 3, 4) * 2 - 1)
    for bn in batch_norms:
        bn.momentum = 0.01
    return net.eval()


@pytest.fixture(scope="module")
def weight_files(tmp_path_factory, calibrated_net) -> dict:
    folder = tmp_path_factory.mktemp("i3d")
    state_dict = folder / "i3d_state_dict.pt"
    torch.save(calibrated_net.state_dict(), state_dict)
    torchscript = folder / "i3d_torchscript.pt"
    script(TorchScriptI3D(calibrated_net)).save(str(torchscript))
    return {"state_dict": state_dict, "torchscript": torchscript}


@pytest.fixture(scope="module")
def features(weight_files) -> I3DFeatures:
    return load_i3d(weight_files["state_dict"], size=SIZE)


# ------------------------------------------------------------------------------------------------ network layout


def test_state_dict_has_the_ports_key_names_and_parameter_count():
    net = InceptionI3d()
    keys = set(net.state_dict())
    for key in ("Conv3d_1a_7x7.conv3d.weight", "Conv3d_1a_7x7.bn.running_var", "Conv3d_2c_3x3.bn.bias",
                "Mixed_3b.b1b.conv3d.weight", "Mixed_4f.b2a.bn.running_mean", "Mixed_5c.b3b.conv3d.weight",
                "logits.conv3d.weight", "logits.conv3d.bias"):
        assert key in keys
    assert not any(key.startswith("MaxPool3d") for key in keys)  # pools carry no parameters
    assert not any(key.startswith("logits.bn") for key in keys)
    assert "Conv3d_1a_7x7.conv3d.bias" not in keys  # convs before BatchNorm have no bias
    assert net.state_dict()["logits.conv3d.weight"].shape == (400, 1024, 1, 1, 1)
    assert sum(p.numel() for p in net.parameters()) == 12_697_264  # the published RGB I3D: ~12.7M with 400 classes


# ------------------------------------------------------------------------------------------------ loading


def test_state_dict_file_loads(weight_files, features, calibrated_net):
    assert features.kind == "state_dict"
    assert features.path == weight_files["state_dict"]
    out = features(clips(3))
    assert out.shape == (3, 400) and out.dtype == torch.float32 and torch.isfinite(out).all()
    with torch.no_grad():
        expected = calibrated_net(clips(3).permute(0, 2, 1, 3, 4) * 2 - 1)
    assert torch.allclose(out, expected, atol=1e-5)  # frames already SIZE x SIZE: only the [-1, 1] scaling applies


def test_class_count_comes_from_the_file(tmp_path):
    path = tmp_path / "charades.pt"
    torch.save(InceptionI3d(num_classes=157).state_dict(), path)
    assert load_i3d(path, size=SIZE).net.num_classes == 157


def test_torchscript_file_gives_the_same_features(weight_files, features):
    scripted = load_i3d(weight_files["torchscript"], size=SIZE)
    assert scripted.kind == "torchscript"
    video = clips(3, seed=5)
    assert torch.allclose(scripted(video), features(video), rtol=1e-4, atol=1e-5)


def test_frames_are_resized_and_gray_is_repeated(features):
    video = clips(2, seed=7)
    bigger = nn.functional.interpolate(video.flatten(0, 1), size=(48, 48), mode="bilinear").unflatten(0, (2, FRAMES))
    assert features(bigger).shape == (2, 400)
    gray = video[:, :, :1]
    assert torch.allclose(features(gray), features(gray.expand(-1, -1, 3, -1, -1)), atol=1e-6)


# ------------------------------------------------------------------------------------------------ distance


def test_fvd_is_zero_for_identical_sets_and_grows_with_noise(features):
    real = clips(NUM_CLIPS)
    real_features = features(real)
    trace = torch.cov(real_features.double().T).trace().item()
    assert trace > 1.0  # the features vary between clips, so the test below measures something
    assert abs(frechet_distance(real_features, real_features)) < 1e-3 * trace
    assert abs(fvd(features, real, real, batch_size=5)) < 1e-3 * trace  # uneven batches give the same features

    noise = torch.randn(real.shape, generator=torch.Generator().manual_seed(1))
    distances = [fvd(features, real, (real + sigma * noise).clamp(0, 1)) for sigma in (0.05, 0.2, 0.5)]
    assert 0 < distances[0] < distances[1] < distances[2]


def test_frechet_distance_needs_two_samples_per_set():
    with pytest.raises(GenieError, match="at least 2"):
        frechet_distance(torch.randn(1, 16), torch.randn(5, 16))
    with pytest.raises(GenieError, match="at least 2"):
        frechet_distance(torch.randn(5, 16), torch.randn(1, 16))


def test_frechet_distance_of_shifted_gaussians():
    """Equal covariances: the distance is the squared distance between the means."""
    real = torch.randn(64, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    shift = torch.tensor([1.0, 2.0, 0.0, 0.0], dtype=torch.float64)
    assert frechet_distance(real, real + shift) == pytest.approx(5.0, rel=1e-6)


# ------------------------------------------------------------------------------------------------ bad files


def test_missing_file(tmp_path):
    path = tmp_path / "nowhere" / "i3d.pt"
    with pytest.raises(GenieError, match="no such file") as caught:
        load_i3d(path)
    assert str(path) in str(caught.value)


def test_garbage_file(tmp_path):
    path = tmp_path / "garbage.pt"
    path.write_bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0),
                                   dtype=torch.uint8).numpy().tobytes())
    with pytest.raises(GenieError, match="neither TorchScript nor") as caught:
        load_i3d(path)
    assert str(path) in str(caught.value) and "\n" not in str(caught.value)


def test_state_dict_with_wrong_keys(tmp_path):
    path = tmp_path / "resnet.pt"
    torch.save({"fc.weight": torch.zeros(3, 3), "fc.bias": torch.zeros(3)}, path)
    with pytest.raises(GenieError, match="does not fit InceptionI3d") as caught:
        load_i3d(path)
    message = str(caught.value)
    assert str(path) in message and "missing" in message and "2 unexpected" in message and "fc.weight" in message


def test_state_dict_with_a_wrong_shape(tmp_path, calibrated_net):
    path = tmp_path / "wrong_shape.pt"
    state = dict(calibrated_net.state_dict())
    state["Mixed_5c.b0.conv3d.weight"] = torch.zeros(1, 1, 1, 1, 1)
    torch.save(state, path)
    with pytest.raises(GenieError, match="Mixed_5c.b0.conv3d.weight") as caught:
        load_i3d(path)
    assert str(path) in str(caught.value) and "\n" not in str(caught.value)


class NotFeatures(nn.Module):
    def forward(self, x: torch.Tensor, rescale: bool = False, resize: bool = False,
                return_features: bool = True) -> torch.Tensor:
        return x.mean(dim=1)  # [B, T, H, W], not [B, F]


def test_network_that_does_not_return_features(tmp_path):
    path = tmp_path / "not_i3d.pt"
    script(NotFeatures()).save(str(path))
    features = load_i3d(path, size=SIZE)
    with pytest.raises(GenieError, match="expected features") as caught:
        features(clips(2))
    assert str(path) in str(caught.value)
