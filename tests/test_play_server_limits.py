"""`genie play`'s server facing careless and hostile clients: sampler knobs within range and sessions taking turns,
strict bodies, slow and idle connections, an answer for every client, no tracebacks, and no use from other sites.
The API's ordinary behaviour is tested in test_play.py, random requests in test_play_server_fuzz.py."""

from __future__ import annotations

import http.client
import io
import json
import socket
import struct
import threading
import time

import pytest
from PIL import Image

import genie_core.play.session
from genie_core.play.server import Limits, PlayServer
from genie_core.play.session import Abandoned, PlaySession, PlayWorld
from genie_core.world.model import World


@pytest.fixture()
def served(play):
    """As `genie play` runs: every job on one thread that serves the world's Compute, not on the requests'."""
    world = PlayWorld(play.world, play.name, play.keys, play.prompts)
    stop = threading.Event()
    worker = threading.Thread(target=world.compute.serve, args=(stop,), daemon=True)
    worker.start()
    yield world
    stop.set()
    worker.join()


def address(server) -> tuple[str, int]:
    return server.httpd.server_address[:2]


def request(server, method, path, body=None, headers=None, content_type="application/json", timeout=30):
    """(status, answer): the answer as JSON when it is JSON."""
    connection = http.client.HTTPConnection(*address(server), timeout=timeout)
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    sent = {"Content-Type": content_type} if data is not None and content_type else {}
    connection.request(method, path, body=data, headers={**sent, **(headers or {})})
    response = connection.getresponse()
    payload = response.read()
    connection.close()
    is_json = (response.getheader("Content-Type") or "").startswith("application/json")
    return response.status, (json.loads(payload) if is_json else payload)


def raw(server, data: bytes, timeout=10.0, shut_write=False) -> tuple[int, dict]:
    """Sends bytes as they are and reads the one answer: (status, JSON)."""
    with socket.create_connection(address(server), timeout=timeout) as connection:
        sender = threading.Thread(target=_send_all, args=(connection, data, shut_write), daemon=True)
        sender.start()
        response = http.client.HTTPResponse(connection)
        response.begin()
        answer = json.loads(response.read())
        sender.join(timeout)
        return response.status, answer


def _send_all(connection, data, shut_write):
    try:
        connection.sendall(data)
        if shut_write:
            connection.shutdown(socket.SHUT_WR)
    except OSError:  # the server answered and closed before taking it all: that is the point
        pass


def head(server, method, path, length: str, content_type="application/json", extra="") -> bytes:
    host, port = address(server)
    return (f"{method} {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {length}\r\n{extra}\r\n").encode()


def new_session(server, **options) -> str:
    status, state = request(server, "POST", "/api/sessions", {"prompt": 0, **options})
    assert status == 201, state
    return state["session"]


def wait_for(condition, timeout=20.0, what="the server"):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if condition():
            return
        time.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


def block_compute(world: PlayWorld) -> tuple[threading.Event, threading.Thread]:
    """Holds the world's Compute busy with a job until the returned event is set."""
    started, release = threading.Event(), threading.Event()

    def hold():
        started.set()
        release.wait(30)
    blocker = threading.Thread(target=world.compute.run, args=(hold,), daemon=True)
    blocker.start()
    assert started.wait(10)
    return release, blocker


# ------------------------------------------------------------------------------- one request stalls every session


def test_sampler_knobs_stay_within_what_the_server_allows(server):
    """A frame never costs more than the served sampler's: steps up to the run's (2 here), temperature 0..2."""
    sid = new_session(server)
    status, answer = request(server, "POST", f"/api/sessions/{sid}/step", {"action": 1, "steps": 300})
    assert (status, answer["error"]) == (400, "sampler option steps 300 is out of range; this server allows 1..2 "
                                              "(`genie play --steps N` raises it)")
    status, answer = request(server, "POST", f"/api/sessions/{sid}/step", {"action": 1, "temperature": 1e300})
    assert (status, answer["error"]) == (400, "sampler option temperature 1e+300 is out of range; this server "
                                              "allows 0.0..2.0")
    status, state = request(server, "POST", f"/api/sessions/{sid}/step", {"action": 1, "steps": 2, "temperature": 2})
    assert status == 200 and state["frames"] == 2
    assert request(server, "GET", "/api/info")[1]["sampler_ranges"] == {"steps": [1, 2], "temperature": [0.0, 2.0]}


