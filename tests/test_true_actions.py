"""The `true-actions` action model: the footage's recorded actions, read instead of inferred, through training,
evaluation and play; refused, with the reason, where the footage has none."""

from __future__ import annotations

import json

import attrs
import pytest
import torch

from genie_core.cli import main
from genie_core.errors import GenieError
from genie_core.testing import TINY_VIDEO, build, video
from genie_core.training.engine import WorldModelTask

from conftest import REPO

SMOKE = str(REPO / "recipes" / "coinrun-smoke.toml")


def test_it_reads_the_given_actions_and_checks_them():
    model = build("action_model", "true-actions", TINY_VIDEO)
    x = video()
    given = torch.tensor([[0, 1, 2, 3, 0], [3, 3, 2, 1, 0]])
    assert model.num_actions == TINY_VIDEO.true_actions == 4
    assert torch.equal(model.infer_actions(x, given), given)
    assert torch.equal(model.loss(x, given).recon, x[:, :-1]) and model.loss(x, given).loss == 0
    with pytest.raises(GenieError, match="has no actions to read"):
        model.infer_actions(x)
    with pytest.raises(GenieError, match=r"the footage has action -1 where 0..3 were expected"):
        model.infer_actions(x, given - 1)
    with pytest.raises(GenieError, match=r"shape \[2, 4\]; the video needs \[2, 5\]"):
        model.infer_actions(x, given[:, :4])


def test_footage_without_actions_is_refused_with_the_reason():
    with pytest.raises(GenieError, match="this footage records none .* use a latent action model"):
        build("action_model", "true-actions", attrs.evolve(TINY_VIDEO, true_actions=0))


def test_training_hands_the_recorded_actions_to_the_dynamics_model():
    """The dynamics model is trained on exactly the footage's actions (a batch carries them beside the video)."""
    seen = []

    class Spy(torch.nn.Module):
        def loss(self, tokens, actions, generator=None):
            seen.append(actions)
            return type("Out", (), {"loss": torch.zeros((), requires_grad=True), "metrics": {}})()

    tokenizer = build("tokenizer", "st-vivit", TINY_VIDEO).eval()
    task = WorldModelTask(build("action_model", "true-actions", TINY_VIDEO), Spy(), tokenizer)
    x, given = video(), torch.tensor([[0, 1, 2, 3, 0], [3, 3, 2, 1, 0]])
    task((x, given))
    assert torch.equal(seen[0], given)


def test_a_bf16_run_trains_on_the_tokens_and_actions_of_play_time():
    """Under bf16 autocast the frozen tokenizer and a frozen action model still compute in float32, as at play time:
    the dynamics model is handed what a float32 run would hand it; so is an action model that reads tokens."""
    seen, autocast_in = [], []

    class Spy(torch.nn.Module):
        def loss(self, tokens, actions, generator=None):
            seen.append((tokens, actions))
            return type("Out", (), {"loss": torch.zeros((), requires_grad=True), "metrics": {}})()

    def watched(method):
        def call(*args, **kwargs):
            autocast_in.append(torch.is_autocast_enabled("cpu"))
            return method(*args, **kwargs)
        return call

    tokenizer = build("tokenizer", "st-vivit", TINY_VIDEO).eval()
    action_model = build("action_model", "true-actions", TINY_VIDEO)
    task = WorldModelTask(action_model, Spy(), tokenizer, train_action_model=False)
    x, given = video(), torch.tensor([[0, 1, 2, 3, 0], [3, 3, 2, 1, 0]])
    exact = tokenizer.encode(x)
    tokenizer.encode, action_model.infer_actions = watched(tokenizer.encode), watched(action_model.infer_actions)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        task((x, given))
    assert autocast_in == [False, False]  # the encode, then the actions
    assert torch.equal(seen[0][0], exact) and torch.equal(seen[0][1], given)

    token_lam = build("action_model", "token-lam", TINY_VIDEO)  # reads a frozen tokenizer's tokens while it trains
    frozen = token_lam._tokenizer[0]
    frozen.encode = watched(frozen.encode)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        token_lam.loss(x)
    assert autocast_in == [False, False, False]


def test_lam_steps_make_no_sense_without_a_model_to_train(capsys):
    assert main(["validate", SMOKE, "action_model.name=true-actions", "train.dynamics.lam_steps=5"]) == 2
    assert "(true-actions): reads the footage's actions and has nothing to train alone" in capsys.readouterr().err


def test_a_world_trained_on_true_actions_end_to_end(tmp_path):
    """The smoke recipe with true actions: trains, reports, and is scored on the footage's own 15 actions (so the
    actions it is driven by agree with the true ones exactly)."""
    out = tmp_path / "true"
    assert main(["run", SMOKE, "action_model.name=true-actions", "run.trackers=none", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["components"]["action_model"] == "true-actions" and report["num_actions"] == 15
    assert report["actions_vs_true_nmi"] == pytest.approx(1.0)
    assert main(["eval", str(out)]) == 0
    result = json.loads((out / "eval" / "eval.json").read_text())
    assert result["actions_vs_true"]["nmi"] == pytest.approx(1.0)
    classes = result["actions_vs_true_classes"]  # procgen's classes of actions that do the same thing
    assert classes["classes"] == ["LEFT", "LEFT+JUMP", "NOOP", "JUMP", "RIGHT", "RIGHT+JUMP"] and classes["nmi"] > 0
