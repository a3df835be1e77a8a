"""What genie tells the person running it: one line per message, from the main process only.

Under torchrun or `accelerate launch` every process runs the same code, so a plain `print` says everything once per
process. `say` goes through the standard `logging` logger "genie" (an application can raise its level or add its own
handlers) with a filter that lets only the main process (rank 0) through. Information goes to stdout, notes and
warnings (`say(..., stderr=True)`) to stderr, as plain lines without level or time.
"""

from __future__ import annotations

import logging
import os
import sys

LOGGER_NAME = "genie"


def is_main_process() -> bool:
    """True for rank 0 of a distributed run and for a single process. The process group's rank once one is set up,
    else the RANK that torchrun and `accelerate launch` give every process, so this answers before Accelerate
    starts (and without importing torch)."""
    distributed = sys.modules.get("torch.distributed")
    if distributed is not None and distributed.is_available() and distributed.is_initialized():
        return distributed.get_rank() == 0
    return int(os.environ.get("RANK") or 0) == 0


class _MainProcessOnly(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return is_main_process()


class _Console(logging.Handler):
    """stdout for information, stderr for notes and warnings; both looked up per message, so redirecting them
    (contextlib.redirect_stdout, pytest's capsys) catches the lines as it catches print's."""

    def emit(self, record: logging.LogRecord) -> None:
        stream = sys.stderr if record.levelno >= logging.WARNING else sys.stdout
        stream.write(self.format(record) + "\n")
        stream.flush()


def get_logger() -> logging.Logger:
    """The "genie" logger, set up on first use: main process only, plain lines to the console."""
    logger = logging.getLogger(LOGGER_NAME)
    if not any(isinstance(handler, _Console) for handler in logger.handlers):
        handler = _Console()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.addFilter(_MainProcessOnly())
        logger.setLevel(logging.INFO)
        logger.propagate = False  # a root handler (logging.basicConfig) would print every line a second time
    return logger


def say(message: str, stderr: bool = False) -> None:
    """One line for the person running genie, printed by the main process only: on stdout, or on stderr for a
    note or a warning."""
    get_logger().log(logging.WARNING if stderr else logging.INFO, message)
