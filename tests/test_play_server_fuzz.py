"""Random requests at `genie play`'s server (Hypothesis): whatever the method, path, headers and body, every request
gets an HTTP answer, never a 500, nothing is printed to stderr, and the server goes on serving. The suite runs the
same 150 examples of each test every time; GENIE_FUZZ_EXAMPLES=N runs N new random ones instead, to search further."""

from __future__ import annotations

import http.client
import io
import json
import os
import socket

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from genie_core.play.server import TOKEN_COOKIE, Limits, PlayServer
from genie_core.play.session import PlayWorld

TOKEN = "fuzz-t0ken"
SEARCH = os.environ.get("GENIE_FUZZ_EXAMPLES")
FUZZ = settings(max_examples=int(SEARCH or 150), derandomize=not SEARCH, deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@pytest.fixture(scope="module")
def fuzzed(played_run):
    """A server with a token (so that requests without it are tried too), short timeouts (so that a request that
    promises more than it sends costs half a second) and one session to aim at."""
    limits = Limits(max_sessions=1000, keep_alive_seconds=0.5, request_seconds=2.0)
    with PlayServer(PlayWorld.load(played_run), limits=limits, token=TOKEN) as server:
        host, port = server.httpd.server_address[:2]
        connection = http.client.HTTPConnection(host, port, timeout=30)
        connection.request("POST", "/api/sessions", body=b'{"prompt": 0}',
                           headers={"Content-Type": "application/json", "Authorization": f"Bearer {TOKEN}"})
        server.fuzzed_session = json.loads(connection.getresponse().read())["session"]
        connection.close()
        yield server


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (30, 60, 90)).save(buffer, "PNG")
    return buffer.getvalue()


# The parts of a request: a valid one to one of the API's routes, most of the time, with a few things made wrong.
text = st.text(st.characters(min_codepoint=32, max_codepoint=255, exclude_characters="\x7f"), max_size=40)
numbers = st.one_of(st.integers(-10, 10), st.integers(), st.floats(allow_nan=False), st.just(10**25))
scalars = st.one_of(st.none(), st.booleans(), numbers, text)
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(text, inner,
                                                                                              max_size=3), max_leaves=8)
anything = st.one_of(numbers, text, json_values)
step_fields = st.fixed_dictionaries({"action": st.one_of(st.integers(0, 3), anything)},
                                    optional={"steps": st.one_of(st.integers(1, 3), anything),
                                              "temperature": st.one_of(st.floats(0, 3), anything),
                                              "top_k": anything})
session_fields = st.fixed_dictionaries({}, optional={"prompt": st.one_of(st.integers(0, 3), anything),
                                                     "seed": st.one_of(st.integers(0, 2**64), anything),
                                                     "path": text})
odd_bodies = st.one_of(
    st.binary(max_size=300),
    json_values.map(lambda value: json.dumps(value).encode()),
    st.integers(1, 3000).map(lambda n: b"[" * n),
    st.sampled_from([b'{"action": NaN}', b'{"seed": ' + b"7" * 5000 + b"}", b"\xff\xfe{}", _png()[:20], b"{}"]),
)
ROUTES = {  # method, path -> what a valid body is
    ("GET", "/"): st.just(b""),
    ("GET", "/api/info"): st.just(b""),
    ("GET", "/api/prompts/0.png"): st.just(b""),
    ("POST", "/api/sessions"): session_fields.map(lambda value: json.dumps(value).encode()),
    ("POST", "/api/sessions/SID/step"): step_fields.map(lambda value: json.dumps(value).encode()),
    ("POST", "/api/sessions/SID/undo"): st.just(b""),
    ("POST", "/api/sessions/SID/reset"): st.just(b"{}"),
    ("GET", "/api/sessions/SID/session.gif"): st.just(b""),
    ("GET", "/api/sessions/SID"): st.just(b""),
    ("GET", "/api/sessions/SID/events"): st.just(b""),
    ("DELETE", "/api/sessions/nope"): st.just(b""),
}
methods = st.one_of(st.sampled_from(["GET", "POST", "DELETE", "HEAD", "PUT", "OPTIONS", "PATCH", "get"]),
                    st.text("ABCDEFGHIJKLMNOPQRSTUVWXYZ-_", min_size=1, max_size=12))