def test_sessions_take_turns_at_the_model(served, monkeypatch):
    """Six new sessions asked for at once delay another session's frame by one prompt encoding, not six."""
    order = []
    encode, decode_shown = World.encode_prompt, World.decode_shown
    monkeypatch.setattr(World, "encode_prompt", lambda world, p: (order.append("new"), encode(world, p))[1])
    monkeypatch.setattr(World, "decode_shown", lambda world, t: (order.append("step"), decode_shown(world, t))[1])
    with PlayServer(served) as server:
        sid = new_session(server)
        order.clear()
        release, blocker = block_compute(served)
        clients = [threading.Thread(target=request, args=(server, "POST", "/api/sessions", {"prompt": 0}))
                   for _ in range(6)]
        for client in clients:
            client.start()
        wait_for(lambda: served.compute.pending() == 6, what="six new sessions waiting")
        stepper = threading.Thread(target=request, args=(server, "POST", f"/api/sessions/{sid}/step", {"action": 1}))
        stepper.start()
        wait_for(lambda: served.compute.pending() == 7, what="the step waiting")
        release.set()
        for thread in (blocker, stepper, *clients):
            thread.join(30)
    assert sorted(order) == ["new"] * 6 + ["step"]
    assert order.index("step") <= 1, order


def test_a_step_whose_client_has_gone_is_never_computed(served):
    with PlayServer(served) as server:
        sid = new_session(server)
        release, blocker = block_compute(served)
        gone = socket.create_connection(address(server))
        body = json.dumps({"action": 1}).encode()
        gone.sendall(head(server, "POST", f"/api/sessions/{sid}/step", str(len(body))) + body)
        wait_for(server.sessions[sid].lock.locked, what="the step waiting")  # for its frame, holding the session
        gone.close()
        release.set()
        blocker.join(30)
        status, state = request(server, "POST", f"/api/sessions/{sid}/step", {"action": 2})
        assert status == 200 and state["actions"] == [2]  # the step of the client that left was dropped


def test_a_gif_is_encoded_beside_the_model_not_on_it(served, monkeypatch):
    """A session's GIF is encoded on its request's thread: it is made while the world's Compute is busy, and while
    it is being encoded another session, and its own, go on stepping. It shows the frames as they were when asked."""
    with PlayServer(served) as server:
        sid, other = new_session(server), new_session(server)
        for action in range(12):
            request(server, "POST", f"/api/sessions/{sid}/step", {"action": action % 4})
        release, blocker = block_compute(served)
        try:
            status, gif = request(server, "GET", f"/api/sessions/{sid}/session.gif")
            assert status == 200 and Image.open(io.BytesIO(gif)).n_frames == 13
            assert served.compute.pending() == 0  # it never asked for a turn
        finally:
            release.set()
            blocker.join(30)

        encoding, proceed, encoders = threading.Event(), threading.Event(), []
        save_gif = genie_core.play.session.save_gif

        def held_save_gif(frames, *args, **kwargs):
            encoders.append(threading.get_ident())
            encoding.set()
            assert proceed.wait(30)
            save_gif(frames, *args, **kwargs)
        monkeypatch.setattr(genie_core.play.session, "save_gif", held_save_gif)
        answers = {}
        downloader = threading.Thread(target=lambda: answers.setdefault(
            "gif", request(server, "GET", f"/api/sessions/{sid}/session.gif")))
        downloader.start()
        assert encoding.wait(30)
        for session in (other, sid):  # both step while the GIF is being encoded
            status, state = request(server, "POST", f"/api/sessions/{session}/step", {"action": 1})
            assert status == 200, state
        proceed.set()
        downloader.join(30)
        status, gif = answers["gif"]
        assert status == 200 and Image.open(io.BytesIO(gif)).n_frames == 13  # taken before the last step
        assert len(server.sessions[sid].frames) == 14
        served_thread = served.compute.run(threading.get_ident)
        assert encoders and served_thread not in encoders


