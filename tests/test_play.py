"""`genie play`: the web server's API (sessions, steps, undo, reset, uploads, errors, concurrent players, expiry),
the terminal player and the arrow keys. The browser test is in test_play_browser.py."""

from __future__ import annotations

import base64
import http.client
import io
import json
import shutil
import sys
import threading
import time

import attrs
import numpy as np
import pytest
import torch
from PIL import Image

from genie_core.cli import main
from genie_core.errors import GenieError
from genie_core.play.server import Limits, PlayServer
from genie_core.play.session import PlaySession, PlayWorld, arrow_keys
from genie_core.run.folder import RunFolder

from conftest import REPO


def request(server, method, path, body=None, content_type="application/json", raw=False):
    host, port = server.httpd.server_address[:2]
    connection = http.client.HTTPConnection(host, port, timeout=60)
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    connection.request(method, path, body=data, headers={"Content-Type": content_type} if data is not None else {})
    response = connection.getresponse()
    payload = response.read()
    connection.close()
    return response.status, (payload if raw else json.loads(payload))


def png(frame_url: str) -> np.ndarray:
    data = base64.b64decode(frame_url.removeprefix("data:image/png;base64,"))
    return np.asarray(Image.open(io.BytesIO(data)))


def image_bytes(fmt: str, size=(40, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (*size[::-1], 3), dtype=np.uint8)).save(buffer, fmt)
    return buffer.getvalue()


def test_info_describes_the_world(server):
    status, info = request(server, "GET", "/api/info")
    assert status == 200
    assert info["num_actions"] == 4 and info["resolution"] == [64, 64] and info["prompts"] >= 1
    assert info["sampler"]["steps"] == 2 and "temperature" in info["sampler"]
    status, page = request(server, "GET", "/", raw=True)
    assert status == 200 and b"genie play" in page and b"EventSource" in page
    status, prompt = request(server, "GET", "/api/prompts/0.png", raw=True)
    assert status == 200 and Image.open(io.BytesIO(prompt)).size == (64, 64)


def test_step_undo_reset(server):
    status, state = request(server, "POST", "/api/sessions", {"prompt": 0})
    assert status == 201 and state["frames"] == 1 and state["actions"] == []
    sid, prompt_frame = state["session"], png(state["frame"])
    assert prompt_frame.shape == (64, 64, 3)
    frames = []
    for action in (1, 3, 0):
        status, state = request(server, "POST", f"/api/sessions/{sid}/step", {"action": action})
        assert status == 200
        frames.append(png(state["frame"]))
    assert state["frames"] == 4 and state["actions"] == [1, 3, 0] and state["fps"] > 0
    status, state = request(server, "POST", f"/api/sessions/{sid}/undo", {})
    assert state["frames"] == 3 and state["actions"] == [1, 3] and np.array_equal(png(state["frame"]), frames[1])
    status, state = request(server, "POST", f"/api/sessions/{sid}/reset")
    assert state["frames"] == 1 and np.array_equal(png(state["frame"]), prompt_frame)
    status, state = request(server, "POST", f"/api/sessions/{sid}/undo")  # nothing left to take back: the prompt stays
    assert status == 200 and state["frames"] == 1
    status, gif = request(server, "GET", f"/api/sessions/{sid}/session.gif", raw=True)
    assert status == 200 and Image.open(io.BytesIO(gif)).n_frames == 1
    assert request(server, "DELETE", f"/api/sessions/{sid}")[0] == 200
    assert request(server, "GET", f"/api/sessions/{sid}")[0] == 404


def test_a_session_plays_the_worlds_own_rollout(server, play):
    """Same prompt, seed and actions: the session's tokens are those of World.generate_tokens, and the GIF holds
    every frame."""
    status, state = request(server, "POST", "/api/sessions", {"prompt": 1, "seed": 5})
    sid = state["session"]
    actions = [2, 2, 1, 0, 3, 3, 1, 2, 0, 1]  # longer than the world's context: the window moves
    for action in actions:
        request(server, "POST", f"/api/sessions/{sid}/step", {"action": action})
    session = server.sessions[sid]
    world = play.world
    expected = world.generate_tokens(world.encode_prompt(play.prompts[1][None]), torch.tensor([actions]),
                                     torch.Generator().manual_seed(5))
    assert torch.equal(session.rollout.tokens, expected)
    status, gif = request(server, "GET", f"/api/sessions/{sid}/session.gif", raw=True)
    assert Image.open(io.BytesIO(gif)).n_frames == len(actions) + 1


