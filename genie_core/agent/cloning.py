"""Behavioural cloning through latent actions.

    1. label      the trained latent action model infers the latent action of every transition of the footage
    2. clone      a policy network learns to predict that latent action from the frames up to it (no true action)
    3. map        N labelled transitions fit latent -> real action (each latent to the real action it is seen with
                  most often among them)
    4. play       the network picks a latent action from the screens so far, the map turns it into a real one

The oracle is the same network trained on the footage's true actions: what cloning could reach with every label.
Only the N labelled transitions, the oracle and the scoring ever read the true actions.
"""

from __future__ import annotations

from collections import deque

import attrs
import numpy as np
import torch
from torch import nn

from genie_core.data.footage import EpisodeIndex
from genie_core.interfaces import LatentActionModel, Policy, PolicySpec
from genie_core.io.media import resize_frames
from genie_core.world.model import infer_actions_in_windows


@attrs.frozen
class Footage:
    """The frames of one split, episode by episode, with each transition's true and latent action."""

    frames: list[np.ndarray]  # uint8 [L, H, W, 3] per episode
    true_actions: list[np.ndarray]  # int [L - 1] per episode
    latent_actions: list[np.ndarray]  # int [L - 1] per episode


@torch.no_grad()
def label(action_model: LatentActionModel, index: EpisodeIndex, split: str, device="cpu") -> Footage:
    """Every transition of the split's episodes with the latent action the model infers for it, read in windows of
    the model's length that overlap by one frame (each transition once, with the frames before it in its window)."""
    action_model = action_model.to(device).eval()
    frames, true_actions, latent_actions = [], [], []
    for video, actions in index.episode_arrays(split):
        clip = torch.from_numpy(video).permute(0, 3, 1, 2).float()[None].to(device) / 255
        frames.append(video)
        true_actions.append(actions)
        latent_actions.append(infer_actions_in_windows(action_model, clip)[0].cpu().numpy())
    return Footage(frames, true_actions, latent_actions)


class CloningData(torch.utils.data.Dataset):
    """(the last `context` frames up to t, stacked [3 * context, H, W] in [0, 1]; the action taken at t), over every
    transition whose target is known (>= 0). Before an episode's start the first frame is repeated."""

    def __init__(self, footage: Footage, targets: list[np.ndarray], context: int):
        self.footage, self.targets, self.context = footage, targets, context
        self.items = [(e, t) for e, target in enumerate(targets) for t in np.flatnonzero(target >= 0)]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        episode, t = self.items[i]
        frames = self.footage.frames[episode]
        chosen = [max(0, t - k) for k in range(self.context - 1, -1, -1)]
        return stack_frames(frames[chosen]), torch.tensor(int(self.targets[episode][t]))


def stack_frames(frames: np.ndarray) -> torch.Tensor:
    """uint8 [C, H, W, 3] -> float [3 * C, H, W] in [0, 1], oldest first."""
    return torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).flatten(0, 1).float() / 255


class PolicyNet(nn.Module):
    """The cloned policy: the last `context` frames -> logits over `num_outputs` actions. The convolutional torso of
    the DQN agents that played these games (strides 4, 2, 1), sized for 64x64 frames."""

    def __init__(self, context: int, num_outputs: int, resolution: int, width: int = 32):
        super().__init__()
        self.context, self.num_outputs, self.resolution = context, num_outputs, resolution
        self.torso = nn.Sequential(
            nn.Conv2d(3 * context, width, 8, stride=4), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 4, stride=2), nn.ReLU(),
            nn.Conv2d(2 * width, 2 * width, 3, stride=1), nn.ReLU(), nn.Flatten())
        with torch.no_grad():
            features = self.torso(torch.zeros(1, 3 * context, resolution, resolution)).shape[1]
        self.head = nn.Sequential(nn.Linear(features, 256), nn.ReLU(), nn.Linear(256, num_outputs))

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        return self.head(self.torso(frames))


class CloningTask(nn.Module):
    """The engine's task: cross-entropy of the network's logits against the targets (latent or true actions)."""

    def __init__(self, net: PolicyNet):
        super().__init__()
        self.net = net

    def forward(self, batch):
        frames, targets = batch
        logits = self.net(frames)
        loss = nn.functional.cross_entropy(logits, targets)
        return loss, {"accuracy": (logits.argmax(-1) == targets).float().mean().detach()}

    def warning(self, metrics):  # noqa: ARG002 - the Task signature
        return None


def fit_latent_to_real(footage: Footage, labels: int, num_latent: int, seed: int = 0) -> np.ndarray:
    """latent action -> real action, from `labels` transitions drawn at random (with `seed`): each latent action to
    the real action it comes with most often among them; a latent action never seen there to the most frequent real
    action of the labelled transitions."""
    latent = np.concatenate(footage.latent_actions)
    real = np.concatenate(footage.true_actions)
    known = np.flatnonzero(real >= 0)
    chosen = np.random.default_rng(seed).choice(known, size=min(labels, known.size), replace=False)
    num_real = int(real[known].max()) + 1
    counts = np.zeros((num_latent, num_real), dtype=np.int64)
    np.add.at(counts, (latent[chosen], real[chosen]), 1)
    majority = int(counts.sum(0).argmax())
    return np.where(counts.sum(1) > 0, counts.argmax(1), majority)


@attrs.define(frozen=True, kw_only=True)
class FixedActionConfig:
    action: int = attrs.field(default=0, validator=attrs.validators.ge(0))


class FixedAction(Policy):
    """The same action at every step: played with the footage's most frequent one, the score of an agent that
    learned nothing of when to do what (what latent cloning falls to when its latent actions say nothing)."""

    config_class = FixedActionConfig

    def reset(self, seed: int) -> None:  # noqa: ARG002 - the Policy signature
        pass

    def act(self, observation, info) -> int:  # noqa: ARG002 - the Policy signature
        return self.config.action


@attrs.define(frozen=True, kw_only=True)
class ClonedAgentConfig:
    greedy: bool = False  # False: sample from the network's softmax (as the footage's own randomness did)


class ClonedAgent(Policy):
    """A cloned network playing the real game: its screens, resized to the footage's resolution, the last `context`
    of them stacked; its output (a latent action, or a real one for the oracle) through `to_real` if given."""

    config_class = ClonedAgentConfig

    def __init__(self, config: ClonedAgentConfig, spec: PolicySpec, net: PolicyNet,
                 to_real: np.ndarray | None = None):
        super().__init__(config, spec)
        self.net, self.to_real = net.eval(), to_real
        self.history: deque = deque(maxlen=net.context)

    def reset(self, seed: int) -> None:
        self.generator = torch.Generator().manual_seed(seed)
        self.history.clear()

    @torch.no_grad()
    def act(self, observation, info) -> int:  # noqa: ARG002 - the Policy signature
        frame = resize_frames(observation[None], self.net.resolution)[0]
        while len(self.history) < self.net.context - 1:
            self.history.append(frame)  # the first screen stands for the ones before the start
        self.history.append(frame)
        logits = self.net(stack_frames(np.stack(self.history))[None])[0]
        choice = int(logits.argmax()) if self.config.greedy else int(
            torch.multinomial(logits.softmax(-1), 1, generator=self.generator))
        return int(self.to_real[choice]) if self.to_real is not None else choice
