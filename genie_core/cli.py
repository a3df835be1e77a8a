"""The `genie` command line. Bad input (a recipe, a plugin, a file) ends with one line per problem and status 2."""

from __future__ import annotations

import argparse
import math
import os
import sys
import threading
from pathlib import Path

from genie_core.config import MAX_SEED
from genie_core.errors import GenieError, RecipeError, TrainingDiverged
from genie_core.io.machine import keep_freed_memory

EXIT_BAD_INPUT = 2
EXIT_PIPE_CLOSED = 128 + 13  # what a shell reports for a command that SIGPIPE stopped


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _steps(text: str) -> tuple[int, ...]:
    try:
        values = tuple(positive_int(part) for part in text.split(",") if part.strip())
    except (ValueError, argparse.ArgumentTypeError):
        raise argparse.ArgumentTypeError(f"'{text}': expected positive integers such as 4 or 1,4,8") from None
    if not values:
        raise argparse.ArgumentTypeError("give at least one number")
    return values


def _int_in(text: str, low: int, high: int, what: str) -> int:
    """An integer within [low, high] (argparse's error otherwise), checked before anything loads."""
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or not low <= value <= high:
        shown = text if len(text) <= 30 else text[:27] + "..."
        raise argparse.ArgumentTypeError(f"'{shown}' is not {what} (an integer in {low}..{high})")
    return value


def _seed(text: str) -> int:
    return _int_in(text, 0, MAX_SEED, "a seed")  # what torch.Generator takes, as the play server checks its seeds


def _port(text: str) -> int:
    return _int_in(text, 0, 65535, "a port")