def test_a_session_keeps_its_last_frames_and_undo_stops_at_the_oldest(play):
    """A long session holds its last `max_frames` frames, not one per step forever: its GIF shows those, undo stops
    at the oldest of them, and reset still goes back to the prompt."""
    session = PlaySession(play, play.prompts[0], seed=2, max_frames=4)
    prompt = session.frames[0]
    shown = [session.step(action) for action in (1, 2, 3, 0, 1, 2, 3)]
    assert len(session.frames) == 4 and session.frame_count == 8
    assert all(np.array_equal(kept, frame) for kept, frame in zip(session.frames, shown[-4:]))
    assert Image.open(io.BytesIO(session.gif())).n_frames == 4
    for _ in range(5):
        session.undo()
    assert len(session.frames) == 1 and np.array_equal(session.frames[-1], shown[3])  # the oldest kept frame
    assert session.frame_count == 5 and session.actions == [1, 2, 3, 0]  # the rollout went back with it
    session.step(2)
    assert session.frame_count == 6 and len(session.frames) == 2
    session.reset()
    assert list(session.frames) == [prompt] and session.frame_count == 1
    with pytest.raises(GenieError, match="max_frames 0: a session keeps at least 1 frame"):
        PlaySession(play, play.prompts[0], max_frames=0)


def test_the_servers_sessions_keep_its_limit_of_frames(play):
    with PlayServer(play, limits=Limits(max_frames=3)) as small:
        assert request(small, "GET", "/api/info")[1]["limits"]["max_frames"] == 3
        sid = request(small, "POST", "/api/sessions", {"prompt": 0})[1]["session"]
        for action in (1, 2, 3, 0):
            status, state = request(small, "POST", f"/api/sessions/{sid}/step", {"action": action})
        assert state["frames"] == 5 and len(small.sessions[sid].frames) == 3
        status, gif = request(small, "GET", f"/api/sessions/{sid}/session.gif", raw=True)
        assert status == 200 and Image.open(io.BytesIO(gif)).n_frames == 3
    assert Limits().max_frames == 1000


def test_a_reset_session_replays_as_a_fresh_one(play):
    """Reset seeds the session's generator again: the same actions give the frames of a new session with that seed
    (sampling at temperature 1 here, so the generator matters: another seed gives other frames)."""
    actions = (1, 2, 3, 0, 2)
    session = PlaySession(play, play.prompts[0], seed=5)
    first = [session.step(action) for action in actions]
    session.reset()
    again = [session.step(action) for action in actions]
    fresh = PlaySession(play, play.prompts[0], seed=5)
    new = [fresh.step(action) for action in actions]
    assert all(np.array_equal(a, b) and np.array_equal(a, c) for a, b, c in zip(first, again, new))
    other = PlaySession(play, play.prompts[0], seed=6)
    for action in actions:
        other.step(action)
    assert not torch.equal(other.rollout.tokens, session.rollout.tokens)


def test_a_state_carries_the_recent_actions_and_the_whole_count(server):
    """The state sent after every change (twice: the answer and the event) holds the last 32 actions, not a list
    that grows with every frame; "frames" still counts them all."""
    sid = request(server, "POST", "/api/sessions", {"prompt": 0})[1]["session"]
    session = server.sessions[sid]
    for step in range(40):
        session.step(step % 4)
    status, state = request(server, "POST", f"/api/sessions/{sid}/step", {"action": 2})
    assert status == 200 and state["frames"] == 42
    assert state["actions"] == session.actions[-32:] == [k % 4 for k in range(9, 40)] + [2]
    status, state = request(server, "POST", f"/api/sessions/{sid}/undo")
    assert state["frames"] == 41 and state["actions"] == [k % 4 for k in range(8, 40)]
    assert request(server, "GET", f"/api/sessions/{sid}")[1]["actions"] == state["actions"]


