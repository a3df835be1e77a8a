"""How well the registered policies play a game: the mean score over N episodes with its 95% interval, each
episode played from its own seed as `genie data build atari` plays them (so these are the scores of the footage a
policy makes).

    python benchmarks/policy_scores.py --game Breakout --policies random breakout-ram-expert --episodes 20

Prints a table; saves benchmarks/results/policy-scores-GAME.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from genie_core.eval.metrics import mean_and_ci
from genie_core.interfaces import DataSpec
from genie_core.io.machine import describe as describe_machine
from genie_plugins.atari_source import AtariConfig, AtariSource

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--game", default="Breakout")
    parser.add_argument("--policies", nargs="+", default=["random", "breakout-ram-expert"])
    parser.add_argument("--episodes", type=int, default=20)
    parser.add_argument("--first-seed", type=int, default=10_000, help="episodes use seeds from here on")
    parser.add_argument("--max-steps", type=int, default=2000, help="steps per episode at most")
    args = parser.parse_args()
    rows = {}
    for policy in args.policies:
        config = AtariConfig(game=args.game, policy=policy, train_episodes=args.first_seed + args.episodes,
                             val_episodes=1, max_steps_per_episode=args.max_steps)
        problems = AtariSource.check_recipe(config, None, None)
        if problems:
            sys.exit(f"error: {'; '.join(problems)}")
        source = AtariSource(config, DataSpec(resolution=16))  # the frames are not kept: any resolution will do
        start = time.perf_counter()
        scores = [source.play(seed, source.policy(), keep_frames=False)[2] for seed in
                  tqdm(range(args.first_seed, args.first_seed + args.episodes), desc=policy, unit="episode")]
        rows[policy] = {**mean_and_ci(torch.tensor(scores)), "scores": scores,
                        "seconds": round(time.perf_counter() - start, 1)}
    print(f"| policy ({args.game}, {args.episodes} episodes of at most {args.max_steps} steps) | mean score, 95% CI |")
    print("|---|---|")
    for policy, row in rows.items():
        print(f"| {policy} | {row['mean']:.2f} ± {row['ci95']:.2f} |")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"policy-scores-{args.game.lower()}.json"
    out.write_text(json.dumps({"game": args.game, "episodes": args.episodes, "first_seed": args.first_seed,
                               "max_steps": args.max_steps, "policies": rows, "machine": describe_machine()},
                              indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