def test_a_gif_stops_once_its_client_has_gone(play):
    session = PlaySession(play, play.prompts[0])
    for action in range(6):
        session.step(action % 4)
    asked = []

    def gone() -> bool:
        asked.append(1)
        return len(asked) > 2
    with pytest.raises(Abandoned):
        session.gif(abandoned=gone)
    assert len(asked) == 3  # asked before each frame; the encoding stopped at the third of seven
    assert Image.open(io.BytesIO(session.gif(abandoned=lambda: False))).n_frames == 7


# ------------------------------------------------------------------------------- Content-Length


@pytest.mark.parametrize("content_type, body", [
    ("application/json", json.dumps({"prompt": 0, "seed": 1, "pad": "x" * 200_000}).encode()),
    ("image/png", (b"\x89PNG\r\n\x1a\n" + bytes(500_000))),
])
def test_a_negative_content_length_is_refused(server, content_type, body):
    """Not read to the end of the stream (past both body limits): refused before any byte of the body."""
    status, answer = raw(server, head(server, "POST", "/api/sessions", "-1", content_type) + body, shut_write=True)
    assert (status, answer) == (400, {"error": "Content-Length -1 is negative; a body has 0 or more bytes"})
    assert server.sessions == {}
    assert request(server, "GET", "/api/info")[0] == 200


def test_bodies_need_one_plain_content_length(server):
    chunked = head(server, "POST", "/api/sessions", "5", extra="Transfer-Encoding: chunked\r\n") + b"0\r\n\r\n"
    status, answer = raw(server, chunked)
    assert status == 501 and answer["error"].startswith("Transfer-Encoding is not supported")
    twice = head(server, "POST", "/api/sessions", "2", extra="Content-Length: 3\r\n") + b"{}"
    assert raw(server, twice) == (400, {"error": "the request has several different Content-Length headers"})
    assert raw(server, head(server, "POST", "/api/sessions", "+2") + b"{}")[0] == 400
    status, answer = raw(server, head(server, "POST", "/api/sessions", "9" * 30))
    assert status == 413 and answer["error"] == "request body of over 10**18 bytes is larger than the 10000 allowed"
    status, answer = raw(server, head(server, "POST", "/api/sessions", "20") + b"{}", shut_write=True)
    assert (status, answer) == (400, {"error": "the body ended after 2 of its 20 bytes"})
    assert server.sessions == {}
    # A client that asks before sending its body hears "100 Continue" only for a body that will be read.
    with socket.create_connection(address(server), timeout=10) as asking:
        asking.sendall(head(server, "POST", "/api/sessions", "30000000", "image/png", "Expect: 100-continue\r\n"))
        assert asking.recv(100).startswith(b"HTTP/1.1 413 ")
    with socket.create_connection(address(server), timeout=10) as asking:
        body = b'{"prompt": 0}'
        asking.sendall(head(server, "POST", "/api/sessions", str(len(body)), extra="Expect: 100-continue\r\n"))
        assert asking.recv(100) == b"HTTP/1.1 100 Continue\r\n\r\n"
        asking.sendall(body)
        response = http.client.HTTPResponse(asking)
        response.begin()
        assert response.status == 201


# ------------------------------------------------------------------------------- idle and slow connections