def test_frames_stream_as_server_sent_events(server):
    sid = request(server, "POST", "/api/sessions", {"prompt": 0})[1]["session"]
    host, port = server.httpd.server_address[:2]
    connection = http.client.HTTPConnection(host, port, timeout=60)
    connection.request("GET", f"/api/sessions/{sid}/events")
    stream = connection.getresponse()
    assert stream.status == 200 and stream.getheader("Content-Type") == "text/event-stream"
    events = []

    def read():
        while len(events) < 4:
            line = stream.fp.readline().decode()
            if line.startswith("data: "):
                events.append(json.loads(line[6:]))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    answers = [request(server, "POST", f"/api/sessions/{sid}/step", {"action": a})[1] for a in (0, 1)]
    answers.append(request(server, "POST", f"/api/sessions/{sid}/undo")[1])
    reader.join(timeout=60)
    connection.close()
    assert [e["event"] for e in events] == ["describe", "step", "step", "undo"]
    assert [e["frame"] for e in events[1:]] == [a["frame"] for a in answers]


def test_uploaded_prompts(server):
    for fmt, content_type in (("PNG", "image/png"), ("JPEG", "image/jpeg")):
        status, state = request(server, "POST", "/api/sessions", image_bytes(fmt), content_type)
        assert status == 201 and png(state["frame"]).shape == (64, 64, 3)
    status, answer = request(server, "POST", "/api/sessions", b"not an image at all", "image/png")
    assert status == 400 and answer["error"] == "uploaded image: not an image (no image format recognised)"
    status, answer = request(server, "POST", "/api/sessions", image_bytes("GIF"), "image/png")
    assert status == 400 and "a GIF image; accepted: PNG, JPEG" in answer["error"]
    status, answer = request(server, "POST", "/api/sessions", image_bytes("PNG"), "text/plain")
    assert status == 415 and "send JSON" in answer["error"]


def test_upload_limits(play):
    limits = Limits(max_upload_bytes=2_000, max_upload_pixels=100 * 100)
    with PlayServer(play, limits=limits) as small:
        status, answer = request(small, "POST", "/api/sessions", image_bytes("PNG", (200, 200)), "image/png")
        assert status == 413 and "larger than the 2000 allowed" in answer["error"]
        status, answer = request(small, "POST", "/api/sessions", _flat_png(101, 100), "image/png")
        assert status == 400 and "101x100 pixels is more than the 10000 allowed" in answer["error"]
        assert request(small, "POST", "/api/sessions", {"prompt": 0})[0] == 201  # still serving


def _flat_png(width, height) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height)).save(buffer, "PNG")  # compresses to a few hundred bytes
    return buffer.getvalue()


@pytest.mark.parametrize("body, message", [
    ({"action": 4}, "action 4 is out of range; this world has actions 0..3"),
    ({"action": "left"}, "action 'left' is out of range"),
    ({}, "step needs an 'action'"),
    ({"action": 0, "steps": 0}, "sampler option: key 'steps': 'steps' must be > 0"),
    ({"action": 0, "steps": 2.5}, "sampler option: key 'steps': expected int, got float 2.5"),
    ({"action": 0, "temperature": "hot"}, "sampler option: key 'temperature': expected float, got str 'hot'"),
    ({"action": 0, "top_k": 3}, "sampler option top_k is not one of this sampler's: steps, temperature"),
])
def test_bad_steps_are_refused_and_the_session_goes_on(server, body, message):
    sid = request(server, "POST", "/api/sessions", {"prompt": 0})[1]["session"]
    status, answer = request(server, "POST", f"/api/sessions/{sid}/step", body)
    assert status == 400 and answer["error"].startswith(message)
    status, state = request(server, "POST", f"/api/sessions/{sid}/step", {"action": 1})
    assert status == 200 and state["frames"] == 2


