"""`genie agent RUN`: clone the expert of a run's footage through its latent actions and score it in the real game.

For a run whose footage is a game played by a registered policy (Atari; procgen with `policy`), with a trained latent
action model:
    - the latent cloner (the footage's frames -> the LAM's latent actions), trained once, then mapped to real
      actions with N labelled transitions for each N asked (20, 200, 2000 by default)
    - the oracle (the same network on every true action), the run's own expert, random play, and the footage's most
      frequent action played at every step (what an agent scores that learned nothing of when to do what)
each play the same episodes, from seeds the footage never used. Writes RUN/agent/ (RUN/agent-on-... when the footage
is another data set's, `--footage`): agent.json, agent.md, scores.png (score against N, the paper's Figure 16) and
episode.gif (the agent with the most labels, playing).
Both networks train with the stages' engine, with full-state checkpoints under RUN/checkpoints/agent-*, so an
interrupted `genie agent --resume` goes on where it stopped.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import attrs
import numpy as np
import torch

from genie_core.agent.cloning import (
    ClonedAgent,
    ClonedAgentConfig,
    CloningData,
    CloningTask,
    FixedAction,
    FixedActionConfig,
    PolicyNet,
    fit_latent_to_real,
    label,
)
from genie_core.capabilities import PlaysEpisodes
from genie_core.config import AgentConfig, TrainConfig, build_config
from genie_core.data.footage import EpisodeIndex
from genie_core.errors import GenieError
from genie_core.eval.games import game_scores
from genie_core.eval.metrics import action_agreement
from genie_core.interfaces import DataSpec, VideoSource
from genie_core.io.atomic import atomic_dir
from genie_core.io.log import say
from genie_core.io.media import save_gif
from genie_core.registry import get_registry, make_policy
from genie_core.run.folder import RunFolder

GIF_FRAMES = 300  # the first steps of the watched episode: enough to see it play, a GIF of a few MB at most


def imitate(run: Path, settings: AgentConfig | None = None, resume: bool = False, cpu: bool = False,
            footage: Path | None = None) -> dict:
    """settings: None for the run's own (its recipe's [agent] table). footage: another data set to clone from (an
    expert's, built by `genie data build`), labelled with this run's latent actions and scored in its own game, as
    the paper labels expert videos with a latent action model trained on other footage; None: the run's own."""
    folder = RunFolder.find(run)
    with folder.lock():  # it writes checkpoints and RUN/agent: one writer at a time, as for `genie run`
        return _imitate(folder, settings or folder.recipe().agent, resume, cpu, footage)


def footage_source(folder: RunFolder, footage: Path | None) -> tuple[str, VideoSource, EpisodeIndex]:
    """The source that played the footage to clone (its registered name, the source, the data set): the run's own
    recipe's, or the one another data set's manifest records."""
    recipe = folder.recipe()
    if footage is None:
        choice = recipe.components["source"]
        source = choice.info.cls(choice.config, DataSpec(resolution=recipe.data.resolution))
        return choice.name, source, EpisodeIndex.open(folder.data)
    index = EpisodeIndex.open(footage)
    manifest = index.manifest
    if manifest["resolution"] != recipe.data.resolution:
        raise GenieError(f"--footage {footage}: its frames are {manifest['resolution']}x{manifest['resolution']}; "
                         f"the latent action model of {folder.path} reads {recipe.data.resolution}x"
                         f"{recipe.data.resolution} (build it with data.resolution={recipe.data.resolution})")
    name = manifest["source"]["name"]
    info = get_registry().get("source", name)
    problems: list[str] = []
    config = build_config(info.cls.config_class, manifest["source"]["config"], f"{footage} (source {name})", problems)
    if config is None:
        raise GenieError("; ".join(problems))
    return name, info.cls(config, DataSpec(resolution=manifest["resolution"])), index


def _imitate(folder: RunFolder, settings: AgentConfig, resume: bool, cpu: bool, other: Path | None) -> dict:
    from accelerate import Accelerator

    from genie_core.training.engine import Checkpointing, discard_checkpoints, train

    source_name, source, index = footage_source(folder, other)
    data = index.root
    if not isinstance(source, PlaysEpisodes):
        raise GenieError(f"{other or folder.path}: its footage comes from source '{source_name}', which is not a game "
                         f"a policy plays; an agent is scored in the game it imitates ('atari' and 'procgen' are)")
    expert = source.policy()  # before any training: a source whose footage no registered policy played stops here
    used = source.footage_seeds()
    scored = range(settings.first_seed, settings.first_seed + settings.episodes)
    if set(scored) & set(used):
        raise GenieError(f"agent first_seed {settings.first_seed}: the footage was played from seeds {used.start}.."
                         f"{used.stop - 1}; score on seeds it never used (from {used.stop} on)")
    accelerator = Accelerator(cpu=cpu)
    # The world's action model: with the tokenizer a token-input one reads through, and on the training device.
    action_model = folder.world().to(accelerator.device).action_model
    if action_model.reads_true_actions:
        raise GenieError(f"{folder.path}: its action model reads the true actions; cloning through latent actions "
                         f"needs a latent action model")
    resolution = index.manifest["resolution"]
    say(f"genie agent: labelling the footage of {data} with the latent actions of {folder.path}")
    footage = label(action_model, index, "train", accelerator.device)
    recorded = int(sum((a >= 0).sum() for a in footage.true_actions))  # what labels, the oracle and scores can use
    if recorded == 0:
        raise GenieError(f"{data}: its training footage records no actions; the oracle and the latent -> real "
                         f"map need the true actions of the transitions they read")
    if max(settings.labels) > recorded:
        raise GenieError(f"agent labels {max(settings.labels)}: the training footage has {recorded} transitions with a "
                         f"recorded action to draw labels from; ask for at most {recorded}")
    num_real = len(index.manifest.get("action_names") or []) or int(max(a.max() for a in footage.true_actions)) + 1
    # What the networks learn from: the world's latent actions, and the footage (another data set's by its shards)
    identity = [(folder.stage_record("dynamics") or {}).get("id"), None if other is None else index.manifest["shards"]]
    name = "agent" if other is None else f"agent-on-{'-'.join(Path(other).resolve().parts[-2:])}"  # its folder

    def cloned(kind: str, targets, num_outputs: int) -> PolicyNet:
        torch.manual_seed(settings.seed)
        net = PolicyNet(settings.context, num_outputs, resolution)
        cfg = TrainConfig(steps=settings.steps, batch_size=settings.batch_size, seq_len=2, lr=settings.lr,
                          min_lr=settings.lr / 10, warmup_steps=min(100, settings.steps // 10),
                          checkpoint_every=max(1, settings.steps // 4), eval_every=0, log_every=50)
        trained_by = {k: getattr(settings, k) for k in ("context", "steps", "batch_size", "lr", "seed")}
        fingerprint = hashlib.sha256(json.dumps([identity, kind, trained_by], sort_keys=True).encode()).hexdigest()[:16]
        train(accelerator, CloningTask(net), CloningData(footage, targets, settings.context), cfg, settings.seed,
              folder.logs / f"{name}-{kind}.jsonl", f"agent ({kind})",
              Checkpointing(folder.checkpoints(f"{name}-{kind}"), fingerprint, resume))
        return net.cpu()

    latent_net = cloned("latent", footage.latent_actions, action_model.num_actions)
    oracle_net = cloned("oracle", footage.true_actions, num_real)

    spec = expert.spec

    taken = np.concatenate(footage.true_actions)
    commonest = int(np.bincount(taken[taken >= 0]).argmax())
    commonest_name = spec.action_names[commonest] if spec.action_names else str(commonest)
    agents = {"random": make_policy("random", spec),
              f"always {commonest_name} (the footage's most frequent action)":
                  FixedAction(FixedActionConfig(action=commonest), spec),
              f"expert ({registered_name(expert)})": expert,
              "oracle cloning (every true action)": ClonedAgent(ClonedAgentConfig(), spec, oracle_net)}
    mappings = {}
    for labels in settings.labels:
        mappings[labels] = fit_latent_to_real(footage, labels, action_model.num_actions, settings.seed)
        agents[f"latent cloning, {labels} labels"] = ClonedAgent(ClonedAgentConfig(), spec, latent_net,
                                                                 mappings[labels])
    results = {name: game_scores(source, agent, scored, settings.max_steps, desc=name)
               for name, agent in agents.items()}
    watched = f"latent cloning, {max(settings.labels)} labels"  # a GIF of it playing its first scored episode
    frames = source.play(scored.start, agents[watched], keep_frames=True,
                         max_steps=min(GIF_FRAMES, settings.max_steps))[0]
    # What limits latent cloning, where it falls short: how much the latent actions say of the real ones on this
    # footage (NMI; the latent -> real map's accuracy with 10% of the transitions labelled, against always answering
    # the most frequent action).
    agreement = action_agreement(torch.from_numpy(np.concatenate(footage.latent_actions)),
                                 torch.from_numpy(np.concatenate(footage.true_actions)), action_model.num_actions)
    report = {"run": str(folder.path), "footage": str(data), "game": spec.game, "settings": attrs.asdict(settings),
              "transitions": int(sum(a.size for a in footage.true_actions)),
              "latent_vs_true": {k: agreement[k] for k in ("nmi", "mapping_accuracy", "majority_baseline")},
              "latent_to_real": {str(n): m.tolist() for n, m in mappings.items()}, "results": results}
    with atomic_dir(folder.path / name) as out:
        (out / "agent.json").write_text(json.dumps(report, indent=2))
        (out / "agent.md").write_text(markdown(report))
        figure(report, out / "scores.png")
        save_gif(torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255, out / "episode.gif", scale=3, fps=15,
                 captions=[f"{watched}, seed {scored.start}"])
    for kind in ("latent", "oracle"):  # what they protected is written now
        discard_checkpoints(folder.checkpoints(f"{name}-{kind}"))
    say(f"  wrote {folder.path / name / 'agent.md'}")
    return report


def registered_name(policy) -> str:
    """The name a policy is registered under (its class's name for one built outside the registry)."""
    names = [name for (kind, name), info in get_registry().components.items()
             if kind == "policy" and info.cls is type(policy)]
    return names[0] if names else type(policy).__name__


def markdown(report: dict) -> str:
    s, agreement = report["settings"], report["latent_vs_true"]
    rows = [f"| {name} | {r['mean']:.2f} ± {r['ci95']:.2f} |" for name, r in report["results"].items()]
    return "\n".join([
        f"# Agent from unlabeled video: {report['game']}", "",
        f"Cloned from {report['transitions']} transitions of `{report['footage']}`, labelled with the latent actions "
        f"of `{report['run']}`; each agent played {s['episodes']} "
        f"episodes from seeds {s['first_seed']} on (none in the footage), at most {s['max_steps']} steps.", "",
        "| agent | mean score, 95% CI |", "|---|---|", *rows, "",
        f"On the footage, the latent actions against the true ones: NMI {agreement['nmi']:.3f}; latent -> true map "
        f"accuracy {agreement['mapping_accuracy']:.3f} against {agreement['majority_baseline']:.3f} for always the "
        f"most frequent action (what latent cloning can pass on to the real game).", "",
        "![score against labels](scores.png)", "",
        "![an episode](episode.gif) The agent cloned with the most labels, playing its first scored episode.", ""])


def figure(report: dict, path: Path) -> None:
    from genie_core.eval.plots import plt, save

    results = report["results"]
    labels = list(report["settings"]["labels"])
    latent = [results[f"latent cloning, {n} labels"] for n in labels]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.errorbar(labels, [r["mean"] for r in latent], yerr=[r["ci95"] for r in latent], marker="o",
                label="latent cloning")
    for (name, r), style in zip(((n, r) for n, r in results.items() if not n.startswith("latent")),
                                (":", (0, (1, 4)), "--", "-.")):
        ax.axhline(r["mean"], linestyle=style, color="grey", label=name)
    ax.set_xscale("log")
    ax.set_xlabel("labelled transitions")
    ax.set_ylabel("mean score")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    save(fig, path, f"{report['game']}: agents from unlabeled video")
