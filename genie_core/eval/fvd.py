"""Frechet Video Distance (FVD) on I3D features.

FVD (Unterthiner et al. 2018) embeds each clip with an I3D network trained on Kinetics-400, fits a Gaussian to the
embeddings of the real clips and another to those of the generated clips, and reports the Frechet distance between
the two Gaussians: ||mu_r - mu_g||^2 + Tr(S_r + S_g - 2 (S_r S_g)^(1/2)). Lower is better; 0 means the same statistics.
As in common FVD code, the embedding is the network's pre-softmax Kinetics logits (400 numbers per clip).

Input convention: videos are float [N, T, C, H, W] in [0, 1] with C = 3 (a single channel is repeated). Frames are
resized to size x size (224 by default) and scaled to [-1, 1] before they reach I3D.

Weights are never downloaded: the user names a local file, either the TorchScript I3D used by common FVD code or a
state dict of `InceptionI3d` below (its key names match the widely shared PyTorch port, e.g. `rgb_imagenet.pt`).

FVD values are only comparable when they come from the same I3D file, the same frame size, the same clip length and
the same number of clips per set: each of these changes the features or the bias of the covariance estimates.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import List

import torch
import torch.nn.functional as F
from torch import nn

from genie_core.errors import GenieError

_WHAT_FVD_NEEDS = "FVD needs a local I3D file (TorchScript I3D or a state dict of genie_core.eval.fvd.InceptionI3d)"


# ------------------------------------------------------------------------------------------------ I3D network


def _same_pad_total(size: int, kernel: int, stride: int) -> int:
    return max(kernel - stride, 0) if size % stride == 0 else max(kernel - size % stride, 0)


def _pad_same(x: torch.Tensor, kernel: List[int], stride: List[int]) -> torch.Tensor:
    """Zero-pad (T, H, W) the way TensorFlow's "SAME" does, so the port's weights see the inputs they were trained
    on: the total pad depends on the input size, and the extra pixel of an odd total goes at the back. Spelled out
    per dim, not built in a loop: TorchScript's optimizer mis-compiled the loop form inside the full network."""
    t = _same_pad_total(x.size(2), kernel[0], stride[0])
    h = _same_pad_total(x.size(3), kernel[1], stride[1])
    w = _same_pad_total(x.size(4), kernel[2], stride[2])
    return F.pad(x, [w // 2, w - w // 2, h // 2, h - h // 2, t // 2, t - t // 2])  # F.pad lists the last dim first


class Unit3D(nn.Module):
    """Conv3d (no built-in padding) + BatchNorm + ReLU, or a bare conv with bias for the classifier."""

    def __init__(self, in_channels: int, out_channels: int, kernel: tuple[int, int, int] = (1, 1, 1),
                 stride: tuple[int, int, int] = (1, 1, 1), classifier: bool = False):
        super().__init__()
        self.kernel = list(kernel)
        self.stride = list(stride)
        self.relu = not classifier
        self.conv3d = nn.Conv3d(in_channels, out_channels, kernel, stride=stride, padding=0, bias=classifier)
        self.bn = None if classifier else nn.BatchNorm3d(out_channels, eps=0.001, momentum=0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv3d(_pad_same(x, self.kernel, self.stride))
        if self.bn is not None:
            x = self.bn(x)
        if self.relu:
            x = F.relu(x)
        return x


class MaxPool3dSame(nn.Module):
    """Max pool after SAME zero padding (zeros, not -inf, as in the port: inputs are post-ReLU, so it is the same)."""

    def __init__(self, kernel: tuple[int, int, int], stride: tuple[int, int, int]):
        super().__init__()
        self.kernel = list(kernel)
        self.stride = list(stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.max_pool3d(_pad_same(x, self.kernel, self.stride), self.kernel, self.stride)


class InceptionModule(nn.Module):
    """Four parallel branches concatenated on channels: 1x1x1 | 1x1x1 -> 3x3x3 | 1x1x1 -> 3x3x3 | pool -> 1x1x1.
    `widths` = [b0, b1a, b1b, b2a, b2b, b3b] output channels, as in the I3D paper's tables."""

    def __init__(self, in_channels: int, widths: list[int]):
        super().__init__()
        b0, b1a, b1b, b2a, b2b, b3b = widths
        self.out_channels = b0 + b1b + b2b + b3b
        self.b0 = Unit3D(in_channels, b0)
        self.b1a = Unit3D(in_channels, b1a)
        self.b1b = Unit3D(b1a, b1b, kernel=(3, 3, 3))
        self.b2a = Unit3D(in_channels, b2a)
        self.b2b = Unit3D(b2a, b2b, kernel=(3, 3, 3))
        self.b3a = MaxPool3dSame((3, 3, 3), (1, 1, 1))
        self.b3b = Unit3D(in_channels, b3b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.b0(x), self.b1b(self.b1a(x)), self.b2b(self.b2a(x)), self.b3b(self.b3a(x))], dim=1)


class InceptionI3d(nn.Module):
    """Inception-v1 I3D (Carreira & Zisserman 2017), RGB stream. Layer names follow the widely used PyTorch port so
    its Kinetics-400 state dict loads with strict=True.

    forward: [B, 3, T, H, W] in [-1, 1] -> [B, num_classes] pre-softmax logits. The final average pool is global over
    (T, H, W) rather than the port's fixed [2, 7, 7] window, so short clips and small frames work; at 16 x 224 x 224
    the two are identical.
    """

    def __init__(self, num_classes: int = 400):
        super().__init__()
        self.num_classes = num_classes
        self.Conv3d_1a_7x7 = Unit3D(3, 64, kernel=(7, 7, 7), stride=(2, 2, 2))
        self.MaxPool3d_2a_3x3 = MaxPool3dSame((1, 3, 3), (1, 2, 2))
        self.Conv3d_2b_1x1 = Unit3D(64, 64)
        self.Conv3d_2c_3x3 = Unit3D(64, 192, kernel=(3, 3, 3))
        self.MaxPool3d_3a_3x3 = MaxPool3dSame((1, 3, 3), (1, 2, 2))
        self.Mixed_3b = InceptionModule(192, [64, 96, 128, 16, 32, 32])
        self.Mixed_3c = InceptionModule(256, [128, 128, 192, 32, 96, 64])
        self.MaxPool3d_4a_3x3 = MaxPool3dSame((3, 3, 3), (2, 2, 2))
        self.Mixed_4b = InceptionModule(480, [192, 96, 208, 16, 48, 64])
        self.Mixed_4c = InceptionModule(512, [160, 112, 224, 24, 64, 64])
        self.Mixed_4d = InceptionModule(512, [128, 128, 256, 24, 64, 64])
        self.Mixed_4e = InceptionModule(512, [112, 144, 288, 32, 64, 64])
        self.Mixed_4f = InceptionModule(528, [256, 160, 320, 32, 128, 128])
        self.MaxPool3d_5a_2x2 = MaxPool3dSame((2, 2, 2), (2, 2, 2))
        self.Mixed_5b = InceptionModule(832, [256, 160, 320, 32, 128, 128])
        self.Mixed_5c = InceptionModule(832, [384, 192, 384, 48, 128, 128])
        self.logits = Unit3D(self.Mixed_5c.out_channels, num_classes, classifier=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.Conv3d_1a_7x7(x)
        x = self.MaxPool3d_2a_3x3(x)
        x = self.Conv3d_2b_1x1(x)
        x = self.Conv3d_2c_3x3(x)
        x = self.MaxPool3d_3a_3x3(x)
        x = self.Mixed_3b(x)
        x = self.Mixed_3c(x)
        x = self.MaxPool3d_4a_3x3(x)
        x = self.Mixed_4b(x)
        x = self.Mixed_4c(x)
        x = self.Mixed_4d(x)
        x = self.Mixed_4e(x)
        x = self.Mixed_4f(x)
        x = self.MaxPool3d_5a_2x2(x)
        x = self.Mixed_5b(x)
        x = self.Mixed_5c(x)
        x = x.mean(dim=(2, 3, 4), keepdim=True)
        return self.logits(x).flatten(1)


# ------------------------------------------------------------------------------------------------ loading


def _one_line(error: BaseException) -> str:
    """Exception text squeezed onto one line, cut short: GenieError messages are printed on a single line."""
    text = f"{type(error).__name__}: {' '.join(str(error).split())}"
    return text if len(text) <= 300 else text[:297] + "..."


class I3DFeatures(nn.Module):
    """I3D as a clip embedder: [B, T, C, H, W] in [0, 1] -> float32 [B, F]. Always in eval mode, never takes grads."""

    def __init__(self, net: nn.Module, kind: str, path: str | os.PathLike, size: int = 224):
        super().__init__()
        self.net = net
        self.kind = kind
        self.path = Path(path)
        self.size = size
        for parameter in self.net.parameters():  # ScriptModules have no requires_grad_()
            parameter.requires_grad_(False)
        self.net.eval()

    def train(self, mode: bool = True) -> I3DFeatures:
        super().train(mode)
        self.net.eval()  # BatchNorm must keep the statistics it was trained with
        return self

    def _device(self) -> torch.device:
        tensor = next(self.net.parameters(), None)
        if tensor is None:
            tensor = next(self.net.buffers(), None)
        return tensor.device if tensor is not None else torch.device("cpu")

    def _prepare(self, video: torch.Tensor) -> torch.Tensor:
        """[B, T, C, H, W] in [0, 1] -> [B, 3, T, size, size] in [-1, 1]."""
        if video.dim() != 5 or video.shape[2] not in (1, 3):
            raise GenieError(f"I3D features need video [B, T, C, H, W] with C = 1 or 3, got {tuple(video.shape)}")
        batch, frames = video.shape[:2]
        frames_2d = video.to(self._device(), torch.float32).flatten(0, 1)
        if frames_2d.shape[1] == 1:
            frames_2d = frames_2d.expand(-1, 3, -1, -1)
        if tuple(frames_2d.shape[-2:]) != (self.size, self.size):
            frames_2d = F.interpolate(frames_2d, size=(self.size, self.size), mode="bilinear", align_corners=False,
                                      antialias=True)
        clips = frames_2d.unflatten(0, (batch, frames)) * 2 - 1
        return clips.permute(0, 2, 1, 3, 4).contiguous()

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        clips = self._prepare(video)
        self.net.eval()
        with torch.no_grad():
            if self.kind == "torchscript":
                out = self.net(clips, rescale=False, resize=False, return_features=True)
            else:
                out = self.net(clips)
        if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != clips.shape[0]:
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise GenieError(f"I3D weights {self.path}: the network returned {shape} for {clips.shape[0]} clips, "
                             f"expected features [B, F]")
        return out.float()


def _state_dict_network(path: Path, state: Mapping) -> InceptionI3d:
    """InceptionI3d with `state` loaded strictly; the class count comes from the classifier's weight."""
    if not all(isinstance(key, str) and isinstance(value, torch.Tensor) for key, value in state.items()):
        raise GenieError(f"I3D weights {path}: holds a dict but not a state dict (names -> tensors); {_WHAT_FVD_NEEDS}")
    classifier = state.get("logits.conv3d.weight")
    num_classes = classifier.shape[0] if classifier is not None and classifier.dim() == 5 else 400
    net = InceptionI3d(num_classes=num_classes)
    try:
        result = net.load_state_dict(state, strict=False)  # strictness checked below, to report the keys
    except RuntimeError as error:  # shape mismatches
        raise GenieError(f"I3D weights {path}: state dict does not fit InceptionI3d: {_one_line(error)}") from None
    if result.missing_keys or result.unexpected_keys:
        raise GenieError(
            f"I3D weights {path}: state dict does not fit InceptionI3d: {len(result.missing_keys)} keys missing "
            f"(e.g. {result.missing_keys[:2]}), {len(result.unexpected_keys)} unexpected "
            f"(e.g. {result.unexpected_keys[:2]})")
    return net


def load_i3d(path: str | os.PathLike, size: int = 224) -> I3DFeatures:
    """I3D from a local file: a TorchScript I3D (called as net(x, rescale=False, resize=False, return_features=True)
    with x [B, 3, T, H, W] in [-1, 1]) or a torch.save'd state dict of InceptionI3d. Nothing is downloaded."""
    path = Path(path)
    if not path.is_file():
        raise GenieError(f"I3D weights {path}: no such file; {_WHAT_FVD_NEEDS}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # TorchScript is deprecated, yet it is how I3D is shared
            scripted = torch.jit.load(str(path), map_location="cpu")
    except Exception:  # noqa: BLE001 - whatever the failure, it is not TorchScript: try a state dict next
        scripted = None
    if scripted is not None:
        return I3DFeatures(scripted, "torchscript", path, size)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any failure: one line naming the file
        raise GenieError(f"I3D weights {path}: neither TorchScript nor a torch.save'd state dict "
                         f"({_one_line(error)}); {_WHAT_FVD_NEEDS}") from None
    if not isinstance(state, Mapping):
        raise GenieError(f"I3D weights {path}: holds a {type(state).__name__}, not a state dict; {_WHAT_FVD_NEEDS}")
    return I3DFeatures(_state_dict_network(path, state), "state_dict", path, size)


# ------------------------------------------------------------------------------------------------ distance


class _GivenFeatures(nn.Module):
    """Lets torchmetrics' FID take features that are already computed."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def frechet_distance(real: torch.Tensor, fake: torch.Tensor) -> float:
    """Frechet distance between Gaussians fit to two feature sets [N, F] (computed in float64 by torchmetrics).

    Each set needs N >= 2. With fewer samples than features (N <= F) the covariances are rank-deficient and their
    estimates biased, so FVD from few windows is only comparable with another FVD computed at the same N. Rounding can
    make the distance of identical sets a tiny negative number.
    """
    from torchmetrics.image.fid import FrechetInceptionDistance

    for name, features in (("real", real), ("fake", fake)):
        if features.dim() != 2:
            raise GenieError(f"Frechet distance needs {name} features [N, F], got {tuple(features.shape)}")
        if features.shape[0] < 2:
            raise GenieError(f"Frechet distance needs at least 2 {name} samples to fit a covariance, "
                             f"got {features.shape[0]}")
    if real.shape[1] != fake.shape[1]:
        raise GenieError(f"Frechet distance needs features of one size, got {real.shape[1]} real "
                         f"and {fake.shape[1]} fake")
    # The features are already complete on every process: no syncing, or several processes would count them twice.
    metric = FrechetInceptionDistance(feature=_GivenFeatures(int(real.shape[1])), sync_on_compute=False)
    metric.update(real.detach().cpu().double(), real=True)  # float64 in, so the result is not rounded to float32
    metric.update(fake.detach().cpu().double(), real=False)
    return float(metric.compute())


def _features_in_batches(features: I3DFeatures, video: torch.Tensor, batch_size: int) -> torch.Tensor:
    return torch.cat([features(video[start:start + batch_size]).cpu()
                      for start in range(0, video.shape[0], batch_size)])


def fvd(features: I3DFeatures, real_video: torch.Tensor, fake_video: torch.Tensor, batch_size: int = 8) -> float:
    """FVD between two sets of clips [N, T, C, H, W] in [0, 1], embedded `batch_size` clips at a time."""
    if batch_size < 1:
        raise GenieError(f"FVD batch_size must be at least 1, got {batch_size}")
    return frechet_distance(_features_in_batches(features, real_video, batch_size),
                            _features_in_batches(features, fake_video, batch_size))