def test_bad_requests(server):
    assert request(server, "POST", "/api/sessions/nope/step", {"action": 0}) == (
        404, {"error": "no session 'nope' (it may have expired after 600 s idle); start a new one"})
    status, answer = request(server, "POST", "/api/sessions", b"{not json", "application/json")
    assert status == 400 and answer["error"].startswith("request body is not valid JSON")
    status, answer = request(server, "POST", "/api/sessions", {"prompt": "../../etc/passwd"})
    assert status == 400 and "is not one of this run's prompts" in answer["error"]  # never a path
    status, answer = request(server, "POST", "/api/sessions", {"path": "/etc/passwd"})
    assert status == 400 and answer["error"] == "unknown field path; fields: prompt, seed"
    assert request(server, "GET", "/api/prompts/999.png")[0] == 404
    assert request(server, "GET", "/etc/passwd")[0] == 404
    assert request(server, "GET", "/api/sessions")[0] == 405
    host, port = server.httpd.server_address[:2]
    connection = http.client.HTTPConnection(host, port, timeout=60)
    connection.putrequest("POST", "/api/sessions")
    connection.putheader("Content-Type", "application/json")
    connection.putheader("Content-Length", "lots")
    connection.endheaders()
    response = connection.getresponse()
    assert (response.status, json.loads(response.read())) == (400, {"error": "Content-Length is not a number"})
    connection.close()
    assert request(server, "GET", "/api/info")[0] == 200


def test_concurrent_sessions_are_independent(server):
    """Four players at once, each its own actions: each session's frames equal those it gives when played alone."""
    plans = {seed: [(seed + k) % 4 for k in range(5)] for seed in range(4)}

    def play_alone(seed):
        sid = request(server, "POST", "/api/sessions", {"prompt": 0, "seed": seed})[1]["session"]
        for action in plans[seed]:
            state = request(server, "POST", f"/api/sessions/{sid}/step", {"action": action})[1]
        return state

    alone = {seed: play_alone(seed) for seed in plans}
    together = {}
    threads = [threading.Thread(target=lambda s=seed: together.__setitem__(s, play_alone(s))) for seed in plans]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    for seed in plans:
        assert together[seed]["actions"] == plans[seed]
        assert together[seed]["frame"] == alone[seed]["frame"]
        assert together[seed]["session"] != alone[seed]["session"]


def test_sessions_expire_and_are_limited(play):
    with PlayServer(play, limits=Limits(max_sessions=2, idle_seconds=0.3)) as short:
        first = request(short, "POST", "/api/sessions", {"prompt": 0})[1]["session"]
        request(short, "POST", "/api/sessions", {"prompt": 0})
        status, answer = request(short, "POST", "/api/sessions", {"prompt": 0})
        assert status == 503 and "2 sessions are playing, the most this server allows" in answer["error"]
        time.sleep(0.5)
        assert request(short, "POST", f"/api/sessions/{first}/step", {"action": 0})[0] == 404
        assert request(short, "POST", "/api/sessions", {"prompt": 0})[0] == 201  # room again


def test_arrow_keys_follow_the_latent_to_true_mapping(tmp_path):
    run = tmp_path / "run"
    (run / "eval").mkdir(parents=True)
    (run / "data").mkdir()
    mapping = {"actions_vs_true": {"real_to_latent": {"1": 3, "7": 0, "5": 2}}}
    (run / "eval" / "eval.json").write_text(json.dumps(mapping))
    names = ["LEFT+DOWN", "LEFT", "LEFT+UP", "DOWN", "NOOP", "UP", "RIGHT+DOWN", "RIGHT", "RIGHT+UP"]
    (run / "data" / "manifest.json").write_text(json.dumps({"action_names": names}))
    assert arrow_keys(RunFolder(run)) == {"ArrowLeft": 3, "ArrowRight": 0, "ArrowUp": 2}  # DOWN was never seen
    (run / "eval" / "eval.json").write_text(json.dumps({"actions_vs_true": None}))
    assert arrow_keys(RunFolder(run)) == {}


def test_terminal_play(played_run, tmp_path, monkeypatch, capsys):
    frames = tmp_path / "frames"
    monkeypatch.setattr("sys.stdin", io.StringIO("0 1\nu\n2 9 jump\nr\n3\nq\n1\n"))
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)  # as in a terminal
    assert main(["play", str(played_run), "--terminal", "--frames-dir", str(frames), "--width", "32"]) == 0
    out = capsys.readouterr().out
    assert "\x1b[38;2;" in out and "▀" in out  # frames drawn as coloured half-blocks
    assert "action 9 is out of range; this world has actions 0..3" in out
    assert "'jump' is not a command" in out
    # prompt, 0, 1, undo, 2, reset, 3: seven frames shown, each saved under its own number (none overwritten);
    # the 1 after q is never played
    assert sorted(p.name for p in frames.glob("frame-*.png")) == [f"frame-{i:04d}.png" for i in range(7)]
    assert Image.open(frames / "session.gif").n_frames == 2  # the session since the reset: prompt and 3
    drawn = [line for line in out.splitlines() if "▀" in line]
    assert len(drawn) == 7 * 16  # 32 characters wide -> 16 rows of two pixels each