def test_idle_and_slow_connections_are_dropped_and_capped(play):
    """Connections that send nothing or half a head are closed after `keep_alive_seconds`, one that trickles a
    byte at a time after `request_seconds`, and however many connect, at most `max_connections` hold a thread
    (and as many more, briefly, to be answered 503)."""
    limits = Limits(max_connections=8, keep_alive_seconds=0.5, request_seconds=1.5)
    threads = threading.active_count()
    with PlayServer(play, limits=limits, token="t0ken") as server:
        host, port = address(server)
        idle = [socket.create_connection((host, port), timeout=10) for _ in range(30)]
        halves = [socket.create_connection((host, port), timeout=10) for _ in range(30)]
        for half in halves:
            half.sendall(f"GET /api/info HTTP/1.1\r\nHost: {host}:{port}\r\n".encode())
        time.sleep(0.3)
        assert threading.active_count() <= threads + 1 + 2 * limits.max_connections
        start = time.monotonic()
        for connection in idle + halves:
            wait_for(lambda c=connection: _closed_by_server(c), timeout=5, what="an idle connection closed")
            connection.close()
        assert time.monotonic() - start < 5

        trickler = socket.create_connection((host, port), timeout=10)
        start = time.monotonic()
        for byte in f"GET /api/info HTTP/1.1\r\nHost: {host}:{port}\r\nX-Slow: {'x' * 100}\r\n\r\n".encode():
            try:
                trickler.sendall(bytes([byte]))
            except OSError:
                break
            if _closed_by_server(trickler):
                break
            time.sleep(0.1)  # a byte every 0.15 s: never idle for keep_alive_seconds
        else:
            raise AssertionError("a head trickled over 20 s was read to its end")
        assert time.monotonic() - start < limits.request_seconds + 2
        trickler.close()
        assert request(server, "GET", "/api/info", headers={"Authorization": "Bearer t0ken"})[0] == 200


def test_a_client_gets_in_while_idle_connections_hold_every_place(play):
    """At the cap, a newcomer takes the place of the connection that has waited longest for its request."""
    with PlayServer(play, limits=Limits(max_connections=8, keep_alive_seconds=30), token="t0ken") as server:
        idle = [socket.create_connection(address(server), timeout=10) for _ in range(30)]
        time.sleep(1.2)  # long enough to give their places away
        status, info = request(server, "GET", "/api/info", headers={"Authorization": "Bearer t0ken"}, timeout=5)
        assert status == 200 and info["limits"]["max_connections"] == 8
        assert server.httpd.connections.count() <= 8 * 2
        for connection in idle:
            connection.close()


def _closed_by_server(connection: socket.socket) -> bool:
    """True once the server has closed the connection (whatever it answered before)."""
    connection.settimeout(0.05)
    try:
        while chunk := connection.recv(65536):
            del chunk
        return True
    except TimeoutError:
        return False
    except OSError:
        return True


# ------------------------------------------------------------------------------- bad bodies answer 400


@pytest.mark.parametrize("path, body, status, message", [
    ("/api/sessions", b"[" * 5000, 400, "request body is not valid JSON (nested too deeply)"),
    ("/api/sessions", b'{"prompt": 0, "seed": ' + b"9" * 5000 + b"}", 400,
     "request body has a number of 5000 digits; numbers here have at most 20"),
    ("/api/sessions", b'{"prompt": ' + b"9" * 5000 + b"}", 400,
     "request body has a number of 5000 digits; numbers here have at most 20"),
    ("/api/sessions", b'{"prompt": 0, "seed": 18446744073709551616}', 400,
     "seed 18446744073709551616 is not an integer in 0..18446744073709551615"),
    ("/api/sessions", b'{"prompt": NaN}', 400, "request body has NaN, which is not a JSON number"),
    ("/api/sessions", b'{"prompt": 0, "seed": "\xff"}', 400, "request body is not valid JSON ("),
    ("STEP", b'{"action": ' + b"1" * 5000 + b"}", 400,
     "request body has a number of 5000 digits; numbers here have at most 20"),
    ("STEP", b'{"action": 1, "temperature": Infinity}', 400, "request body has Infinity, which is not a JSON number"),
    ("STEP", b'{"action": 1, "temperature": -1e999}', 400, "sampler option: key 'temperature': 'temperature' must"),
    ("STEP", b'{"action": 1, "steps": 0, "temperature": -1}', 400,  # every problem, on one line
     "sampler option: key 'steps': 'steps' must be > 0: 0; sampler option: key 'temperature': 'temperature' must be "
     ">= 0: -1"),
])
def test_bad_bodies_answer_400(server, path, body, status, message):
    sid = new_session(server)
    path = f"/api/sessions/{sid}/step" if path == "STEP" else path
    answer = request(server, "POST", path, body)
    assert answer[0] == status and answer[1]["error"].startswith(message)
    assert len(server.sessions) == 1


