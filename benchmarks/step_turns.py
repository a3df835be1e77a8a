"""Variants of a recipe's training steps taking turns in one process: how much faster one is than another.

    python benchmarks/step_turns.py recipes/coinrun-tiny.toml [KEY=VALUE ...] \
        --variants recipe,adamw-loop,compile [--stages tokenizer,dynamics] [--rounds 8] [--block 5] [--warmup 3] \
        [--profile]

On a shared machine one run of the same command can be 20 to 40% faster than the next, so two separate runs of
stage_throughput.py cannot tell a 10% lever from the machine. Here every variant trains its own copy of the same
freshly built models on the same random batch, and the variants take turns: `--block` steps of each, `--rounds`
times over. Each round gives every variant's steps/s beside the first variant's, measured moments apart; the
median of those ratios over the rounds is the speed-up, and its range shows how far the machine moved it.

A variant is the recipe as it trains (`recipe`: the engine's optimizer, and the stage's `activation_checkpointing` and
`compile` keys) with changes joined by "+":
  compile          the trained models' transformer stacks through torch.compile (train.*.compile)
  checkpointing    activation checkpointing in them (train.*.activation_checkpointing)
  adamw-loop       torch's AdamW that loops over the parameters (its default on a CPU), not the fused one
  adamw-foreach    torch's AdamW on its multi-tensor (foreach) path
  sdpa-math        every attention on SDPA's plain math kernel instead of the fused one torch picks
  compiled-sdpa    with compile: the compiled stacks attend through torch's fused SDPA kernel on a CPU, not written
                   out (genie_core.nn.COMPILED_CPU_TRAINING_ATTENTION)
  bf16             the forward pass under bf16 autocast (run.mixed_precision = "bf16"; on a CPU attention stays in
                   float32, except written out in compiled stacks; not the same losses)
A step is the engine's: forward, backward, gradient clipping at the stage's grad_clip, the optimizer's step. Each
variant's losses on its warm-up steps (the same seed for every variant) are printed and saved beside its speed: a
change that only changes speed leaves them equal to float rounding. So are a step's page faults and system time (the
memory allocator's share: run the command under another allocator setting to compare), and this machine's rate on one
large matrix product in float32 and, where the device has bf16 units, in bf16 (what bf16 could give the products at
most). With `--profile`, one more turn of each variant runs under torch.profiler and its time is split by kind of
work: matrix products, attention, compiled code, copies, layer norms, the rest, and the operations that took most.
What a perfect compiler could still take away is the share outside the products and attention. JSON to
benchmarks/results/ (or --out) as turns-RUNNAME-VARIANTS.json.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import genie_core.nn
from genie_core.io.machine import bf16_units, keep_freed_memory
from genie_core.nn import compile_block_stacks, use_activation_checkpointing
from genie_core.recipe import load_recipe
from genie_core.training.engine import adamw

sys.path.insert(0, str(Path(__file__).resolve().parent))
from stage_throughput import RESULTS, environment, matmul_gflop_per_s, tokenizer_stage, world_stage  # noqa: E402

CHANGES = ("compile", "checkpointing", "adamw-loop", "adamw-foreach", "sdpa-math", "compiled-sdpa", "bf16")
STAGES = ("tokenizer", "dynamics")


def parse_variants(text: str) -> list[tuple[str, set[str]]]:
    """"recipe,compile+adamw-loop" -> [("recipe", set()), ("compile+adamw-loop", {"compile", "adamw-loop"})]."""
    variants = []
    for name in text.split(","):
        changes = set(name.split("+")) - {"recipe"}
        unknown = sorted(changes - set(CHANGES))
        if unknown or not name:
            raise ValueError(f"--variants: unknown change {(unknown[0] if unknown else name)!r}; choose from "
                             f"recipe, {', '.join(CHANGES)}, joined by '+'")
        if {"adamw-loop", "adamw-foreach"} <= changes:
            raise ValueError(f"--variants: {name} asks for two optimizers")
        if "compiled-sdpa" in changes and "compile" not in changes:
            raise ValueError(f"--variants: {name}: compiled-sdpa needs compile (compile+compiled-sdpa)")
        variants.append((name, changes))
    return variants


def variant_step(task: torch.nn.Module, changes: set[str], cfg, device: torch.device):
    """A copy of `task` with `changes` and the recipe's own options for the stage, and a function running one
    training step of it on a batch (returns the loss)."""
    task = copy.deepcopy(task).to(device).train()
    if cfg.activation_checkpointing or "checkpointing" in changes:
        use_activation_checkpointing(task)
    if cfg.compile or "compile" in changes:
        compile_block_stacks(task)
    params = [p for p in task.parameters() if p.requires_grad]
    attention = (lambda: sdpa_kernel(SDPBackend.MATH)) if "sdpa-math" in changes else contextlib.nullcontext
    compiled_attention = "sdpa" if "compiled-sdpa" in changes else "written-out"
    precision = ((lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if "bf16" in changes
                 else contextlib.nullcontext)
    torch_adamw = "adamw-loop" in changes or "adamw-foreach" in changes
    optimizer = adamw(params, cfg, fused=False if torch_adamw else None, foreach="adamw-foreach" in changes)

    def step(batch) -> torch.Tensor:
        genie_core.nn.COMPILED_CPU_TRAINING_ATTENTION = compiled_attention  # read (and guarded on) while compiling
        with attention(), precision():
            loss, _ = task(batch)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return step


# Kinds of work in a profiled step, by the operations' names (the first that matches); the rest is "other".
WORK_KINDS = {
    "matrix products": ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_addmm_activation"),
    "attention": ("aten::_scaled_dot_product", "aten::_flash_attention", "aten::_efficient_attention"),
    "compiled code": ("## Call CompiledFxGraph", "Torch-Compiled Region", "CompiledFunction"),
    "copies": ("aten::copy_", "aten::clone", "aten::contiguous", "aten::cat"),
    "layer norms": ("aten::native_layer_norm",),
}


def profile_step(step, batch, steps: int, device: torch.device) -> dict:
    """`steps` steps under torch.profiler: the share of their time (the operations' own time, CPU side) in each of
    WORK_KINDS and the ten operations that took most, in ms a step."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step(batch)
        synchronize(device)
    own = [(event.key, event.self_cpu_time_total / 1e3 / steps) for event in prof.key_averages()]
    total = sum(ms for _, ms in own)
    shares = dict.fromkeys([*WORK_KINDS, "other"], 0.0)
    for name, ms in own:
        kind = next((k for k, prefixes in WORK_KINDS.items() if name.startswith(prefixes)), "other")
        shares[kind] += ms / total
    top = sorted(own, key=lambda item: -item[1])[:10]
    return {"ms_per_step": total, "shares": shares, "top": [{"name": n, "ms_per_step": ms} for n, ms in top]}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def take_turns(task, batch, cfg, variants, device, rounds: int, block: int, warmup: int,
               profiled: bool = False) -> dict:
    """Every variant's warm-up losses and steps/s per round, the variants taking turns; with `profiled`, a profile
    of `block` more steps of each (profile_step)."""
    batch = tuple(b.to(device) for b in batch) if isinstance(batch, tuple) else batch.to(device)
    runs = {}
    for name, changes in variants:
        step = variant_step(task, changes, cfg, device)
        torch.manual_seed(1)  # the same masks and draws in every variant's warm-up
        start = time.perf_counter()
        losses = [step(batch).item() for _ in range(warmup)]
        runs[name] = {"step": step, "warmup_losses": losses, "warmup_seconds": time.perf_counter() - start,
                      "steps_per_s": [], "faults": 0, "system_seconds": 0.0}
    for _ in range(rounds):
        for run in runs.values():
            synchronize(device)
            before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
            for _ in range(block):
                run["step"](batch)
            synchronize(device)
            run["steps_per_s"].append(block / (time.perf_counter() - start))
            after = resource.getrusage(resource.RUSAGE_SELF)
            run["faults"] += after.ru_minflt + after.ru_majflt - before.ru_minflt - before.ru_majflt
            run["system_seconds"] += after.ru_stime - before.ru_stime
    first, steps = next(iter(runs.values()))["steps_per_s"], rounds * block
    for run in runs.values():
        if profiled:
            run["profile"] = profile_step(run["step"], batch, block, device)
        del run["step"]
        ratios = [mine / theirs for mine, theirs in zip(run["steps_per_s"], first)]
        run |= {"faults_per_step": run.pop("faults") / steps,
                "system_seconds_per_step": run.pop("system_seconds") / steps,
                "median_steps_per_s": statistics.median(run["steps_per_s"]),
                "ratio_to_first": statistics.median(ratios), "ratio_range": [min(ratios), max(ratios)]}
    return runs


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe", type=Path)
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--variants", default="recipe,adamw-loop,compile",
                        help="comma-separated, the first the one the others are compared with")
    parser.add_argument("--stages", default=",".join(STAGES), help="tokenizer, dynamics or both")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--block", type=int, default=5, help="steps of one variant in a turn")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps of each variant first (compiling)")
    parser.add_argument("--profile", action="store_true",
                        help="then profile a turn of each variant: its time by kind of work, its costliest operations")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for the JSON (default benchmarks/results)")
    args = parser.parse_args(argv)
    keep_freed_memory()  # as `genie` does (GENIE_KEEP_FREED_MEMORY=0: glibc's default)
    # Every compiled variant adds graphs for the same stack classes (one per stack shape, precision and attention);
    # past dynamo's default of 8 a class would fall back to eager code unnoticed.
    torch._dynamo.config.recompile_limit = 64
    try:
        variants = parse_variants(args.variants)
    except ValueError as error:
        parser.error(str(error))
    stages = args.stages.split(",")
    if not stages or set(stages) - set(STAGES):
        parser.error(f"--stages: choose from {', '.join(STAGES)}")
    recipe = load_recipe(args.recipe, args.overrides)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    tokenizer, tokenizer_task, tokenizer_batch = tokenizer_stage(recipe)
    results = {}
    for stage in stages:
        if stage == "tokenizer":
            task, batch = tokenizer_task, tokenizer_batch
        else:
            _, _, task, batch = world_stage(recipe, tokenizer.to(device))
        results[stage] = take_turns(task, batch, recipe.train[stage], variants, device, args.rounds, args.block,
                                    args.warmup, args.profile)
        first = variants[0][0]
        print(f"{stage}: {args.rounds} rounds of {args.block} steps each")
        print(f"  {'variant':<28} {'steps/s':>8} {'x ' + first:>16} {'range':>12} {'faults/step':>11} "
              f"{'sys ms/step':>11}  warm-up losses")
        for name, run in results[stage].items():
            low, high = run["ratio_range"]
            losses = ", ".join(f"{loss:.6f}" for loss in run["warmup_losses"])
            print(f"  {name:<28} {run['median_steps_per_s']:>8.2f} {run['ratio_to_first']:>16.2f} "
                  f"{low:>5.2f}-{high:<5.2f} {run['faults_per_step']:>11.0f} "
                  f"{1e3 * run['system_seconds_per_step']:>11.1f}  {losses}")
        for name, run in results[stage].items() if args.profile else ():
            profiled = run["profile"]
            print(f"  {name}, profiled: {profiled['ms_per_step']:.1f} ms a step; "
                  + ", ".join(f"{kind} {share:.0%}" for kind, share in profiled["shares"].items()))
            print("    most: " + ", ".join(f"{op['name']} {op['ms_per_step']:.1f} ms" for op in profiled["top"][:6]))
    # bf16's rate only where bf16 units multiply: emulated, one 2048x2048 product takes minutes on 2 cores
    dtypes = (torch.float32, torch.bfloat16) if bf16_units(cpu=device.type == "cpu") else (torch.float32,)
    rates = {str(dtype).removeprefix("torch."): matmul_gflop_per_s(device, dtype=dtype) for dtype in dtypes}
    print("one 2048x2048 matrix product: " + ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in rates.items()))
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / f"turns-{recipe.run.name}-{'-vs-'.join(name for name, _ in variants)}.json"
    out.write_text(json.dumps({"recipe": str(args.recipe), "overrides": args.overrides, "rounds": args.rounds,
                               "block": args.block, "warmup": args.warmup, "device": device.type,
                               "environment": environment(), "matmul_gflop_per_s": rates, "stages": results}, indent=2))
    print(f"saved {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