def test_terminal_play_writes_no_colour_codes_into_a_pipe(played_run, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO("0 1\nq\n"))
    monkeypatch.setattr(sys.stdout, "isatty", lambda: False)
    assert main(["play", str(played_run), "--terminal"]) == 0
    out = capsys.readouterr().out
    assert "\x1b[" not in out and "▀" not in out
    assert "frame 2 · action 1" in out  # what happened is still said


def test_arrow_keys_follow_an_evaluation_written_elsewhere(played_run, tmp_path, capsys):
    """`genie play RUN --eval DIR`: the arrow keys follow the mapping of `genie eval RUN --out DIR`; a folder
    without eval.json is refused by name."""
    out = tmp_path / "elsewhere"
    assert main(["eval", str(played_run), "--windows", "4", "--out", str(out)]) == 0
    mapping = json.loads((out / "eval.json").read_text())["actions_vs_true"]["real_to_latent"]
    names = json.loads((played_run / "data" / "manifest.json").read_text())["action_names"]
    expected = {f"Arrow{name.title()}": mapping[str(names.index(name))] for name in ("LEFT", "RIGHT", "UP", "DOWN")
                if str(names.index(name)) in mapping}
    assert expected and PlayWorld.load(played_run, eval_dir=out).keys == expected
    capsys.readouterr()
    assert main(["play", str(played_run), "--terminal", "--eval", str(tmp_path)]) == 2
    assert f"--eval {tmp_path}: no eval.json there" in capsys.readouterr().err


def test_terminal_play_compiled_shows_the_same_frames(played_run, tmp_path, monkeypatch, capsys):
    """`--compile` compiles the sampling step before the first frame, and play goes on with the same frames."""
    if not (shutil.which("c++") or shutil.which("g++")):
        pytest.skip("torch.compile on the CPU needs a C++ compiler")
    torch._dynamo.reset()
    frames = {}
    for compiled in (False, True):
        frames[compiled] = tmp_path / f"frames-{compiled}"
        monkeypatch.setattr("sys.stdin", io.StringIO("0 1 2 3 1 0 2\nq\n"))
        argv = ["play", str(played_run), "--terminal", "--no-blocks", "--frames-dir", str(frames[compiled])]
        assert main(argv + ["--compile"] * compiled) == 0
    assert "compiled in" in capsys.readouterr().err
    pictures = [sorted(frames[k].glob("frame-*.png")) for k in (False, True)]
    assert len(pictures[0]) == 8
    plain, compiled = ([np.asarray(Image.open(p)).tolist() for p in pictures[k]] for k in (0, 1))
    assert plain == compiled


def test_compile_errors(played_run):
    play = PlayWorld.load(played_run)
    play.world.sampler = type(play.world.sampler)(attrs.evolve(play.world.sampler.config, cache=False))
    with pytest.raises(GenieError, match="does not sample from the dynamics model's cache here"):
        play.compile_steps()
    play = PlayWorld.load(played_run)

    def broken(**_options):
        def step(*_args):
            raise RuntimeError("Compiler: cc not found\nmore detail")
        play.world.dynamics._cached_step = step
    play.world.dynamics.compile_cached_steps = broken
    with pytest.raises(GenieError, match=r"--compile: torch.compile failed \(Compiler: cc not found\); play without"):
        play.compile_steps()


def test_a_run_without_its_report_plays_with_its_recipes_sampler(played_run, tmp_path):
    run = tmp_path / "unreported"
    shutil.copytree(played_run, run)
    shutil.rmtree(run / "report")
    play = PlayWorld.load(run / "dynamics")  # a folder inside the run is fine too
    assert play.name == "unreported" and play.sampler_options() == {"steps": 2, "temperature": 1.0}
    session = PlaySession(play, play.prompts[0])
    assert session.step(1).shape == (64, 64, 3)


