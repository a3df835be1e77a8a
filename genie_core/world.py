"""A trained world: tokenizer + latent action model + dynamics model + sampler, and how to roll it out.

The dynamics model and the tokenizer were trained on windows of a fixed number of frames; a rollout longer than that
keeps a rolling context of the most recent `context` frames, so any number of steps can be played.
"""

from __future__ import annotations

from pathlib import Path

import attrs
import torch

from genie_core.checkpoint import MANIFEST, load_components
from genie_core.errors import GenieError
from genie_core.interfaces import DynamicsModel, LatentActionModel, Sampler, VideoTokenizer
from genie_core.registry import Registry, get_registry


@attrs.define
class World:
    tokenizer: VideoTokenizer
    action_model: LatentActionModel
    dynamics: DynamicsModel
    sampler: Sampler

    def __attrs_post_init__(self):
        self.action_model.use_tokenizer(self.tokenizer)  # a token-input action model reads through it

    @property
    def num_actions(self) -> int:
        return self.action_model.num_actions

    @property
    def context(self) -> int:
        return min(self.dynamics.spec.num_frames, self.tokenizer.spec.num_frames)

    @property
    def device(self) -> torch.device:
        return next(self.dynamics.parameters()).device

    def check_actions(self, actions: torch.Tensor) -> None:
        bad = actions[(actions < 0) | (actions >= self.num_actions)]
        if bad.numel():
            raise GenieError(f"action {int(bad[0])} is out of range; this world has actions 0..{self.num_actions - 1}")

    @torch.no_grad()
    def generate_tokens(self, prompt_tokens: torch.Tensor, actions: torch.Tensor,
                        generator: torch.Generator | None = None) -> torch.Tensor:
        """prompt tokens [B, 1, h, w] and actions [B, S] -> tokens [B, S + 1, h, w] (the prompt first)."""
        self.check_actions(actions)
        tokens = prompt_tokens
        keep = self.context - 1  # history frames next to the one being generated
        for step in range(actions.shape[1]):
            history = tokens[:, -keep:]
            history_actions = actions[:, step + 1 - history.shape[1] : step + 1]
            nxt = self.sampler.sample_next(self.dynamics, history, history_actions, generator)
            tokens = torch.cat([tokens, nxt[:, None]], dim=1)
        return tokens

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, T, h, w] -> video [B, T, C, H, W], decoding frame t from at most `context` frames up to t."""
        t = tokens.shape[1]
        if t <= self.tokenizer.spec.num_frames:
            return self.tokenizer.decode(tokens)
        window = self.tokenizer.spec.num_frames
        head = self.tokenizer.decode(tokens[:, :window])
        tail = [self.tokenizer.decode(tokens[:, i - window + 1 : i + 1])[:, -1:] for i in range(window, t)]
        return torch.cat([head, *tail], dim=1)

    @torch.no_grad()
    def rollout(self, prompt: torch.Tensor, actions: torch.Tensor,
                generator: torch.Generator | None = None) -> torch.Tensor:
        """prompt frames [B, C, H, W] and actions [B, S] -> video [B, S + 1, C, H, W]; frame 0 is the decoded prompt."""
        prompt_tokens = self.tokenizer.encode(prompt[:, None].to(self.device))
        return self.decode(self.generate_tokens(prompt_tokens, actions.to(self.device), generator))

    def to(self, device) -> "World":
        for module in (self.tokenizer, self.action_model, self.dynamics, self.sampler):
            module.to(device)
        return self


def load_stages(run_dir: Path, stages: tuple[str, ...], registry: Registry | None = None) -> dict:
    """The components saved by the given stages of a run folder, by kind."""
    run_dir = Path(run_dir)
    parts = {}
    for stage in stages:
        folder = run_dir / stage
        if not (folder / MANIFEST).is_file():
            raise GenieError(f"{run_dir}: the {stage} stage has not finished (no {folder / MANIFEST}); "
                             f"run `genie run` on its recipe first")
        parts |= load_components(folder, registry or get_registry())
    return parts


def load_world(run_dir: Path, registry: Registry | None = None) -> World:
    """Loads the world of a finished run: its tokenizer, action and dynamics models, and the sampler it was
    evaluated with (saved by the report stage)."""
    return World(**load_stages(run_dir, ("tokenizer", "dynamics", "report"), registry))
