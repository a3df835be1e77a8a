"""Latent action models: a VQ-VAE whose latent is one of |A| codes per transition.

The encoder sees frames x_0..x_{t+1} (causal ST-transformer) and emits one latent for the transition t -> t+1; the
decoder sees x_0..x_t plus that quantized latent and must reconstruct x_{t+1}. The tiny codebook leaves room for
little more than what changed, which is what makes the codes controllable. Only the code ids are used at play time.
With `predict_change` the decoder outputs x_{t+1} - x_t instead of x_{t+1}: a small decoder then spends nothing on
redrawing the frame it was given, and the loss is all about what moved.
With `decoder_sees_history = false` the decoder reconstructs x_{t+1} from x_t alone: the speed it could read off
earlier frames can then not stand in for the action, which has to carry it.

- "pixel-lam" (the paper's): the encoder reads pixel patches.
- "token-lam" (the paper's Table 2 alternative): the encoder reads the frozen tokenizer's tokens instead; the decoder
  still reconstructs pixels, so both are trained and scored on the same target.
"""

from __future__ import annotations

import attrs
import torch
import torch.nn.functional as F
from attrs import validators as v

from genie_core import hookimpl
from genie_core.config import check_heads, check_patch_divides_resolution, layers, positive
from genie_core.errors import GenieError
from genie_core.interfaces import ActionModelOutput, LatentActionModel, VideoSpec, VideoTokenizer
from genie_core.nn import (
    Quantizer,
    SpaceTimePositions,
    STTransformer,
    as_at_play_time,
    check_quantizer,
    patchify,
    unpatchify,
)


@attrs.define(frozen=True, kw_only=True)
class PixelLAMConfig:
    """Defaults: the paper's CoinRun LAM (Appendix F) with the main model's |A| = 8."""

    num_actions: int = attrs.field(default=8, validator=v.ge(2))
    patch_size: int = attrs.field(default=16, validator=positive)
    dim: int = attrs.field(default=512, validator=positive)
    encoder_depth: int = attrs.field(default=8, validator=layers)
    decoder_depth: int = attrs.field(default=8, validator=layers)
    heads: int = attrs.field(default=8, validator=positive)
    code_dim: int = attrs.field(default=32, validator=positive)
    commitment_weight: float = attrs.field(default=0.25, validator=v.ge(0))
    dead_code_threshold: float = attrs.field(default=1.0, validator=v.ge(0))
    qk_norm: bool = True
    predict_change: bool = False  # the decoder predicts x_{t+1} - x_t (added to x_t) rather than x_{t+1}
    decoder_sees_history: bool = True  # false: the decoder sees x_t only, not x_0..x_t
    quantizer: str = "vq"  # vq (the paper's), fsq or lfq (|A| a power of two): see genie_core.nn.Quantizer

    def __attrs_post_init__(self):
        check_heads(self)
        check_quantizer(self.quantizer, self.num_actions)


