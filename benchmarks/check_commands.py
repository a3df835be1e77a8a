"""Checks every Python command of a benchmark shell script against the code as it is, without running any of them.

    python benchmarks/check_commands.py benchmarks/cuda_checks.sh [SCRIPT_ARGS ...]

A script meant for a short GPU lease (cuda_checks.sh) runs its commands on a machine that is lent for minutes: a flag
a benchmark no longer takes, or a recipe key that was renamed, costs the lease a step. This runs the script with a
stand-in for `python` ($PYTHON) that only records what it is asked to run, then checks each command here, in one
process:
- a benchmark script: run until its own argparse has parsed its arguments, and stopped there;
- a `genie` command (`-m genie_core.cli`, also behind `-m torch.distributed.run`): parsed by genie's own main with
  every command's handler replaced, so nothing is built, trained or played;
- a recipe either names: loaded with its overrides and put through the checks `genie validate` makes (plugins, option
  names and values, sizes, compiler);
- `-c` code: compiled, not run.
The script's other commands (mkdir, cp, nvidia-smi) do run. SCRIPT_ARGS are its own arguments (data folders need not
exist: nothing reads them); by default cuda_checks.sh's, TINY_DATA SMOKE_DATA OUT, as two placeholder folders and a
scratch folder for what the script writes itself (its logs and summary), deleted afterwards. Prints one line per
command and exits with 2 if any failed.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import runpy
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RECORD_END = "\x1e"  # between the recorded commands (ASCII's record separator): no argument contains it


class _Parsed(Exception):
    """Raised from inside a benchmark's argument parsing, carrying what it parsed, to stop before any work."""

    def __init__(self, namespace: argparse.Namespace):
        super().__init__()
        self.namespace = namespace


def recorded_commands(script: Path, script_args: list[str] | None = None) -> list[list[str]]:
    """Runs `bash script script_args...` in the repository with $PYTHON set to a recorder: the argument lists it was
    called with. No script_args: two placeholder data folders and a scratch output folder (cuda_checks.sh's)."""
    with tempfile.TemporaryDirectory(prefix="check-commands-") as scratch:
        if not script_args:
            script_args = ["PLACEHOLDER_DATA", "PLACEHOLDER_DATA", str(Path(scratch) / "out")]
        log = Path(scratch) / "commands"
        recorder = Path(scratch) / "python"
        recorder.write_text(f"#!/bin/sh\nprintf '%s\\0' \"$@\" >> '{log}'\nprintf '{RECORD_END}\\0' >> '{log}'\n")
        recorder.chmod(recorder.stat().st_mode | stat.S_IXUSR)
        env = os.environ | {"PYTHON": str(recorder), "DEADLINE": "100000"}
        subprocess.run(["bash", str(script), *script_args], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, check=False)
        words = log.read_bytes().decode().split("\0")[:-1] if log.is_file() else []
    commands, current = [], []
    for word in words:
        if word == RECORD_END:
            commands.append(current)
            current = []
        else:
            current.append(word)
    return commands


def _recipe_checked(namespace: argparse.Namespace) -> str:
    """The recipe a parsed command names, if any, put through `genie validate` itself with the command's overrides;
    what was checked, to add to the report's line."""
    from genie_core import cli

    if getattr(namespace, "recipe", None) is None:
        return ""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        cli.cmd_validate(argparse.Namespace(recipe=namespace.recipe, overrides=getattr(namespace, "overrides", [])))
    return f", {namespace.recipe} loads with its overrides"


@contextlib.contextmanager
def _stopped_after_parsing():
    """argparse's outermost parse_args or parse_known_args (a script's own, not a sub-command's inside it) raises
    _Parsed with its result instead of returning it: the script stops before any work."""
    original, original_parse_args = argparse.ArgumentParser.parse_known_args, argparse.ArgumentParser.parse_args
    depth = 0

    def parsed_here(parser, args, namespace):
        """argparse's own result, and whether this call is the outermost one."""
        nonlocal depth
        depth += 1
        try:
            return (*original(parser, args, namespace), depth == 1)
        finally:
            depth -= 1

    def parse_known_args(self, args=None, namespace=None):
        parsed, extras, outermost = parsed_here(self, args, namespace)
        if not outermost:
            return parsed, extras
        raise _Parsed(parsed)

    def parse_args(self, args=None, namespace=None):
        parsed, extras, _ = parsed_here(self, args, namespace)
        if extras:
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        raise _Parsed(parsed)

    argparse.ArgumentParser.parse_known_args, argparse.ArgumentParser.parse_args = parse_known_args, parse_args
    try:
        yield
    finally:
        argparse.ArgumentParser.parse_known_args, argparse.ArgumentParser.parse_args = original, original_parse_args


