"""An example third-party genie plugin: what a package outside the genie-world repository needs to add a component.

It shows the three pieces a plugin is made of:

1. a frozen, keyword-only attrs config with validators (recipes fill it; `genie validate` checks it key by key);
2. a component subclassing an interface from `genie_core.interfaces` (here `VideoTokenizer`), with a `tiny_config`
   for the CPU contract tests and a `check_recipe` for checks that need the rest of the recipe;
3. a `genie_register_components` hook implementation, found through the `genie.plugins` entry point declared in
   this package's pyproject.toml.

The component, "example-conv-vq", is a per-frame convolutional VQ-VAE: stride-2 convolutions bring each frame down
by `patch_size` to one vector per token, `genie_core.nn.Quantizer` snaps each vector to a codebook entry, and
transposed convolutions bring it back up. Frames never see each other, so it is trivially causal in time.
"""

from __future__ import annotations

import attrs
import torch
import torch.nn.functional as F
from attrs import validators as v
from torch import nn

import genie_core
from genie_core.config import check_patch_divides_resolution, positive
from genie_core.interfaces import TokenizerOutput, VideoSpec, VideoTokenizer
from genie_core.nn import Quantizer

__version__ = "0.1.0"


def power_of_two(instance, attribute, value):  # noqa: ARG001 - attrs validator signature
    if value < 2 or value & (value - 1):
        raise ValueError(f"'{attribute.name}' must be a power of two >= 2 (one stride-2 convolution per halving): "
                         f"{value}")


@attrs.define(frozen=True, kw_only=True)
class ConvVQConfig:
    patch_size: int = attrs.field(default=8, validator=power_of_two)  # total encoder stride: pixels per token side
    channels: int = attrs.field(default=128, validator=positive)  # width of every convolution
    codebook_size: int = attrs.field(default=1024, validator=v.ge(2))
    code_dim: int = attrs.field(default=32, validator=positive)
    commitment_weight: float = attrs.field(default=0.25, validator=v.ge(0))
    dead_code_threshold: float = attrs.field(default=2.0, validator=v.ge(0))  # 0 disables dead-code restarts


class ConvVQTokenizer(VideoTokenizer):
    """Per-frame conv VQ-VAE: [B, T, C, H, W] -> tokens [B, T, H/p, W/p] -> [B, T, C, H, W]."""

    config_class = ConvVQConfig
    check_recipe = staticmethod(check_patch_divides_resolution)

    @classmethod
    def tiny_config(cls):
        return ConvVQConfig(patch_size=4, channels=16, codebook_size=64, code_dim=8)

    def __init__(self, config: ConvVQConfig, spec: VideoSpec):
        super().__init__(config, spec)
        p, d, c = config.patch_size, config.channels, spec.channels
        if spec.height % p or spec.width % p:
            raise ValueError(f"patch_size {p} does not divide the frame size {spec.height}x{spec.width}")
        self._grid = (spec.height // p, spec.width // p)
        halvings = p.bit_length() - 1
        down = [nn.Sequential(nn.Conv2d(d, d, 4, stride=2, padding=1), nn.GELU()) for _ in range(halvings)]
        up = [nn.Sequential(nn.ConvTranspose2d(d, d, 4, stride=2, padding=1), nn.GELU()) for _ in range(halvings)]
        self.encoder = nn.Sequential(nn.Conv2d(c, d, 3, padding=1), nn.GELU(), *down, nn.Conv2d(d, d, 1))
        self.quantizer = Quantizer(d, config.codebook_size, config.code_dim, config.commitment_weight,
                                   config.dead_code_threshold)
        self.decoder = nn.Sequential(nn.Conv2d(d, d, 1), nn.GELU(), *up, nn.Conv2d(d, c, 3, padding=1))

    @property
    def codebook_size(self) -> int:
        return self.config.codebook_size

    @property
    def grid(self) -> tuple[int, int]:
        return self._grid

    def _encode(self, video: torch.Tensor):
        b, t = video.shape[:2]
        features = self.encoder(video.flatten(0, 1) * 2 - 1)  # [B*T, D, h, w]
        features = features.unflatten(0, (b, t)).permute(0, 1, 3, 4, 2)  # [B, T, h, w, D]
        return self.quantizer(features)  # indices [B, T, h, w]

    def _decode(self, quantized: torch.Tensor) -> torch.Tensor:
        b, t = quantized.shape[:2]
        frames = self.decoder(quantized.flatten(0, 1).permute(0, 3, 1, 2))  # [B*T, C, H, W]
        return frames.unflatten(0, (b, t)) * 0.5 + 0.5

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        return self._encode(video).indices

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        return self._decode(self.quantizer.embed(tokens)).clamp(0, 1)

    def loss(self, video: torch.Tensor) -> TokenizerOutput:
        q = self._encode(video)
        recon = self._decode(q.quantized)
        mse = F.mse_loss(recon, video)
        metrics = {"mse": mse.detach(), "commit": q.aux_loss.detach(), "perplexity": q.perplexity, "usage": q.usage}
        return TokenizerOutput(loss=mse + q.aux_loss, recon=recon, tokens=q.indices, metrics=metrics)


@genie_core.hookimpl
def genie_register_components(registrar):
    registrar.add_tokenizer("example-conv-vq", ConvVQTokenizer)