def test_play_command_errors(played_run, tmp_path, capsys):
    assert main(["play", str(tmp_path / "nothing")]) == 2
    assert "not a run (no recipe.json or dynamics/components.json in it or above it)" in capsys.readouterr().err
    assert main(["play", str(played_run), "--terminal", "--prompt-index", "99"]) == 2
    assert "--prompt-index 99: this run has validation frames 0.." in capsys.readouterr().err
    assert main(["play", str(played_run), "--temperature", "-1"]) == 2
    assert "temperature" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_status:  # argparse's own check of the choices
        main(["play", str(played_run), "--host", "0.0.0.0", "--token", "yes"])
    assert exit_status.value.code == 2
    assert "argument --token: invalid choice: 'yes'" in capsys.readouterr().err


def test_an_access_token_guards_every_request(play):
    token = "s3cret-token"
    with PlayServer(play, token=token) as guarded:
        assert guarded.url.endswith(f"/?token={token}")
        for path in ("/", "/api/info", "/api/prompts/0.png", "/api/info?token=wrong"):
            status, answer = request(guarded, "GET", path, raw=True)
            assert status == 403 and b"needs its access token" in answer
        status, _ = request(guarded, "POST", "/api/sessions", {"prompt": 0})
        assert status == 403
        host, port = guarded.httpd.server_address[:2]

        def get(path, headers):
            connection = http.client.HTTPConnection(host, port, timeout=60)
            connection.request("GET", path, headers=headers)
            response = connection.getresponse()
            response.read()
            connection.close()
            return response

        # The printed address: the token moves into a cookie and the page shows at its plain address.
        opened = get(f"/?token={token}", {})
        assert opened.status == 303 and opened.getheader("Location") == "/"
        cookie = opened.getheader("Set-Cookie")
        assert cookie.startswith(f"genie_play_token={token};") and "HttpOnly" in cookie
        assert get("/", {"Cookie": cookie.split(";")[0]}).status == 200
        assert get("/api/info", {"Authorization": f"Bearer {token}"}).status == 200
        assert get(f"/api/info?token={token}", {}).status == 200
        assert get("/api/info", {"Cookie": "genie_play_token=wrong"}).status == 403
        assert get("/api/info", {"Authorization": "Bearer t\u00f6ken".encode().decode("latin-1")}).status == 403
        assert get("/api/info", {"Cookie": 'genie_play_token="unclosed; x=;;'}).status == 403


def test_a_token_is_asked_for_when_other_machines_can_reach_the_server():
    from genie_core.play.server import access_token

    assert access_token("127.0.0.1", "auto") is None and access_token("localhost", "auto") is None
    first, second = access_token("0.0.0.0", "auto"), access_token("0.0.0.0", "auto")
    assert first and second and first != second and len(first) >= 20
    assert access_token("0.0.0.0", "auto", fixed="mine") == "mine"
    assert access_token("0.0.0.0", "none") is None


