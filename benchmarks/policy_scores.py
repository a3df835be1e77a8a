"""How well the registered policies play a recipe's game: the mean score over N episodes with its 95% interval, each
episode played from its own seed (a procgen level) as the recipe's source plays its footage, on seeds no footage of
the recipe uses (so these are the scores of the footage a policy makes, and of the players `genie agent` compares).

    python benchmarks/policy_scores.py --recipe recipes/breakout-agent.toml --policies random breakout-ram-expert
    python benchmarks/policy_scores.py --recipe recipes/coinrun-agent.toml --policies random coinrun-lookahead-expert

Prints a table; saves benchmarks/results/policy-scores-GAME.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import attrs

from genie_core.capabilities import PlaysEpisodes
from genie_core.config import DataConfig
from genie_core.eval.games import game_scores
from genie_core.interfaces import DataSpec
from genie_core.io.machine import describe as describe_machine
from genie_core.recipe import load_recipe

REPO = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", type=Path, default=REPO / "recipes" / "breakout-agent.toml")
    parser.add_argument("--policies", nargs="+", default=["random", "breakout-ram-expert"])
    parser.add_argument("--episodes", type=int, default=20)
    parser.add_argument("--first-seed", type=int, default=10_000, help="episodes use seeds from here on")
    parser.add_argument("--max-steps", type=int, default=2000, help="steps per episode at most")
    args = parser.parse_args()
    recipe = load_recipe(args.recipe)
    choice = recipe.components["source"]
    if not issubclass(choice.info.cls, PlaysEpisodes):
        sys.exit(f"error: {args.recipe}: source '{choice.name}' is not a game a policy plays")
    rows = {}
    for policy in args.policies:
        config = attrs.evolve(choice.config, policy=policy)
        problems = choice.info.cls.check_recipe(config, DataConfig(), recipe.train)
        if problems:
            sys.exit(f"error: {'; '.join(problems)}")
        source = choice.info.cls(config, DataSpec(resolution=16))  # the frames are not kept: any resolution will do
        if set(source.footage_seeds()) & set(range(args.first_seed, args.first_seed + args.episodes)):
            sys.exit(f"error: --first-seed {args.first_seed}: the recipe's footage uses seeds "
                     f"{source.footage_seeds().start}..{source.footage_seeds().stop - 1}")
        start = time.perf_counter()
        seeds = range(args.first_seed, args.first_seed + args.episodes)
        rows[policy] = {**game_scores(source, source.policy(), seeds, args.max_steps, desc=policy),
                        "seconds": round(time.perf_counter() - start, 1)}
    game = choice.config.game
    print(f"| policy ({game}, {args.episodes} episodes of at most {args.max_steps} steps) | mean score, 95% CI |")
    print("|---|---|")
    for policy, row in rows.items():
        print(f"| {policy} | {row['mean']:.2f} ± {row['ci95']:.2f} |")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"policy-scores-{game.lower()}.json"
    out.write_text(json.dumps({"recipe": str(args.recipe), "game": game, "episodes": args.episodes,
                               "first_seed": args.first_seed, "max_steps": args.max_steps, "policies": rows,
                               "machine": describe_machine()}, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