def test_a_prompt_number_of_any_length_answers_404(server):
    status, answer = request(server, "GET", "/api/prompts/" + "9" * 9999 + ".png")
    assert status == 404 and answer["error"].startswith("no prompt '99999999999999999")
    assert len(answer["error"]) < 100


# ------------------------------------------------------------------------------- clients that leave


def test_a_client_that_leaves_before_its_error_leaves_no_traceback(server, capfd):
    sid = new_session(server)
    session = server.sessions[sid]
    with session.lock:  # the request waits for the session, and its client leaves meanwhile
        leaving = socket.create_connection(address(server))
        body = json.dumps({"action": 99}).encode()
        leaving.sendall(head(server, "POST", f"/api/sessions/{sid}/step", str(len(body))) + body)
        time.sleep(0.3)
        leaving.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close with a reset
        leaving.close()
    time.sleep(0.5)  # its error answer finds a reset connection
    assert request(server, "GET", "/api/info")[0] == 200
    err = capfd.readouterr().err
    assert "Traceback" not in err, err


# ------------------------------------------------------------------------------- every client gets an answer


def test_a_burst_of_clients_is_queued_and_answered(server):
    """Sixty clients connect while the server accepts nobody (as when a burst outruns it): each is queued, none
    reset, and each gets 201 or, past the 16 sessions allowed, 503."""
    server.httpd.shutdown()  # stops accepting; the listening socket stays open
    host, port = address(server)
    body = json.dumps({"prompt": 0}).encode()
    clients = []
    for _ in range(60):
        client = socket.create_connection((host, port), timeout=1)  # a full listen queue would drop its SYN
        client.sendall(head(server, "POST", "/api/sessions", str(len(body))) + body)
        clients.append(client)
    threading.Thread(target=server.httpd.serve_forever, daemon=True).start()
    statuses = []
    for client in clients:
        client.settimeout(30)
        response = http.client.HTTPResponse(client)
        response.begin()
        response.read()
        statuses.append(response.status)
        client.close()
    assert sorted(statuses) == [201] * 16 + [503] * 44


def test_connections_past_the_cap_are_answered_503(served):
    """With every place taken by requests being answered, more clients get 503 rather than a reset."""
    with PlayServer(served, limits=Limits(max_connections=4)) as server:
        release, blocker = block_compute(served)
        answers = []
        first = [threading.Thread(target=lambda: answers.append(request(server, "POST", "/api/sessions",
                                                                          {"prompt": 0}))) for _ in range(4)]
        for client in first:
            client.start()
        wait_for(lambda: served.compute.pending() == 4, what="four requests being answered")
        for _ in range(4):
            status, answer = request(server, "POST", "/api/sessions", {"prompt": 0}, timeout=10)
            assert (status, answer["error"]) == (503, "4 connections are open, the most this server allows; try "
                                                      "again in a moment")
        release.set()
        for client in (blocker, *first):
            client.join(30)
        assert [status for status, _ in answers] == [201] * 4


# ------------------------------------------------------------------------------- other sites