@pytest.mark.parametrize(("lam_steps", "ema_decay"), [(0, 0.0), (2, 0.0), (0, 0.9)])
def test_a_world_plays_from_a_training_checkpoint(played_run, tmp_path, monkeypatch, lam_steps, ema_decay):
    """`genie play RUN/checkpoints/dynamics[/step-N]`: the world as it stood at that step of the dynamics stage,
    co-trained LAM or one trained alone first; with train.dynamics.ema_decay, the average of its weights, which is
    what the stage would save. The run here keeps its checkpoints as a stage still training does."""
    from safetensors.torch import load_file

    monkeypatch.setattr("genie_core.training.pipeline.discard_checkpoints", lambda folder: None)  # and lam-done
    run = tmp_path / "training"
    overrides = [f"data.path={played_run / 'data'}", "train.dynamics.checkpoint_every=2",
                 f"train.dynamics.lam_steps={lam_steps}", f"train.dynamics.ema_decay={ema_decay}"]
    assert main(["run", str(REPO / "recipes" / "coinrun-smoke.toml"), "--out", str(run), *overrides]) == 0
    newest = PlayWorld.load(run / "checkpoints" / "dynamics")
    named = PlayWorld.load(run / "checkpoints" / "dynamics" / "step-000000002")
    assert newest.name == named.name == "training at step 2"
    saved = load_file(str(run / "checkpoints" / "dynamics" / "step-000000002" / "model.safetensors"))
    assert any(k.startswith("action_model.") for k in saved) == (lam_steps == 0)  # else from dynamics-lam-done
    if ema_decay:
        kept = torch.load(run / "checkpoints" / "dynamics" / "step-000000002" / "weight-average-0.pt")
        average = dict(zip(kept["names"], kept["average"], strict=True))
        assert average.keys() <= saved.keys() and {k.split(".")[0] for k in average} == {"dynamics", "action_model"}
        assert not all(torch.equal(average[k], saved[k]) for k in average)  # the average, not the weights
        saved |= average
    for play in (newest, named):
        weights = play.world.dynamics.state_dict()
        assert all(torch.equal(weights[k.removeprefix("dynamics.")], v)
                   for k, v in saved.items() if k.startswith("dynamics."))
    finished = PlayWorld.load(run)
    assert not all(torch.equal(a, b) for a, b in zip(finished.world.dynamics.state_dict().values(),
                                                     newest.world.dynamics.state_dict().values()))
    session = PlaySession(newest, newest.prompts[0])
    assert session.step(1).shape == (64, 64, 3) and len(session.frames) == 2


def test_checkpoints_that_hold_no_world_are_refused(played_run, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("genie_core.training.pipeline.discard_checkpoints", lambda folder: None)
    run = tmp_path / "training"
    overrides = [f"data.path={played_run / 'data'}", "train.tokenizer.checkpoint_every=2",
                 "train.dynamics.checkpoint_every=2"]
    assert main(["run", str(REPO / "recipes" / "coinrun-smoke.toml"), "--out", str(run), *overrides]) == 0
    assert main(["play", str(run / "checkpoints" / "tokenizer"), "--terminal"]) == 2
    err = capsys.readouterr().err
    assert "a checkpoint of the tokenizer stage; only the dynamics stage's checkpoints hold a world" in err
    recipe = json.loads((run / "recipe.json").read_text())
    recipe["dynamics"]["dim"] = 64  # the run restarted with other settings since the checkpoint
    (run / "recipe.json").write_text(json.dumps(recipe))
    with pytest.raises(GenieError, match="written under other settings than .*recipe.json records"):
        PlayWorld.load(run / "checkpoints" / "dynamics")


def test_frames_are_computed_on_the_thread_that_serves_compute(play, monkeypatch):
    """As `genie play` runs: the HTTP server on its own thread, every frame computed on one other thread (the CLI's
    main one), the same frames as computed on the requests' threads."""
    from genie_core.play.session import Compute
    from genie_core.world.model import World

    inline = PlaySession(play, play.prompts[0], seed=3)
    for action in (1, 2, 3):
        inline.step(action)
    seen = set()
    original = World.decode_shown

    def decode_shown(world, tokens):
        seen.add(threading.get_ident())
        return original(world, tokens)
    monkeypatch.setattr(World, "decode_shown", decode_shown)
    served, stop = PlayWorld(play.world, play.name, play.keys, play.prompts), threading.Event()
    worker = threading.Thread(target=served.compute.serve, args=(stop,))
    worker.start()
    try:
        with PlayServer(served) as server:
            status, state = request(server, "POST", "/api/sessions", {"prompt": 0, "seed": 3})
            for action in (1, 2, 3):
                status, state = request(server, "POST", f"/api/sessions/{state['session']}/step", {"action": action})
                assert status == 200
            assert np.array_equal(png(state["frame"]), inline.frames[-1])
            status, _ = request(server, "GET", f"/api/sessions/{state['session']}/session.gif", raw=True)
            assert status == 200
        assert seen == {worker.ident}
        assert served.compute.run(threading.get_ident) == worker.ident
        assert served.compute.run(served.compute.run, threading.get_ident) == worker.ident  # a job inside a job
        with pytest.raises(GenieError, match="action 9"):
            served.compute.run(served.world.check_actions, torch.tensor([[9]]))
    finally:
        stop.set()
        worker.join()
    assert Compute().run(threading.get_ident) == threading.get_ident()  # nobody serving: the caller's thread