def _last_line(err: io.StringIO, code) -> str:
    """What a command that stopped with exit status `code` said last (argparse's or genie's one-line error)."""
    said = err.getvalue().strip()
    return said.splitlines()[-1] if said else f"exit {code}"


def _check_genie(argv: list[str]) -> str:
    """A `python -m genie_core.cli ...` command, parsed by genie's own main with every command's handler replaced:
    nothing runs, and a recipe it names (`run`, `validate`, `data build`) is loaded and checked."""
    from genie_core import cli

    handlers = [name for name in vars(cli) if name.startswith("cmd_")]
    parsed = []
    saved = {name: getattr(cli, name) for name in handlers}
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        for name in handlers:
            setattr(cli, name, lambda args: parsed.append(args) or 0)
        try:
            code = cli.main(argv)
        except SystemExit as stop:
            code = stop.code
        finally:
            for name, handler in saved.items():
                setattr(cli, name, handler)
    if code or not parsed:
        raise ValueError(_last_line(err, code))
    args = parsed[0]
    if getattr(args, "target", "").endswith(".toml"):  # genie data build RECIPE
        args = argparse.Namespace(recipe=args.target, overrides=args.overrides)
    return "genie parses it" + _recipe_checked(args)


def _check_script(path: Path, argv: list[str]) -> str:
    """A benchmark script: run as __main__ with `argv` until its arguments are parsed, then its recipe checked."""
    saved_argv, saved_path = sys.argv, list(sys.path)
    sys.argv = [str(path), *argv]
    err = io.StringIO()
    try:
        with _stopped_after_parsing(), contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
            runpy.run_path(str(path), run_name="__main__")
    except _Parsed as parsed:
        return "arguments parse" + _recipe_checked(parsed.namespace)
    except SystemExit as stop:
        if stop.code:
            raise ValueError(_last_line(err, stop.code)) from None
    finally:
        sys.argv, sys.path[:] = saved_argv, saved_path
    raise ValueError(f"{path.name} finished without parsing arguments with argparse; nothing was checked")


def _after_launcher(argv: list[str]) -> list[str]:
    """The command torch.distributed.run launches: what follows its own options (a script, or -m MODULE)."""
    for i, word in enumerate(argv):
        if word == "-m" or word.endswith(".py"):
            return argv[i:]
    raise ValueError("torch.distributed.run launches nothing")


def check_command(argv: list[str]) -> str:
    """What one command given to python was found to be; raises ValueError, RecipeError or GenieError if broken."""
    if argv[:1] == ["-c"]:
        compile(argv[1], "<-c>", "exec")
        return "code compiles"
    if argv[:2] == ["-m", "torch.distributed.run"]:
        return check_command(_after_launcher(argv[2:]))
    if argv[:2] == ["-m", "genie_core.cli"]:
        return _check_genie(argv[2:])
    if argv and argv[0].endswith(".py"):
        path = (REPO / argv[0]) if not Path(argv[0]).is_absolute() else Path(argv[0])
        if not path.is_file():
            raise ValueError(f"no script {argv[0]}")
        return _check_script(path, argv[1:])
    raise ValueError("not a command this checker knows (a script, -m genie_core.cli, torch.distributed.run, -c)")


def problem_of(error: Exception) -> str:
    problems = getattr(error, "problems", None)
    return "; ".join(problems) if problems else str(error)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("script", type=Path, help="a bash script that runs its Python commands as $PYTHON")
    parser.add_argument("script_args", nargs="*",
                        help="its arguments (default: two placeholder data folders and a scratch output folder)")
    args = parser.parse_args(argv)
    if not args.script.is_file():
        parser.error(f"no script {args.script}")
    commands = recorded_commands(args.script.resolve(), args.script_args)
    if not commands:
        print(f"error: {args.script} ran no command through $PYTHON", file=sys.stderr)
        return 2
    failed = 0
    with contextlib.chdir(REPO):  # where the script ran them: their paths are the repository's
        for command in commands:
            line = " ".join(command)
            try:
                print(f"ok: {line}\n    {check_command(command)}")
            except Exception as error:  # noqa: BLE001 (each command's own failure, reported and counted)
                failed += 1
                print(f"FAILED: {line}\n    {problem_of(error)}")
    print(f"{len(commands) - failed} of {len(commands)} commands check out"
          + (f"; {failed} would fail" if failed else ""))
    return 2 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
