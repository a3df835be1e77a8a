"""The actions the footage recorded, as the action model ("true-actions"): read, not inferred.

The same dynamics model then trains on real actions instead of latent ones. That makes it the ceiling of
controllability for a recipe (if the dynamics model cannot make dtPSNR positive with the true actions, no latent
action model will), and it is what users of labelled footage ask for. It has no weights and nothing to learn; its
number of actions is the footage's (the source's action names, e.g. procgen's 15 button combinations).
"""

from __future__ import annotations

import attrs
import torch

from genie_core import hookimpl
from genie_core.errors import GenieError
from genie_core.interfaces import ActionModelOutput, LatentActionModel, VideoSpec


@attrs.define(frozen=True, kw_only=True)
class TrueActionsConfig:
    """Nothing to set: the actions and their number come from the footage."""


class TrueActions(LatentActionModel):
    config_class = TrueActionsConfig
    reads_true_actions = True

    @staticmethod
    def check_recipe(config, data, train) -> list[str]:  # noqa: ARG004 - the check_recipe signature
        if train["dynamics"].lam_steps:
            return ["reads the footage's actions and has nothing to train alone: set train.dynamics.lam_steps = 0"]
        return []

    def __init__(self, config: TrueActionsConfig, spec: VideoSpec):
        super().__init__(config, spec)
        if spec.true_actions < 1:
            raise GenieError("action model true-actions reads the actions stored with the footage, and this footage "
                             "records none (its source names no actions: a folder of videos has none); use a latent "
                             "action model such as pixel-lam")

    @property
    def num_actions(self) -> int:
        return self.spec.true_actions

    def infer_actions(self, video: torch.Tensor, true_actions: torch.Tensor | None = None) -> torch.Tensor:
        if true_actions is None:
            raise GenieError("action model true-actions has no actions to read: it needs the footage's actions "
                             "(true_actions), which training and evaluation pass on")
        expected = (video.shape[0], video.shape[1] - 1)
        if tuple(true_actions.shape) != expected:
            raise GenieError(f"action model true-actions: true_actions has shape {list(true_actions.shape)}; the "
                             f"video needs {list(expected)} (one action between each two frames)")
        bad = true_actions[(true_actions < 0) | (true_actions >= self.num_actions)]
        if bad.numel():
            raise GenieError(f"action model true-actions: the footage has action {int(bad[0])} where 0.."
                             f"{self.num_actions - 1} were expected (-1: a transition without a recorded action)")
        return true_actions.long()

    def loss(self, video: torch.Tensor, true_actions: torch.Tensor | None = None) -> ActionModelOutput:
        actions = self.infer_actions(video, true_actions)
        # Nothing is reconstructed: the frame before stands in for the prediction of the frame after.
        return ActionModelOutput(loss=video.new_zeros(()), actions=actions, recon=video[:, :-1], metrics={})


@hookimpl
def genie_register_components(registrar):
    registrar.add_action_model("true-actions", TrueActions)
