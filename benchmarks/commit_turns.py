"""The training steps of two versions of the code taking turns: how much faster one commit trains than another.

    python benchmarks/commit_turns.py BASE [KEY=VALUE ...] [--recipe recipes/coinrun-tiny.toml] \
        [--variants recipe,compile,compile+bf16] [--stages tokenizer,dynamics] [--rounds 6] [--steps 12] \
        [--warmup 3] [--head REV] [--base-variants compile] [--out DIR]

step_turns.py compares variants of one version of the code in one process. Across commits that cannot work (two
versions of genie_core do not import into one process), and two runs of stage_throughput.py minutes apart differ by
20 to 40% on a shared machine. So here each version trains in processes of its own, and the versions take turns: a
round runs one process per (version, variant), one after the other (each round starting one further along the
list), each timing `--steps` steps of every stage after `--warmup` untimed ones (compiling, for a compiled variant).
The median over the rounds of each one's steps/s over the base's plain steps/s in the same round is its speed-up,
and the range shows how far the machine moved it. `--base-variants` runs variants of the base as well (the base's
plain recipe stays the yardstick), and a variant run by both versions is also given as the head's over the base's.

BASE and --head are git revisions of this repository (--head: the working tree when not given); each is exported with
`git archive` into a temporary folder, and its processes import its genie_core and plugins from there. Every version
trains the same recipe (its own copy of the file, as that version reads it: the models must match) on the same
random batch, each stage from freshly built weights of the same seed, as its own `genie` trained then: its engine's
optimizer (the fused AdamW where the engine has it, else the AdamW of that engine), gradient clipping at the stage's
grad_clip, and the memory allocator setting `genie` made then (keep_freed_memory, where that version has it). A
variant is `recipe` with changes joined by "+": `compile` (train.*.compile, where that version has it) and `bf16`
(autocast). The warm-up losses of every process are printed and saved: two versions that train the same steps give
the same losses to float rounding. JSON to benchmarks/results/ (or --out) as
commit-turns-RUNNAME-BASE-vs-HEAD.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
CHANGES = ("compile", "bf16")
STAGES = ("tokenizer", "dynamics")
WORKING_TREE = "working-tree"


def parse_variants(text: str, option: str = "--variants") -> list[str]:
    """"recipe,compile+bf16" -> ["recipe", "compile+bf16"], every change known."""
    variants = text.split(",")
    for name in variants:
        unknown = sorted(set(name.split("+")) - {"recipe", *CHANGES})
        if unknown or not name:
            raise ValueError(f"{option}: unknown change {(unknown[0] if unknown else name)!r}; choose from "
                             f"recipe, {', '.join(CHANGES)}, joined by '+'")
    return variants


def export(revision: str | None, folder: Path) -> tuple[Path, Path, str]:
    """The tree of `revision` (None: the working tree itself) as an importable checkout: (the folder to put on
    PYTHONPATH, the tree's root, its short name). The plugins folder is the package genie_plugins, as pyproject maps
    it."""
    if revision is None:
        root, name = REPO, WORKING_TREE
    else:
        found = subprocess.run(["git", "rev-parse", "--short", f"{revision}^{{commit}}"], cwd=REPO,
                               capture_output=True, text=True)
        if found.returncode != 0:
            raise ValueError(f"{revision!r} is not a commit of {REPO}")
        name = found.stdout.strip()
        root = folder / "tree"
        root.mkdir(parents=True)
        archive = subprocess.run(["git", "archive", name], cwd=REPO, capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(root)], input=archive, check=True)
    path = folder / "import"
    path.mkdir(parents=True)
    (path / "genie_core").symlink_to(root / "genie_core")
    (path / "genie_plugins").symlink_to(root / "plugins")
    return path, root, name


def stage_task(recipe, stage: str):
    """(the stage's training task, a random batch of its shape, its train config), built as stage_throughput.py
    builds them, through the interfaces every version has; each stage from the same seed, the dynamics stage on a
    fresh tokenizer, so that every version starts a stage from the same weights."""
    import torch

    from genie_core.interfaces import TokenSpec, VideoSpec
    from genie_core.training.engine import TokenizerTask, WorldModelTask

    res, c, cfg = recipe.data.resolution, recipe.components, recipe.train[stage]
    torch.manual_seed(0)
    video = VideoSpec(height=res, width=res, num_frames=cfg.seq_len)
    batch = torch.rand(cfg.batch_size, cfg.seq_len, 3, res, res)
    # the tokenizer as its own stage builds it, for its own window length, also when the dynamics stage freezes it
    tokenizer = c["tokenizer"].info.cls(c["tokenizer"].config, VideoSpec(
        height=res, width=res, num_frames=recipe.train["tokenizer"].seq_len))
    if stage == "tokenizer":
        return TokenizerTask(tokenizer), batch, cfg
    action_model = c["action_model"].info.cls(c["action_model"].config, video)
    action_model.use_tokenizer(tokenizer)
    dynamics = c["dynamics"].info.cls(c["dynamics"].config, TokenSpec(
        vocab_size=tokenizer.codebook_size, grid=tokenizer.grid, num_frames=cfg.seq_len,
        num_actions=action_model.num_actions))
    return WorldModelTask(action_model, dynamics, tokenizer), batch, cfg


def training_step(task, batch, cfg, changes: set[str]):
    """One step as this version's engine takes it (its optimizer, gradient clipping), with `changes`; returns a
    function that runs it and gives the loss. step_turns.py's step is the same, but that module imports today's
    genie_core API at its top, which an older version may not have: this one asks for nothing a version lacks."""
    import torch

    import genie_core.nn
    from genie_core.training import engine

    task.train()
    if "compile" in changes:
        genie_core.nn.compile_block_stacks(task)
    params = [p for p in task.parameters() if p.requires_grad]
    optimizer = (engine.adamw(params, cfg) if hasattr(engine, "adamw") else  # the fused AdamW, where it has it
                 torch.optim.AdamW(params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay))
    precision = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if "bf16" in changes else contextlib.nullcontext

    def step() -> float:
        with precision():
            loss, _ = task(batch)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return step


def turn(args) -> dict:
    """One process's turn (PYTHONPATH first names the version's import folder): every stage's steps/s and warm-up
    losses, or why this version cannot run the variant."""
    import torch

    import genie_core.io.machine
    import genie_core.nn
    from genie_core.recipe import load_recipe

    where = Path(genie_core.__file__).resolve().parent
    wanted = (Path(os.environ["PYTHONPATH"].split(os.pathsep)[0]) / "genie_core").resolve()
    if where != wanted:
        raise SystemExit(f"commit_turns: genie_core came from {where}, not from {wanted}")
    changes = set(args.turn.split("+")) - {"recipe"}
    if "compile" in changes and not hasattr(genie_core.nn, "compile_block_stacks"):
        return {"skipped": "this version has no train.*.compile"}
    if hasattr(genie_core.io.machine, "keep_freed_memory"):
        genie_core.io.machine.keep_freed_memory()  # what `genie` of this version did before computing
    recipe = load_recipe(Path(args.recipe), args.overrides)
    out = {"environment": genie_core.io.machine.describe(), "stages": {}}
    for stage in args.stages.split(","):
        step = training_step(*stage_task(recipe, stage), changes)
        torch.manual_seed(1)  # the same masks and draws in every process's warm-up
        losses = [step() for _ in range(args.warmup)]
        start = time.perf_counter()
        for _ in range(args.steps):
            step()
        out["stages"][stage] = {"steps_per_s": args.steps / (time.perf_counter() - start), "warmup_losses": losses}
    return out


def take_turns(entries: list[tuple[str, Path, Path, str]], args) -> dict:
    """entries: (label, import folder, tree root, variant); every round runs each once, starting one further along
    each time. Returns each label's steps/s per round, warm-up losses, and median ratio (and range) to the first
    entry's in the same round."""
    stages = args.stages.split(",")
    runs = {label: {"variant": variant, "steps_per_s": {s: [] for s in stages}} for label, _, _, variant in entries}
    for round_ in range(args.rounds):
        shift = round_ % len(entries)  # each round starts with another entry: no version always runs first
        for label, path, root, variant in entries[shift:] + entries[:shift]:
            if "skipped" in runs[label]:  # a variant this version cannot run: said once
                continue
            command = [sys.executable, __file__, "--turn", variant, "--recipe", str(root / args.recipe),
                       "--stages", args.stages, "--steps", str(args.steps), "--warmup", str(args.warmup),
                       *args.overrides]
            env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(path), os.environ.get("PYTHONPATH")]))}
            done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=root)
            if done.returncode != 0:
                raise SystemExit(f"commit_turns: {label} failed in round {round_ + 1}:\n{done.stderr[-3000:]}")
            result, run = json.loads(done.stdout.strip().splitlines()[-1]), runs[label]
            if "skipped" in result:
                run["skipped"] = result["skipped"]
                continue
            run["environment"] = result["environment"]
            for stage, measured in result["stages"].items():
                run["steps_per_s"][stage].append(measured["steps_per_s"])
                run.setdefault("warmup_losses", {})[stage] = measured["warmup_losses"]
            rates = ", ".join(f"{s} {r['steps_per_s']:.2f}" for s, r in result["stages"].items())
            print(f"  round {round_ + 1}: {label:<24} {rates} steps/s", flush=True)
    first = runs[entries[0][0]]["steps_per_s"]
    for run in runs.values():
        if "skipped" in run:
            continue
        ratios = {s: [mine / theirs for mine, theirs in zip(rates, first[s])]
                  for s, rates in run["steps_per_s"].items()}
        run["median_steps_per_s"] = {s: statistics.median(rates) for s, rates in run["steps_per_s"].items()}
        run["ratio_to_first"] = {s: statistics.median(r) for s, r in ratios.items()}
        run["ratio_range"] = {s: [min(r), max(r)] for s, r in ratios.items()}
    return runs


