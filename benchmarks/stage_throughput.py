"""Training and sampling throughput of a recipe's components, measured side by side in one run.

    python benchmarks/stage_throughput.py recipes/coinrun-tiny.toml [KEY=VALUE ...] [--steps 30] [--warmup 3]
        [--frames 8] [--precision bf16] [--compile] [--out DIR]
    torchrun --nproc_per_node 2 benchmarks/stage_throughput.py recipes/coinrun-tiny.toml     # several processes

For each training stage: optimizer steps/s and samples/s (all processes together) at the recipe's per-process
batch, through Accelerate (DDP under torchrun, autocast under bf16/fp16, fp16 with its gradient scaler), on random
video so no data needs building; peak memory of each stage on a GPU (on a CPU, the tokenizer stage's growth of
the resident set); the activations a step keeps for its backward pass (counted, so the same on any device; set
`train.*.activation_checkpointing=true` to see what checkpointing saves; `--compile` trains as
`train.*.compile=true` does, every transformer stack through torch.compile, the warm-up steps compiling them); the
step's floating-point work (torch's FLOP counter: matrix products and attention) and the rate it runs at, beside
this machine's rate on one large matrix product, which says how much room the step leaves; and for play (single
process):
frames/s of the sampler from a one-frame prompt. Prints a table and saves JSON (with the machine, GPU, library
versions and git commit) to benchmarks/results/ (or --out) as
throughput-RUNNAME-PRECISION-Nproc[-ckpt][-compiled][-cuda].json.
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import attrs
import torch
from accelerate import Accelerator

from genie_core.config import TrainConfig
from genie_core.interfaces import TokenSpec, VideoSpec
from genie_core.io.machine import describe as describe_machine
from genie_core.io.machine import keep_freed_memory
from genie_core.nn import compile_block_stacks, saved_activation_bytes, use_activation_checkpointing
from genie_core.recipe import Recipe, load_recipe
from genie_core.training.engine import TokenizerTask, WorldModelTask, adamw
from genie_core.world.model import World

RESULTS = Path(__file__).resolve().parent / "results"


def with_compiled_stacks(task: torch.nn.Module) -> torch.nn.Module:
    """A copy of `task` as `train.*.compile` trains it (genie_core.nn.compile_block_stacks: the trained models'
    transformer stacks through torch.compile; quantizers, losses, the frozen tokenizer and the optimizer eager). A
    copy, so that the FLOP count and play run the plain modules."""
    task = copy.deepcopy(task)
    compile_block_stacks(task)
    return task


def tokenizer_stage(recipe: Recipe) -> tuple[torch.nn.Module, TokenizerTask, torch.Tensor]:
    """The recipe's tokenizer, freshly built, its training task, and a batch of random video of the stage's shape."""
    cfg, res, component = recipe.train["tokenizer"], recipe.data.resolution, recipe.components["tokenizer"]
    tokenizer = component.info.cls(component.config, VideoSpec(height=res, width=res, num_frames=cfg.seq_len))
    return tokenizer, TokenizerTask(tokenizer), torch.rand(cfg.batch_size, cfg.seq_len, 3, res, res)


def world_stage(recipe: Recipe, tokenizer: torch.nn.Module):
    """(action model, dynamics model, their training task on the frozen `tokenizer`, a batch of random video of the
    stage's shape, with random true actions for an action model that reads them)."""
    cfg, res, c = recipe.train["dynamics"], recipe.data.resolution, recipe.components
    # An action model that reads the footage's actions gets random ones, as many as procgen's buttons.
    true_actions = 15 if c["action_model"].info.cls.reads_true_actions else 0
    spec = VideoSpec(height=res, width=res, num_frames=cfg.seq_len, true_actions=true_actions)
    if c["action_model"].info.cls.needs_tokenizer:
        spec = attrs.evolve(spec, token_vocab=tokenizer.codebook_size, token_grid=tuple(tokenizer.grid))
    action_model = c["action_model"].info.cls(c["action_model"].config, spec)
    action_model.use_tokenizer(tokenizer)
    dynamics = c["dynamics"].info.cls(c["dynamics"].config, TokenSpec(
        vocab_size=tokenizer.codebook_size, grid=tokenizer.grid, num_frames=cfg.seq_len,
        num_actions=action_model.num_actions))
    batch = torch.rand(cfg.batch_size, cfg.seq_len, 3, res, res)
    if true_actions:
        batch = (batch, torch.randint(0, true_actions, (cfg.batch_size, cfg.seq_len - 1)))
    return action_model, dynamics, WorldModelTask(action_model, dynamics, tokenizer), batch


def timed_steps(task: torch.nn.Module, batch: torch.Tensor | tuple, cfg: TrainConfig, steps: int, warmup: int = 3,
                accelerator: Accelerator | None = None) -> tuple[float, float]:
    """(seconds per optimizer step, the stage's optimizer as the engine builds it, after `warmup` untimed steps
    (k-means codebook init, allocator warm-up, compiling); seconds those took). `batch`: video, or (video, true
    actions) for an action model that reads them."""
    accelerator = accelerator or Accelerator(cpu=not torch.cuda.is_available())
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    model = accelerator.prepare(task)
    optimizer = accelerator.prepare(adamw([p for p in model.parameters() if p.requires_grad], cfg))
    batch = tuple(b.to(accelerator.device) for b in batch) if isinstance(batch, tuple) else batch.to(accelerator.device)
    synchronize(accelerator)
    start = time.perf_counter()
    for i in range(warmup + steps):
        if i == warmup:
            synchronize(accelerator)
            warmup_seconds, start = time.perf_counter() - start, time.perf_counter()
        loss, _ = model(batch)  # prepare() wrapped forward in autocast under mixed precision
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    synchronize(accelerator)
    seconds = (time.perf_counter() - start) / steps
    accelerator.free_memory()
    return seconds, warmup_seconds


def step_work(task: torch.nn.Module, batch: torch.Tensor | tuple, accelerator: Accelerator,
              first_pass: bool = False) -> dict:
    """One forward and backward pass of `task` (not an optimizer step): its GFLOP (matrix products and attention, as
    torch's FLOP counter counts them) and the GiB of activations it keeps between the two. `first_pass`: `task` has
    not run yet (a compiled copy took the timed steps), so one uncounted pass goes first, where the codebooks take
    their k-means initialisation, as they did in the timed warm-up."""
    from torch.utils.flop_counter import FlopCounterMode

    batch = tuple(b.to(accelerator.device) for b in batch) if isinstance(batch, tuple) else batch.to(accelerator.device)
    task.to(accelerator.device).train()
    if first_pass:
        task(batch)[0].backward()
        task.zero_grad(set_to_none=True)
    counter = FlopCounterMode(display=False)
    with counter, accelerator.autocast():
        (loss, _), kept = saved_activation_bytes(lambda: task(batch), task)
        loss.backward()
    task.zero_grad(set_to_none=True)
    return {"gflop_per_step": counter.get_total_flops() / 1e9, "activations_gib": kept / 2**30}


def matmul_gflop_per_s(device: torch.device, n: int = 2048, rounds: int = 5, repeats: int = 4,
                       dtype: torch.dtype = torch.float32) -> float:
    """This machine's rate on one large matrix product (float32 unless `dtype` says), the best of `rounds` (noise
    only ever slows it): about the most a training step's products can reach."""
    a, b = torch.rand(n, n, device=device, dtype=dtype), torch.rand(n, n, device=device, dtype=dtype)
    a @ b  # warm-up
    best = 0.0
    for _ in range(rounds):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(repeats):
            a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = max(best, 2 * n**3 * repeats / (time.perf_counter() - start) / 1e9)
    return best


def synchronize(accelerator: Accelerator, every_process: bool = True) -> None:
    """GPU work is asynchronous: wait for it before reading the clock, and for the other processes
    (`every_process`) when they all time the same steps."""
    if accelerator.device.type == "cuda":
        torch.cuda.synchronize()
    if every_process:
        accelerator.wait_for_everyone()


def peak_memory_gib() -> float | None:
    """Peak GPU memory since the last reset (None on CPU, where torch keeps no such count)."""
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None


def environment() -> dict:
    """The machine (genie_core.io.machine.describe) and the git commit of the code measured."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent).stdout.strip()
    except OSError:
        commit = ""
    return describe_machine() | {"git_commit": commit or "unknown"}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe", type=Path)
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per stage")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before them")
    parser.add_argument("--frames", type=int, default=8, help="frames sampled for the play measurement")
    parser.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32",
                        help="fp16 (with a gradient scaler) needs a GPU")
    parser.add_argument("--compile", action="store_true",
                        help="train as train.*.compile=true does: the transformer stacks through torch.compile "
                             "(compiled in the warm-up steps)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for the JSON (default benchmarks/results)")
    args = parser.parse_args(argv)
    keep_freed_memory()  # as `genie` does (GENIE_KEEP_FREED_MEMORY=0: glibc's default)
    if args.precision == "fp16" and not torch.cuda.is_available():
        parser.error("--precision fp16: needs a GPU (fp16 training runs with a gradient scaler on CUDA); "
                     "use bf16 on CPU")
    accelerator = Accelerator(cpu=not torch.cuda.is_available(),
                              mixed_precision="no" if args.precision == "fp32" else args.precision)
    procs = accelerator.num_processes
    recipe = load_recipe(args.recipe, args.overrides)
    torch.manual_seed(0)
    res = recipe.data.resolution
    c = recipe.components
    rows = []
    peak_rate = matmul_gflop_per_s(accelerator.device)

    tok_cfg = recipe.train["tokenizer"]
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    tokenizer, task, batch = tokenizer_stage(recipe)
    if tok_cfg.activation_checkpointing:
        use_activation_checkpointing(task)
    seconds, warmup_seconds = timed_steps(with_compiled_stacks(task) if args.compile else task, batch, tok_cfg,
                                          args.steps, args.warmup, accelerator)
    # On a CPU torch counts no allocations; the growth of the process's peak resident set is the tokenizer stage's
    # (it runs first). Later stages' growth would be hidden under it, so only this row gets a CPU figure.
    memory = peak_memory_gib() or (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 2**20
    rows.append({"stage": "tokenizer", "batch": list(batch.shape[:2]), "steps_per_s": 1 / seconds,
                 "samples_per_s": procs * tok_cfg.batch_size / seconds, "peak_memory_gib": memory,
                 "parameters": sum(p.numel() for p in tokenizer.parameters()), "warmup_seconds": warmup_seconds,
                 **step_work(task, batch, accelerator, first_pass=args.compile)})

    dyn_cfg = recipe.train["dynamics"]
    action_model, dynamics, task, batch = world_stage(recipe, tokenizer.to(accelerator.device))
    if dyn_cfg.activation_checkpointing:
        use_activation_checkpointing(task)
    seconds, warmup_seconds = timed_steps(with_compiled_stacks(task) if args.compile else task, batch, dyn_cfg,
                                          args.steps, args.warmup, accelerator)
    rows.append({"stage": "lam+dynamics", "batch": [dyn_cfg.batch_size, dyn_cfg.seq_len], "steps_per_s": 1 / seconds,
                 "samples_per_s": procs * dyn_cfg.batch_size / seconds, "peak_memory_gib": peak_memory_gib(),
                 "parameters": sum(p.numel() for m in (action_model, dynamics) for p in m.parameters()),
                 "warmup_seconds": warmup_seconds, **step_work(task, batch, accelerator, first_pass=args.compile)})
    for row in rows:
        row["gflop_per_s"] = row["gflop_per_step"] * row["steps_per_s"]
        row["share_of_matmul_rate"] = row["gflop_per_s"] / peak_rate

    if not accelerator.is_main_process:
        return 0
    device = accelerator.device
    world = World(tokenizer.eval(), action_model.eval(), dynamics.eval(), c["sampler"].info.cls(c["sampler"].config))
    world.to(device)
    prompt = torch.rand(1, 3, res, res, device=device)
    actions = torch.zeros(1, args.frames, dtype=torch.long, device=device)
    generator = torch.Generator(device).manual_seed(0)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    with accelerator.autocast():
        world.rollout(prompt, actions[:, :1], generator)  # warm-up
        synchronize(accelerator, every_process=False)  # play: the main process alone, the others are done
        start = time.perf_counter()
        world.rollout(prompt, actions, generator)
        synchronize(accelerator, every_process=False)
    seconds = time.perf_counter() - start
    steps = getattr(c["sampler"].config, "steps", None)
    steps_shown = f", {steps} steps" if steps else ""
    rows.append({"stage": f"play ({c['sampler'].name}{steps_shown}, {args.frames} frames)",
                 "batch": [1, 1], "steps_per_s": args.frames / seconds, "samples_per_s": args.frames / seconds,
                 "peak_memory_gib": peak_memory_gib(), "parameters": 0})

    print(f"{'stage':<40} {'batch':>8} {'steps/s':>9} {'samples/s':>10} {'peak GiB':>9} {'act. GiB':>9} "
          f"{'GFLOP/step':>11} {'GFLOP/s':>8} {'of mm':>6} {'params':>12}")
    for row in rows:
        memory = f"{row['peak_memory_gib']:.2f}" if row["peak_memory_gib"] is not None else "-"
        work = f"{'-':>9} {'-':>11} {'-':>8} {'-':>6}"  # play: not a training step
        if "gflop_per_s" in row:
            work = (f"{row['activations_gib']:>9.3f} {row['gflop_per_step']:>11.2f} {row['gflop_per_s']:>8.1f} "
                    f"{row['share_of_matmul_rate']:>6.0%}")
        print(f"{row['stage']:<40} {'x'.join(map(str, row['batch'])):>8} {row['steps_per_s']:>9.2f} "
              f"{row['samples_per_s']:>10.1f} {memory:>9} {work} {row['parameters']:>12,}")
    print(f"one 2048x2048 float32 matrix product on {device.type}: {peak_rate:.1f} GFLOP/s")
    args.out.mkdir(parents=True, exist_ok=True)
    checkpointing = any(recipe.train[stage].activation_checkpointing for stage in ("tokenizer", "dynamics"))
    suffix = ("-ckpt" if checkpointing else "") + ("-compiled" if args.compile else "") + (
        "-cuda" if device.type == "cuda" else "")
    out = args.out / f"throughput-{recipe.run.name}-{args.precision}-{procs}proc{suffix}.json"
    out.write_text(json.dumps({"recipe": str(args.recipe), "overrides": args.overrides, "precision": args.precision,
                               "compiled": args.compile,
                               "processes": procs, "environment": environment(), "matmul_gflop_per_s": peak_rate,
                               "rows": rows}, indent=2))
    print(f"saved {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