class PixelLAM(LatentActionModel):
    config_class = PixelLAMConfig
    check_recipe = staticmethod(check_patch_divides_resolution)

    @classmethod
    def tiny_config(cls):
        return PixelLAMConfig(num_actions=4, patch_size=4, dim=32, encoder_depth=1, decoder_depth=1, heads=2,
                              code_dim=8)

    @classmethod
    def tiny_variants(cls):
        variants = {kind: attrs.evolve(cls.tiny_config(), quantizer=kind) for kind in ("fsq", "lfq")}
        return variants | {"predict-change": attrs.evolve(cls.tiny_config(), predict_change=True),
                           "no-history": attrs.evolve(cls.tiny_config(), decoder_sees_history=False)}

    def __init__(self, config: PixelLAMConfig, spec: VideoSpec):
        super().__init__(config, spec)
        p, d = config.patch_size, config.dim
        self.grid = (spec.height // p, spec.width // p)
        num_patches = self.grid[0] * self.grid[1]
        patch_dim = spec.channels * p * p
        # Encoder: every frame's inputs plus one "action slot" whose output becomes the latent action.
        self.encoder_embed, inputs_per_frame = self._encoder_embedding()
        self.action_slot = torch.nn.Parameter(torch.randn(d) * 0.02)
        self.encoder_positions = SpaceTimePositions(d, inputs_per_frame + 1, spec.num_frames)
        self.encoder = STTransformer(d, config.encoder_depth, config.heads, qk_norm=config.qk_norm)
        self.quantizer = Quantizer(d, config.num_actions, config.code_dim, config.commitment_weight,
                                   config.dead_code_threshold, kind=config.quantizer)
        # Decoder: frames x_0..x_{T-2}, each plus the action that follows it, predict x_1..x_{T-1}.
        self.decoder_embed = torch.nn.Linear(patch_dim, d)
        self.decoder_positions = SpaceTimePositions(d, num_patches, spec.num_frames)
        self.decoder = STTransformer(d, config.decoder_depth, config.heads, qk_norm=config.qk_norm)
        self.to_pixels = torch.nn.Linear(d, patch_dim)
        if config.predict_change:  # start as "nothing moves": the previous frame exactly
            torch.nn.init.zeros_(self.to_pixels.weight)
            torch.nn.init.zeros_(self.to_pixels.bias)

    def _encoder_embedding(self) -> tuple[torch.nn.Module, int]:
        """What embeds the encoder's input, and how many inputs each frame has: here its pixel patches."""
        p = self.config.patch_size
        return torch.nn.Linear(self.spec.channels * p * p, self.config.dim), self.grid[0] * self.grid[1]

    def _encoder_input(self, video: torch.Tensor) -> torch.Tensor:
        return self.encoder_embed(patchify(video * 2 - 1, self.config.patch_size))  # [B, T, N, D]

    @property
    def num_actions(self) -> int:
        return self.config.num_actions

    def _latent_actions(self, video: torch.Tensor):
        x = self._encoder_input(video)  # [B, T, N, D]
        slot = self.action_slot.expand(x.shape[0], x.shape[1], 1, -1)
        x = self.encoder(self.encoder_positions(torch.cat([slot, x], dim=2)))  # [B, T, N + 1, D]
        # The slot of frame t + 1 has seen x_0..x_{t+1}: it explains the transition t -> t + 1.
        return self.quantizer(x[:, 1:, 0])  # quantized [B, T - 1, D], indices [B, T - 1]

    def infer_actions(self, video: torch.Tensor) -> torch.Tensor:
        return self._latent_actions(video).indices

    def loss(self, video: torch.Tensor) -> ActionModelOutput:
        q = self._latent_actions(video)
        past = self.decoder_embed(patchify(video[:, :-1] * 2 - 1, self.config.patch_size))  # [B, T - 1, N, D]
        x = self.decoder_positions(past + q.quantized[:, :, None])
        if self.config.decoder_sees_history:
            x = self.decoder(x)
        else:  # each transition on its own: frames folded into the batch
            x = self.decoder(x.flatten(0, 1)[:, None]).view(x.shape)
        recon = unpatchify(self.to_pixels(x), self.config.patch_size, self.grid, self.spec.channels) * 0.5
        recon = recon + (video[:, :-1] if self.config.predict_change else 0.5)
        mse = F.mse_loss(recon, video[:, 1:])
        metrics = {"mse": mse.detach(), "commit": q.aux_loss.detach(), "perplexity": q.perplexity, "usage": q.usage}
        return ActionModelOutput(loss=mse + q.aux_loss, actions=q.indices, recon=recon, metrics=metrics)


class TokenLAM(PixelLAM):
    """The encoder reads the tokenizer's token ids of each frame (embedded, one input per token) instead of pixels.
    Built with a spec that names the tokens (`VideoSpec.token_vocab`, `token_grid`); the frozen tokenizer is handed
    over by `use_tokenizer` (the pipeline and `World` do it) and is not part of this model's weights."""

    needs_tokenizer = True

    @classmethod
    def tiny_variants(cls):
        return {}  # the quantizer options are pixel-lam's, tested there

    def __init__(self, config: PixelLAMConfig, spec: VideoSpec):
        if not spec.token_vocab:
            raise GenieError("action model token-lam reads tokenizer tokens: build it with a spec that gives their "
                             "vocabulary and grid (VideoSpec.token_vocab, token_grid), as the pipeline does")
        super().__init__(config, spec)
        self._tokenizer: list[VideoTokenizer] = []  # a plain list: not a submodule, so not trained or saved

    def _encoder_embedding(self):
        h, w = self.spec.token_grid
        return torch.nn.Embedding(self.spec.token_vocab, self.config.dim), h * w

    def use_tokenizer(self, tokenizer: VideoTokenizer) -> None:
        expected = (self.spec.token_vocab, tuple(self.spec.token_grid))
        if (tokenizer.codebook_size, tuple(tokenizer.grid)) != expected:
            raise GenieError(f"action model token-lam was built for {expected[0]} codes on a {expected[1]} grid; the "
                             f"tokenizer has {tokenizer.codebook_size} codes on a {tuple(tokenizer.grid)} grid")
        self._tokenizer = [tokenizer]

    def _encoder_input(self, video: torch.Tensor) -> torch.Tensor:
        if not self._tokenizer:
            raise GenieError("action model token-lam has no tokenizer: call use_tokenizer(tokenizer) first")
        with as_at_play_time(video):  # the frozen tokenizer's tokens, as at play time in any precision
            tokens = self._tokenizer[0].encode(video)  # [B, T, h, w]
        return self.encoder_embed(tokens.flatten(2))  # [B, T, h * w, D]


@hookimpl
def genie_register_components(registrar):
    registrar.add_action_model("pixel-lam", PixelLAM)
    registrar.add_action_model("token-lam", TokenLAM)