def test_only_this_servers_page_and_scripts_use_it(server):
    host, port = address(server)
    sid = new_session(server)
    for name in ("evil.example", "127.0.0.1.evil.example", "localhost.evil.example"):  # DNS rebinding
        status, answer = request(server, "GET", "/api/info", headers={"Host": f"{name}:{port}"})
        assert status == 403 and answer["error"].startswith(f"Host '{name}:{port}' is not this server's address")
    for name in ("localhost", "[::1]", "127.0.0.1", "app.localhost"):
        assert request(server, "GET", "/api/info", headers={"Host": f"{name}:{port}"})[0] == 200
    status, answer = request(server, "POST", "/api/sessions", {"prompt": 0}, headers={"Origin": "https://evil.example"})
    assert status == 403 and answer["error"] == ("Origin 'https://evil.example' is not this server's page; the API "
                                                 "answers its own page and scripts only")
    assert request(server, "POST", "/api/sessions", {"prompt": 0}, headers={"Origin": "null"})[0] == 403
    page = {"Origin": f"http://{host}:{port}"}
    assert request(server, "POST", f"/api/sessions/{sid}/step", {"action": 1}, headers=page)[0] == 200
    status, answer = request(server, "GET", "/api/info", headers={"Sec-Fetch-Site": "cross-site"})
    assert status == 403 and answer["error"].startswith("a cross-site request")
    assert request(server, "GET", "/", headers={"Sec-Fetch-Site": "cross-site"})[0] == 200  # a link to the page
    # What a form or a plain fetch from another page can send without asking first: no JSON Content-Type.
    status, answer = request(server, "POST", "/api/sessions", b"", content_type=None)
    assert status == 415 and answer["error"].startswith("Content-Type '': send JSON")
    status, answer = request(server, "POST", f"/api/sessions/{sid}/step", b'{"action": 1}', content_type="text/plain")
    assert (status, answer["error"]) == (415, "Content-Type 'text/plain': send JSON (application/json)")
    assert request(server, "POST", f"/api/sessions/{sid}/undo", b"", content_type="text/plain")[0] == 415
    assert request(server, "POST", f"/api/sessions/{sid}/undo", None)[0] == 200  # no body: nothing to say
    assert len(server.sessions) == 1 and server.sessions[sid].actions == []


def test_a_server_other_machines_reach_takes_api_tokens_only_from_headers(play):
    """Served on every interface, a token in the URL opens the page (which moves it into a cookie), and the API
    takes it from the header or the cookie only: URLs end up in logs and Referer headers."""
    with PlayServer(play, host="0.0.0.0", token="lan-t0ken") as server:
        port = address(server)[1]
        status, answer = request(server, "GET", "/api/info?token=lan-t0ken")
        assert (status, answer["error"]) == (403, "on this address the API takes the access token from an "
                                                  "'Authorization: Bearer TOKEN' header or the page's cookie, not "
                                                  "from the URL")
        assert request(server, "GET", "/api/info", headers={"Authorization": "Bearer lan-t0ken"})[0] == 200
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        connection.request("GET", "/?token=lan-t0ken")
        opened = connection.getresponse()
        opened.read()
        assert opened.status == 303 and opened.getheader("Location") == "/"
        assert opened.getheader("Referrer-Policy") == "no-referrer"
        cookie = opened.getheader("Set-Cookie").split(";")[0]
        assert request(server, "GET", "/api/info", headers={"Cookie": cookie})[0] == 200
        status, page = request(server, "GET", "/", headers={"Cookie": cookie})
        assert status == 200 and b"EventSource" in page
        assert server.serves_host(server.url.split("/")[2])  # the printed address
        machine = server.url.split("/")[2].split(":")[0]
        assert request(server, "GET", "/api/info", headers={"Cookie": cookie, "Host": f"{machine}:{port}"})[0] == 200
        assert request(server, "GET", "/api/info", headers={"Cookie": cookie, "Host": "evil.example"})[0] == 403
