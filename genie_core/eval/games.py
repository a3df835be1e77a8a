"""Scores in the real game: a policy plays one episode per seed of a source that is a game (`PlaysEpisodes`), and
the scores are summed up with their 95% interval. `genie agent` and benchmarks/policy_scores.py score players so."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from genie_core.eval.metrics import mean_and_ci


def game_scores(source, policy, seeds, max_steps: int | None = None, desc: str | None = None) -> dict:
    """{mean, ci95, n, scores}: the policy's score in each seed's episode (at most `max_steps` steps; None: the
    source's own limit), its frames not kept."""
    scores = [source.play(seed, policy, keep_frames=False, max_steps=max_steps)[2]
              for seed in tqdm(seeds, desc=desc, unit="episode")]
    return {**mean_and_ci(torch.tensor(scores)), "scores": scores}