def working_tree_state() -> dict:
    """The commit the working tree stands on and the tracked files it changes, for the record of what was measured."""
    def git(*words: str) -> str:
        return subprocess.run(["git", *words], cwd=REPO, capture_output=True, text=True).stdout.strip()

    return {"working_tree_at": git("rev-parse", "--short", "HEAD"),
            "changed_files": git("status", "--porcelain", "--untracked-files=no").splitlines()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("base", nargs="?", help="the git revision to compare with")
    parser.add_argument("overrides", nargs="*", help="recipe overrides, KEY=VALUE, for both versions")
    parser.add_argument("--recipe", type=Path, default=Path("recipes/coinrun-tiny.toml"),
                        help="relative to the repository: each version trains its own copy of it")
    parser.add_argument("--head", help="the git revision measured against BASE (default: the working tree)")
    parser.add_argument("--variants", default="recipe",
                        help="variants of the head, each beside the base's plain recipe (comma-separated)")
    parser.add_argument("--base-variants", default="",
                        help="variants of the base to run too, beside its plain recipe (comma-separated): "
                             "`compile` compares the two versions' compiled steps")
    parser.add_argument("--stages", default=",".join(STAGES), help="tokenizer, dynamics or both")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--steps", type=int, default=12, help="timed steps of each stage in a turn")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps of each stage first (compiling)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for the JSON (default benchmarks/results)")
    parser.add_argument("--turn", help=argparse.SUPPRESS)  # inside one version's process: run one turn
    args = parser.parse_args(argv)
    if args.turn:  # a turn has no BASE: every positional is a recipe override
        args.overrides = [args.base, *args.overrides] if args.base else args.overrides
        print(json.dumps(turn(args)))
        return 0
    if args.base is None:
        parser.error("BASE: name the git revision to compare with")
    try:
        variants = parse_variants(args.variants)
        extra = parse_variants(args.base_variants, "--base-variants") if args.base_variants else []
        base_variants = ["recipe"] + [variant for variant in extra if variant != "recipe"]  # plain first: the yardstick
    except ValueError as error:
        parser.error(str(error))
    if not args.stages or set(args.stages.split(",")) - set(STAGES):
        parser.error(f"--stages: choose from {', '.join(STAGES)}")
    if args.recipe.is_absolute():
        parser.error("--recipe: give the path inside the repository (each version reads its own copy)")
    with tempfile.TemporaryDirectory(prefix="commit-turns-") as folder:
        try:
            base_path, base_root, base = export(args.base, Path(folder) / "base")
            head_path, head_root, head = export(args.head, Path(folder) / "head")
        except ValueError as error:
            parser.error(str(error))
        for root, name in ((base_root, base), (head_root, head)):
            if not (root / args.recipe).is_file():
                parser.error(f"--recipe: {name} has no {args.recipe}")
        entries = [(f"base {base} {variant}", base_path, base_root, variant) for variant in base_variants]
        entries += [(f"head {head} {variant}", head_path, head_root, variant) for variant in variants]
        print(f"{len(entries)} processes a round, {args.rounds} rounds, {args.steps} timed steps a stage")
        runs = take_turns(entries, args)
    print(f"speed-up over {base}'s plain steps, median of {args.rounds} rounds (range):")
    for label, run in runs.items():
        if "skipped" in run:
            print(f"  {label:<30} skipped: {run['skipped']}")
            continue
        cells = [f"{s} {run['median_steps_per_s'][s]:.2f} steps/s {run['ratio_to_first'][s]:.2f}x "
                 f"({run['ratio_range'][s][0]:.2f}-{run['ratio_range'][s][1]:.2f})" for s in run["steps_per_s"]]
        print(f"  {label:<30} " + "; ".join(cells))
        for stage, losses in run["warmup_losses"].items():
            print(f"  {'':<30} {stage} warm-up losses: " + ", ".join(f"{loss:.6f}" for loss in losses))
    for variant in [v for v in variants if v in base_variants[1:]]:  # the same variant of both: head over base
        mine, theirs = runs[f"head {head} {variant}"], runs[f"base {base} {variant}"]
        if "skipped" in mine or "skipped" in theirs:
            continue
        ratios = {s: sorted(a / b for a, b in zip(mine["steps_per_s"][s], theirs["steps_per_s"][s]))
                  for s in mine["steps_per_s"]}
        mine[f"ratio_to_base_{variant}"] = {s: statistics.median(r) for s, r in ratios.items()}
        print(f"  head {variant} over base {variant}: " + "; ".join(
            f"{s} {statistics.median(r):.2f}x ({r[0]:.2f}-{r[-1]:.2f})" for s, r in ratios.items()))
    name = next((o.split("=", 1)[1] for o in args.overrides if o.startswith("run.name=")), args.recipe.stem)
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / f"commit-turns-{name}-{base}-vs-{head}.json"
    head_tree = working_tree_state() if head == WORKING_TREE else head
    out.write_text(json.dumps({"recipe": str(args.recipe), "overrides": args.overrides, "base": base, "head": head_tree,
                               "variants": variants, "base_variants": base_variants, "rounds": args.rounds,
                               "steps": args.steps, "warmup": args.warmup, "runs": runs}, indent=2))
    print(f"saved {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
