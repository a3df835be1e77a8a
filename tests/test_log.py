"""Lines for the person running genie (`genie_core.io.log.say`): printed as print would, by the main process only.
The two-process run in test_training.py checks the same under torchrun."""

from __future__ import annotations

import logging

from genie_core.io.log import say


def test_one_process_sees_plain_lines_on_stdout_and_notes_on_stderr(monkeypatch, capsys):
    monkeypatch.delenv("RANK", raising=False)
    say("stage data: finished in 1.0 s")
    say("note: a swapped component dropped an option", stderr=True)
    out, err = capsys.readouterr()
    assert out == "stage data: finished in 1.0 s\n"
    assert err == "note: a swapped component dropped an option\n"


def test_only_rank_0_prints(monkeypatch, capsys):
    for rank, expected in (("1", ""), ("0", "hello\n")):
        monkeypatch.setenv("RANK", rank)  # what torchrun gives each process
        say("hello")
        say("hello", stderr=True)
        out, err = capsys.readouterr()
        assert (out, err) == (expected, expected)


def test_a_root_handler_does_not_print_lines_twice(monkeypatch, capsys):
    monkeypatch.delenv("RANK", raising=False)
    root = logging.getLogger()
    handler = logging.StreamHandler()
    root.addHandler(handler)
    try:
        say("once")
    finally:
        root.removeHandler(handler)
    out, err = capsys.readouterr()
    assert (out, err) == ("once\n", "")