def _positive_number(text: str) -> float:
    """A finite number above 0 (nan and inf are refused: they would make no limit, or overflow one)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"'{text[:30]}' is not a finite number above 0")
    return value


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {value}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="genie", description="Generative interactive environments on a pluggable core.",
        epilog="Commands that compute keep the memory they free for reuse rather than returning it to the system "
               "after every step (glibc on Linux: fewer page faults and less system time per training step, "
               "the same peak memory); "
               "GENIE_KEEP_FREED_MEMORY=0 leaves the C library's default.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sub.add_parser("plugins", help="list every registered component with its kind, name, package and version")

    validate = sub.add_parser("validate", help="check a recipe and report every problem; builds nothing")
    validate.add_argument("recipe", type=Path)
    validate.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="e.g. tokenizer.patch_size=8")

    run = sub.add_parser("run", help="run a recipe stage by stage (data, tokenizer, dynamics, report); resumable")
    run.add_argument("recipe", type=Path)
    run.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    run.add_argument("--out", type=Path, help="run folder (default: run.out_dir/run.name from the recipe)")
    run.add_argument("--resume", action="store_true",
                     help="continue an interrupted training stage from its newest full-state checkpoint")
    run.add_argument("--redo-from", choices=("data", "tokenizer", "dynamics", "report"),
                     help="redo this stage and every later one even if complete")

    data = sub.add_parser("data", help="build and inspect footage data sets")
    data_sub = data.add_subparsers(dest="data_command", required=True, metavar="DATA_COMMAND")
    build = data_sub.add_parser("build", help="build a data set from a recipe's [source] or from a source by name")
    build.add_argument("target", help="a recipe file (.toml), or a registered source name such as procgen")
    build.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                       help="recipe overrides; with a source name: its options (game=bigfish) and data.* settings")
    build.add_argument("--out", type=Path, help="data set folder (default: the recipe's data.path or run folder)")
    build.add_argument("--skip-bad", action="store_true", help="skip and record bad input instead of stopping")
    info = data_sub.add_parser("info", help="counts, resolution, episode lengths and a contact sheet of a data set")
    info.add_argument("path", type=Path)
    info.add_argument("--verify", action="store_true", help="also check every shard's sha256 against the manifest")
    info.add_argument("--sheet", type=Path, help="contact sheet PNG (default: PATH/contact_sheet.png)")

    ev = sub.add_parser("eval", help="measure trained runs on held-out windows: PSNR/SSIM by step, dtPSNR, FVD, "
                                     "latent vs true actions, codebooks; several runs side by side")
    ev.add_argument("runs", nargs="+", type=Path, metavar="RUN", help="run folders (or a folder inside one)")
    ev.add_argument("--data", type=Path, help="a data set folder (`genie data build`); default: the first run's own")
    ev.add_argument("--split", default="val", help="which split of the data set (default: val)")
    ev.add_argument("--out", type=Path, help="results folder (default: RUN/eval; several runs: a 'comparison' "
                                             "folder beside the first, and each run's own RUN/eval)")
    ev.add_argument("--t", type=_steps, dest="dtpsnr_t", metavar="T[,T...]",
                    help="dtPSNR at these numbers of generated frames (default: the run's eval.dtpsnr_t)")
    ev.add_argument("--horizon", type=positive_int, help="rollout steps for PSNR/SSIM by step and FVD clips "
                                                         "(default: the world's context - 1)")
    ev.add_argument("--windows", type=positive_int, help="held-out windows (default: the run's eval.windows)")
    ev.add_argument("--batch-size", type=positive_int)
    ev.add_argument("--seed", type=int)
    ev.add_argument("--labelled-fraction", type=_fraction,
                    help="share of transitions that fit the latent -> true action mapping (default 0.1)")
    ev.add_argument("--i3d", type=Path, help="local I3D weights for FVD: the TorchScript I3D of common FVD code, or "
                                             "a state dict of genie_core.eval.fvd.InceptionI3d; without it no FVD")
    ev.add_argument("--fvd-size", type=positive_int, default=224, help="frame size fed to I3D (default 224)")
    ev.add_argument("--cpu", action="store_true", help="evaluate on the CPU even if a GPU is present")

    sample = sub.add_parser("sample", help="play a trained world from a prompt image with a sequence of actions")
    sample.add_argument("run_dir", type=Path, help="a run folder whose tokenizer and dynamics stages are complete")
    sample.add_argument("--prompt", type=Path, required=True, help="PNG or JPG; resized to the world's resolution")
    sample.add_argument("--actions", required=True, help="comma-separated latent action ids, e.g. 0,0,3,3,1")
    sample.add_argument("--out", type=Path, default=Path("sample.gif"),
                        help="GIF path; a PNG strip is written beside it")
    sample.add_argument("--seed", type=_seed, default=0, help=f"random seed, 0..{MAX_SEED} (default 0)")
    sample.add_argument("--steps", type=int, help="sampler steps (overrides the saved sampler's)")
    sample.add_argument("--temperature", type=float, help="sampling temperature (overrides the saved sampler's)")
    sample.add_argument("--scale", type=positive_int, default=4, help="nearest-neighbour upscaling of the output")

    agent = sub.add_parser("agent", help="clone the expert of a run's game footage through its latent actions and "
                                         "score it in the real game (RUN/agent/)")
    agent.add_argument("run_dir", type=Path,
                       help="a finished run on footage of a game played by a registered policy (atari; procgen with "
                            "source.policy)")
    agent.add_argument("--labels", type=_steps,
                       help="labelled transitions that map latent to real actions, comma-separated (default: the "
                            "recipe's agent.labels, 20,200,2000 unless it sets them)")
    agent.add_argument("--episodes", type=positive_int, help="scored episodes per agent (default: agent.episodes, 20)")
    agent.add_argument("--first-seed", type=int,
                       help="scored episodes use seeds from here on, none of the footage's (default: "
                            "agent.first_seed, 100000)")
    agent.add_argument("--max-steps", type=positive_int,
                       help="steps per scored episode at most (default: agent.max_steps, 2000)")
    agent.add_argument("--steps", type=positive_int,
                       help="training steps of each network (default: agent.steps, 2000)")
    agent.add_argument("--footage", type=Path,
                       help="clone from this data set instead (an expert's, from `genie data build`): labelled with "
                            "the run's latent actions, scored in its game; writes RUN/agent-on-...")
    agent.add_argument("--resume", action="store_true", help="continue interrupted training from its checkpoints")
    agent.add_argument("--cpu", action="store_true", help="train on the CPU even if a GPU is present")

    play = sub.add_parser("play", help="play a trained world: a page in the browser (local web server) or --terminal")
    play.add_argument("run_dir", type=Path, metavar="RUN_OR_CHECKPOINT",
                      help="a run folder whose tokenizer and dynamics stages are complete, or a checkpoint of its "
                           "dynamics stage while it trains (RUN/checkpoints/dynamics[/step-N])")
    play.add_argument("--host", default="127.0.0.1", help="address to serve on (default 127.0.0.1: this machine only)")
    play.add_argument("--token", choices=("auto", "none"), default="auto",
                      help="access token: auto (default; one is asked for when --host is reachable from other "
                           "machines: GENIE_PLAY_TOKEN, else a random one, in the printed address) or none")
    play.add_argument("--port", type=_port, default=8000, help="port (default 8000; 0 picks a free one)")
    play.add_argument("--eval", type=Path, dest="eval_dir", metavar="DIR",
                      help="a `genie eval --out DIR` folder: the arrow keys follow the action mapping fitted there "
                           "(default: RUN/eval)")
    play.add_argument("--terminal", action="store_true", help="play in the terminal instead of the browser")
    play.add_argument("--prompt", type=Path, help="terminal: a PNG or JPG to start from (default: a validation frame)")
    play.add_argument("--prompt-index", type=int, default=0, help="terminal: which validation frame to start from")
    play.add_argument("--frames-dir", type=Path, help="terminal: also save every frame as PNG and the session as GIF")
    play.add_argument("--no-blocks", action="store_true",
                      help="terminal: do not draw frames (with --frames-dir); not drawn either when the output is "
                           "not a terminal")
    play.add_argument("--width", type=positive_int, default=64, help="terminal: characters per drawn frame row")
    play.add_argument("--seed", type=_seed, default=0,
                      help=f"terminal: random seed, 0..{MAX_SEED} (default 0)")
    play.add_argument("--steps", type=positive_int, help="sampler steps (default: the run's)")
    play.add_argument("--temperature", type=float, help="sampling temperature (default: the run's)")
    play.add_argument("--max-sessions", type=positive_int, default=16, help="sessions played at once (default 16)")
    play.add_argument("--idle-minutes", type=_positive_number, default=10.0,
                      help="a session left alone this long ends (default 10)")
    play.add_argument("--max-upload-mb", type=_positive_number, default=5.0,
                      help="largest prompt image accepted (default 5)")
    play.add_argument("--cpu", action="store_true", help="play on the CPU even if a GPU is present")
    play.add_argument("--compile", action="store_true",
                      help="compile the per-frame sampling step (and, with [world] decode_frames set, the shown "
                           "frame's decoding) with torch.compile first (seconds at start, faster play)")
    play.add_argument("--compile-mode", help="torch.compile mode for --compile (e.g. reduce-overhead: CUDA graphs)")
    return parser


def cmd_agent(args) -> int:
    import attrs

    from genie_core.agent.imitate import imitate
    from genie_core.run.folder import RunFolder

    flags = {key: getattr(args, key) for key in ("labels", "episodes", "first_seed", "max_steps", "steps")}
    try:
        settings = attrs.evolve(RunFolder.find(args.run_dir).recipe().agent,
                                **{key: value for key, value in flags.items() if value is not None})
    except ValueError as error:  # a flag the [agent] table's validators refuse
        raise GenieError(f"genie agent: {error}") from None
    report = imitate(args.run_dir, settings, resume=args.resume, cpu=args.cpu, footage=args.footage)
    for name, result in report["results"].items():
        print(f"{name}: {result['mean']:.2f} ± {result['ci95']:.2f}")
    return 0


def cmd_play(args) -> int:
    import torch

    from genie_core.io.media import load_image
    from genie_core.play.session import PlayWorld

    device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
    play = PlayWorld.load(args.run_dir, device, args.eval_dir)
    options = {k: v for k, v in (("steps", args.steps), ("temperature", args.temperature)) if v is not None}
    play.world.sampler = play.sampler(options)  # checks the values too
    if args.compile:
        print("compiling the sampling step (once) ...", file=sys.stderr, flush=True)
        print(f"compiled in {play.compile_steps(args.compile_mode):.1f} s", file=sys.stderr, flush=True)
    if args.terminal:
        from genie_core.play.terminal import play_in_terminal

        if args.prompt is not None:
            prompt = load_image(args.prompt, play.resolution)
        elif not play.prompts:
            raise GenieError(f"{args.run_dir}: its data set is not here, so there is no validation frame to start "
                             f"from; give --prompt IMAGE")
        elif not 0 <= args.prompt_index < len(play.prompts):
            raise GenieError(f"--prompt-index {args.prompt_index}: this run has validation frames "
                             f"0..{len(play.prompts) - 1}")
        else:
            prompt = play.prompts[args.prompt_index]
        play_in_terminal(play, prompt, args.seed, {}, sys.stdin, sys.stdout, args.frames_dir,
                         blocks=not args.no_blocks and sys.stdout.isatty(), width=args.width)
        return 0
    from genie_core.play.server import LOOPBACK, Limits, PlayServer, access_token

    token = access_token(args.host, args.token, os.environ.get("GENIE_PLAY_TOKEN"))
    limits = Limits(max_sessions=args.max_sessions, idle_seconds=args.idle_minutes * 60,
                    max_upload_bytes=math.ceil(args.max_upload_mb * 1_000_000))  # (at least 1 byte)
    try:
        server = PlayServer(play, args.host, args.port, limits, token)
    except OSError as error:
        raise GenieError(f"cannot serve on {args.host}:{args.port} ({error.strerror}); choose another --port") from None
    if token is None and args.host not in LOOPBACK:
        print(f"warning: --token none on {args.host}: anyone who can reach this machine can play and download "
              f"sessions", file=sys.stderr)
    print(f"playing {play.name} ({play.world.num_actions} actions, {device}) at {server.url}  (Ctrl+C stops)",
          flush=True)
    server.start()  # HTTP on a background thread; every frame is computed here, on the thread that loaded the model
    try:
        play.compute.serve(threading.Event())
    except KeyboardInterrupt:
        pass
    finally:
        server.close()
    return 0


def cmd_plugins(args) -> int:  # noqa: ARG001 - every command is called with the parsed arguments
    from genie_core.registry import get_registry, print_plugin_table

    print_plugin_table(get_registry())
    return 0


def _load_recipe(args):
    """The recipe with its overrides; says which options a component swap dropped."""
    from genie_core.io.log import say
    from genie_core.recipe import load_recipe

    notes: list[str] = []
    recipe = load_recipe(args.recipe, args.overrides, notes=notes)
    for note in notes:
        say(f"note: {note}", stderr=True)
    return recipe


def cmd_validate(args) -> int:
    from genie_core.run.stages import check_trainable

    recipe = _load_recipe(args)
    check_trainable(recipe)  # as `genie run` does first: absurd sizes stop here, not out of memory mid-run
    parts = ", ".join(f"{kind}={choice.name}" for kind, choice in recipe.components.items())
    print(f"{args.recipe}: ok ({parts})")
    return 0


def cmd_run(args) -> int:
    from genie_core.io.log import say
    from genie_core.training.pipeline import Pipeline

    recipe = _load_recipe(args)
    run_dir = args.out or Path(recipe.run.out_dir) / recipe.run.name
    say(f"genie run: {args.recipe} -> {run_dir}")  # under torchrun: once, not once per process
    report = Pipeline(recipe, run_dir).run(redo_from=args.redo_from, resume=args.resume)
    t = recipe.eval.dtpsnr_t
    say(f"tokenizer PSNR {report['tokenizer_psnr_db']['mean']:.2f} dB, "
        f"dtPSNR(t={t}) {report[f'dtpsnr_t{t}_db']['mean']:.3f} dB; report: {run_dir / 'report.md'}")
    return 0


def _source_from_cli(name: str, overrides: list[str]):
    """A source named on the command line: `key=value` go to its config, `data.key=value` to the data settings."""
    from genie_core.capabilities import ChecksRecipe
    from genie_core.config import DataConfig, build_config
    from genie_core.recipe import apply_overrides
    from genie_core.registry import get_registry

    info = get_registry().get("source", name)
    table = apply_overrides({}, overrides, "command line")
    problems: list[str] = []
    data_table = table.pop("data", {})
    config = build_config(info.cls.config_class, table, f"source {name}", problems)
    data = build_config(DataConfig, data_table, "data", problems)
    check = info.cls.check_recipe if issubclass(info.cls, ChecksRecipe) else None
    if config is not None and data is not None and check is not None:
        problems += [f"source {name}: {problem}" for problem in check(config, data=data, train={})]
    if problems:
        raise RecipeError(problems)
    return info, config, data


def cmd_data(args) -> int:
    from genie_core.data.footage import EpisodeIndex, build_dataset, contact_sheet, describe, source_identity
    from genie_core.interfaces import DataSpec
    from genie_core.io.media import save_png
    from genie_core.recipe import load_recipe

    if args.data_command == "info":
        index = EpisodeIndex.open(args.path, verify=args.verify)
        print(describe(index))
        sheet = args.sheet or args.path / "contact_sheet.png"
        save_png(contact_sheet(index), sheet, scale=2)
        print(f"contact sheet: {sheet}")
        return 0
    if args.target.endswith(".toml"):
        recipe = load_recipe(Path(args.target), args.overrides)
        info, config, data = recipe.components["source"].info, recipe.components["source"].config, recipe.data
        out = args.out or (Path(data.path) if data.path else Path(recipe.run.out_dir) / recipe.run.name / "data")
    else:
        info, config, data = _source_from_cli(args.target, args.overrides)
        if args.out is None:
            raise GenieError("--out: give the folder to build into when naming a source directly")
        out = args.out
    source = info.cls(config, DataSpec(resolution=data.resolution))
    manifest = build_dataset(source, source_identity(source, info.name, info.owner), data, out,
                             skip_bad=args.skip_bad or data.skip_bad)
    print(f"{out}: {manifest['frames']} frames in {len(manifest['episodes'])} episodes; "
          f"{len(manifest['skipped'])} bad units skipped")
    return 0


def cmd_eval(args) -> int:
    from genie_core.eval.evaluate import evaluate_runs
    from genie_core.eval.report import comparison_table

    chosen = {"windows": args.windows, "batch_size": args.batch_size, "seed": args.seed, "dtpsnr_t": args.dtpsnr_t,
              "horizon": args.horizon, "labelled_fraction": args.labelled_fraction}
    results = evaluate_runs(args.runs, args.data, args.split, {k: v for k, v in chosen.items() if v is not None},
                            args.out, i3d_path=args.i3d, fvd_size=args.fvd_size, cpu=args.cpu)
    from accelerate import PartialState

    if not PartialState().is_main_process:  # every process measured its share; one prints
        return 0
    print(comparison_table(results))
    return 0


def cmd_sample(args) -> int:
    import torch

    from genie_core.io.media import load_image, save_gif, save_strip
    from genie_core.run.folder import load_world

    try:
        actions = [int(a) for a in args.actions.split(",") if a.strip()]
    except ValueError:
        raise GenieError(f"--actions '{args.actions}': expected comma-separated integers such as 0,1,2") from None
    if not actions:
        raise GenieError("--actions: give at least one action")
    huge = next((a for a in actions if not -(2**63) <= a < 2**63), None)  # past what a tensor of actions holds
    if huge is not None:
        shown = str(huge) if len(str(huge)) <= 30 else str(huge)[:27] + "..."
        raise GenieError(f"--actions: {shown} is not an action id; a world's actions are 0..N-1 for its N actions")
    if args.out.suffix.lower() != ".gif":
        raise GenieError(f"--out {args.out}: must end in .gif (a .png strip is written beside it)")
    if not args.out.parent.is_dir():
        raise GenieError(f"--out {args.out}: the folder {args.out.parent} does not exist; create it first")
    world = load_world(args.run_dir)
    changes = {k: v for k, v in (("steps", args.steps), ("temperature", args.temperature)) if v is not None}
    world.sampler = world.sampler_with(changes)
    spec = world.tokenizer.spec
    prompt = load_image(args.prompt, (spec.height, spec.width))
    generator = torch.Generator().manual_seed(args.seed)
    video = world.rollout(prompt[None], torch.tensor([actions]), generator)[0]
    save_gif(video, args.out, scale=args.scale)
    strip = args.out.with_suffix(".png")
    save_strip(video, strip, scale=args.scale)
    print(f"wrote {args.out} and {strip} ({len(actions)} steps)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    # Overrides may come before or after options (`genie run R --out D a.b=1`): argparse leaves the late ones over.
    args, extra = parser.parse_known_args(argv)
    if extra:
        bad = [item for item in extra if item.startswith("-") or "=" not in item or not hasattr(args, "overrides")]
        if bad:
            parser.error(f"unrecognized arguments: {' '.join(bad)}")
        args.overrides += extra
    if args.command not in ("plugins", "validate"):
        keep_freed_memory()
    handler = {"plugins": cmd_plugins, "validate": cmd_validate, "run": cmd_run, "data": cmd_data,
               "eval": cmd_eval, "sample": cmd_sample, "play": cmd_play, "agent": cmd_agent}[args.command]
    try:
        return handler(args)
    except BrokenPipeError:
        # Whoever reads the output stopped (`genie plugins | head`): end as Unix tools do when a pipe closes, without a
        # traceback, and point stdout at nothing so that Python's last flush does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_PIPE_CLOSED
    except TrainingDiverged as error:  # not bad input: the run itself failed
        print(f"error: {error}", file=sys.stderr)
        return 1
    except RecipeError as error:
        for problem in error.problems:
            print(f"error: {problem}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except GenieError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