paths = st.one_of(
    st.sampled_from([path for _, path in ROUTES] + [
        "/api/prompts/99.png", "/api/sessions/nope/step", "//api/info", "/api/info/", "/?token=" + TOKEN,
        "/?token=x&token=y", "/api/info?token=" + TOKEN, "/api/prompts/" + "9" * 5000 + ".png", "*",
        "http://x/api/info", "/api/sessions/" + "a" * 3000, "/a b", "/%00"]),
    st.text(st.characters(min_codepoint=33, max_codepoint=126), max_size=60).map(lambda p: "/" + p),
)
HEADER_VALUES = {  # what a header may be made into; None leaves it out
    "Host": st.one_of(st.sampled_from([None, "localhost", "evil.example", "[::1]:1", "", "a:b:c", "[::1"]), text),
    "Authorization": st.one_of(st.sampled_from([None, "Bearer x", "Basic abc", "Bearer"]), text),
    "Content-Type": st.one_of(st.sampled_from([None, "application/json; charset=utf-8", "image/png", "image/jpeg",
                                               "text/plain", "multipart/form-data; boundary=x", "",
                                               "APPLICATION/JSON"]), text),
    "Content-Length": st.one_of(st.sampled_from([None, "-1", "0", "+5", "1e3", " 12", "99999999999999999999999",
                                                 "5, 5", "0x10", ""]), st.integers(-5, 20_000).map(str), text),
    "Origin": st.one_of(st.sampled_from(["http://HOST", "https://evil.example", "null"]), text),
    "Sec-Fetch-Site": st.sampled_from(["cross-site", "same-site", "same-origin", "none"]),
    "Transfer-Encoding": st.sampled_from(["chunked", "gzip", "identity"]),
    "Expect": st.sampled_from(["100-continue", "nothing"]),
    "Connection": st.sampled_from(["close", "keep-alive", "Upgrade"]),
    "Cookie": st.one_of(st.sampled_from([f"{TOKEN_COOKIE}={TOKEN}", f'{TOKEN_COOKIE}="x;', "a=b"]), text),
    "X-Anything": text,
}


@st.composite
def requests(draw) -> tuple[str, bytes, bool]:
    """(method, the request's bytes, whether its body is cut short of its Content-Length)."""
    if draw(st.integers(0, 3)):
        (method, path), body = draw(st.sampled_from(list(ROUTES.items())))
        body = draw(body)
    else:
        method, path, body = draw(methods), draw(paths), b""
    if draw(st.integers(0, 3)) == 0:
        body = draw(odd_bodies)
    if body.startswith(b"\x89PNG") or (path == "/api/sessions" and draw(st.integers(0, 5)) == 0):
        body, content_type = _png(), "image/png"
    else:
        content_type = "application/json"
    headers = {"Host": "HOST", "Authorization": f"Bearer {TOKEN}"}
    if body or method == "POST":
        headers |= {"Content-Type": content_type, "Content-Length": str(len(body))}
    for _ in range(draw(st.integers(0, 2))):  # a few things wrong
        name = draw(st.sampled_from(sorted(HEADER_VALUES)))
        value = draw(HEADER_VALUES[name])
        if value is None:
            headers.pop(name, None)
        else:
            headers[name] = value
    lines = [f"{method} {path} HTTP/1.1"] + [f"{name}: {value}" for name, value in headers.items()]
    if draw(st.integers(0, 9)) == 0:  # a header twice
        lines.append(draw(st.sampled_from(["Host: localhost", "Content-Length: 3", f"Authorization: Bearer {TOKEN}"])))
    length = headers.get("Content-Length", "")
    cut_short = length.isascii() and length.isdigit() and int(length) > len(body)
    return method, "\r\n".join(lines).encode("latin-1") + b"\r\n\r\n" + body, cut_short


def _exchange(server, data: bytes, method: str, shut_write: bool) -> http.client.HTTPResponse | None:
    """Sends the bytes and reads one answer (its body too, except an event stream's); None if none came."""
    host, port = server.httpd.server_address[:2]
    data = data.replace(b"HOST", f"{host}:{port}".encode()).replace(b"SID", server.fuzzed_session.encode())
    with socket.create_connection((host, port), timeout=20) as connection:
        try:
            connection.sendall(data)
            if shut_write:
                connection.shutdown(socket.SHUT_WR)
        except OSError:  # answered and closed before taking a body it refused
            pass
        response = http.client.HTTPResponse(connection, method=method)
        try:
            response.begin()
        except http.client.RemoteDisconnected:
            return None
        if response.getheader("Content-Type") != "text/event-stream":
            response.body = response.read()
        return response


def _check(response: http.client.HTTPResponse) -> None:
    assert response.status != 500, response.body
    assert 100 <= response.status < 600
    if response.status >= 400 and response.body:
        answer = json.loads(response.body)
        assert isinstance(answer["error"], str) and "\n" not in answer["error"]


@FUZZ
@given(request=requests())
def test_random_requests_get_an_answer_and_never_a_500(fuzzed, capfd, request):
    method, data, cut_short = request
    response = _exchange(fuzzed, data, method, shut_write=cut_short)
    assert response is not None, data[:300]
    _check(response)
    assert capfd.readouterr().err == ""


@FUZZ
@given(data=st.binary(min_size=1, max_size=400))
def test_random_bytes_get_an_answer(fuzzed, capfd, data):
    """Anything at all, then the end of the stream: an answer for anything but blank lines (which ask nothing)."""
    response = _exchange(fuzzed, data, "GET", shut_write=True)
    if data.decode("latin-1").split():  # (blank as http.server sees it: str.split's whitespace)
        assert response is not None, data
        _check(response)
    assert capfd.readouterr().err == ""


def test_the_server_still_serves_after_the_fuzzing(fuzzed):
    host, port = fuzzed.httpd.server_address[:2]
    connection = http.client.HTTPConnection(host, port, timeout=30)
    connection.request("GET", "/api/info", headers={"Authorization": f"Bearer {TOKEN}"})
    assert connection.getresponse().status == 200
