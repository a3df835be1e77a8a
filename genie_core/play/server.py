"""`genie play RUN`: a local web server that lets people play a trained world in the browser.

The page (page.html, no build step, no outside resources) sends actions; frames come back on a server-sent event
stream as they are generated, so holding a key plays continuously. Each browser tab has its own session; sessions
left alone for `idle_seconds` are dropped. Every answer of the JSON API is either the result or {"error": sentence},
and a bad request never stops the server. Nothing the client sends names a file: prompts are uploaded images or the
index of one of the run's validation frames.

    GET  /                              the page
    GET  /api/info                      the world: actions, arrow keys, sampler knobs and their ranges, prompts, limits
    GET  /api/prompts/I.png             validation prompt I
    POST /api/sessions                  JSON {"prompt": I, "seed": S} or an uploaded PNG/JPEG body -> a new session
    GET  /api/sessions/ID/events        server-sent events: a "frame" event for every change
    POST /api/sessions/ID/step          JSON {"action": A, "steps": N, "temperature": T} -> the new frame
    POST /api/sessions/ID/undo | reset  -> the frame shown afterwards (no body, or JSON {}); reset goes back to the
                                        prompt and seeds the session's generator again, so the same actions replay
                                        the frames a new session with its seed gives
    GET  /api/sessions/ID/session.gif   the session's kept frames (its last `max_frames`)
    DELETE /api/sessions/ID

A session's state (the answer to a change, and each event) is {"session", "event", "frame": a PNG data: URL,
"frames": how many the session has (the prompt included), "actions": its last RECENT_ACTIONS (32) actions,
"fps"}: a long session's whole list would grow with every frame, and it is sent twice a frame.

With an access token (`genie play --host` on an address other people can reach gets one by itself), every request
must carry it: opening the printed address (`/?token=T`) stores it in a cookie for the page's own requests, and
scripts send `Authorization: Bearer T`. Without it the answer is 403. On such an address the API takes the token
only from the header or the cookie, never from the URL, which ends up in logs and Referer headers.

What the server promises whoever connects (the numbers are `Limits`' defaults):
- Only this machine's page and scripts drive it: the Host header must name this server (an IP address, localhost,
  or this machine's name when it serves other machines), a request with an Origin header must come from the page
  itself, the API refuses cross-site fetches (Sec-Fetch-Site), and bodies are JSON (or an image, to start a
  session) with their Content-Type saying so. Other web pages the browser visits can neither drive nor read it.
- Every request gets an HTTP answer or a closed connection, never a reset while it is answered: at most
  `max_connections` (100) are open at once; past that, a new connection takes the place of the one that has
  waited longest (over a second) for its request, or is answered 503 (and past twice that, closed at once). A
  connection has `keep_alive_seconds` (15) between requests and `request_seconds` (60) to send a whole request.
- Bodies: a Content-Length of digits (no chunked bodies), at most `max_json_bytes` (10 kB) of JSON and
  `max_upload_bytes` (5 MB) of image; JSON of at most 20 digits a number and no NaN; anything else is a 4xx.
- Frames are computed one at a time, sessions taking turns; a player's sampler knobs stay within
  `PlayWorld.knob_ranges()` (steps: at most the served sampler's), and a request whose client has gone is dropped
  before its frame is computed.
- A session keeps its last `max_frames` (1,000) frames: its GIF shows them and undo goes back no further. The GIF
  is encoded on its request's thread, frame by frame, never where frames are computed: downloading one holds up no
  one's frames, and it stops when its client goes.
"""

from __future__ import annotations

import base64
import hmac
import io
import ipaddress
import json
import queue
import re
import secrets
import select
import socket
import sys
import threading
import time
from http import HTTPStatus
from http.cookies import CookieError, SimpleCookie
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from urllib.parse import parse_qs

import attrs
import numpy as np
from PIL import Image

from genie_core.config import MAX_SEED
from genie_core.errors import GenieError
from genie_core.io.media import decode_image, save_png
from genie_core.play.session import MAX_FRAMES, Abandoned, PlaySession, PlayWorld

UPLOAD_TYPES = {"image/png": "PNG", "image/jpeg": "JPEG"}
TOKEN_COOKIE = "genie_play_token"
LOOPBACK = ("127.0.0.1", "localhost", "::1")
MAX_DIGITS = 20  # the longest number a JSON body may hold: a seed below 2**64 (MAX_SEED)
RECENT_ACTIONS = 32  # actions a session's state carries (the page shows the last 12)


@attrs.define(frozen=True)
class Limits:
    max_sessions: int = 16
    idle_seconds: float = 600.0  # a session nobody used for this long ends
    max_upload_bytes: int = 5_000_000
    max_upload_pixels: int = 4096 * 4096
    max_json_bytes: int = 10_000
    max_connections: int = 100  # open at once (each holds a thread and a file descriptor)
    keep_alive_seconds: float = 15.0  # an open connection's wait for the next byte of a request
    request_seconds: float = 60.0  # to send a whole request (head and body), from when the connection is ready
    send_seconds: float = 30.0  # a client that takes nothing of an answer for this long is dropped
    max_frames: int = MAX_FRAMES  # a session's most recent frames kept: its GIF, how far undo goes back


class ApiError(Exception):
    def __init__(self, status: HTTPStatus, message: str):
        super().__init__(message)
        self.status = status


class _Answered(Exception):
    """The request has had its answer (a redirect); nothing more to do."""


def access_token(host: str, choice: str, fixed: str | None = None) -> str | None:
    """The token `genie play` asks for: `choice` "auto" gives one (`fixed`, else a random one) when the server can
    be reached from other machines and none on this machine only; "none" never asks for one."""
    if choice == "none" or host in LOOPBACK:
        return None
    return fixed or secrets.token_urlsafe(16)


def png_data_url(frame: np.ndarray) -> str:
    """uint8 [H, W, 3] -> a data: URL of its PNG (the page upscales it, nearest neighbour)."""
    buffer = io.BytesIO()
    Image.fromarray(frame).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _shown(value, most: int = 40) -> str:
    """repr(value), cut short: an error message never repeats a client's 10,000 characters."""
    return _cut(repr(value), most)


def _plain(text: str, most: int = 40) -> str:
    """A client's text without quotes (control characters escaped), cut short."""
    return _cut(repr(text)[1:-1], most)


def _cut(text: str, most: int) -> str:
    return text if len(text) <= most else text[: most - 3] + "..."


def _is_loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _json_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_DIGITS:  # before int(): Python refuses 4,300 digits and more with a ValueError
        raise ApiError(HTTPStatus.BAD_REQUEST, f"request body has a number of {len(text)} digits; numbers here have "
                                               f"at most {MAX_DIGITS}")
    return int(text)


def _json_constant(name: str):
    raise ApiError(HTTPStatus.BAD_REQUEST, f"request body has {name}, which is not a JSON number")


def parse_json_object(raw: bytes) -> dict:
    """A request body -> the JSON object it holds (an empty body is {}), or a 400 saying what is wrong."""
    try:
        value = json.loads(raw or b"{}", parse_int=_json_int, parse_constant=_json_constant)
    except RecursionError:
        raise ApiError(HTTPStatus.BAD_REQUEST, "request body is not valid JSON (nested too deeply)") from None
    except ValueError as error:  # JSONDecodeError, and text that is not UTF-8
        raise ApiError(HTTPStatus.BAD_REQUEST, f"request body is not valid JSON ({error})") from None
    if not isinstance(value, dict):
        raise ApiError(HTTPStatus.BAD_REQUEST, "request body must be a JSON object")
    return value


def peer_closed(connection: socket.socket) -> bool:
    """Whether the client has closed or reset this connection. HTTP clients send nothing more while they wait for
    an answer, so a readable socket means end of file or a request sent ahead, and a peek tells which."""
    try:
        if hasattr(select, "poll"):
            poller = select.poll()
            poller.register(connection, select.POLLIN)
            if not poller.poll(0):
                return False
        elif not select.select([connection], [], [], 0)[0]:
            return False
        return connection.recv(1, socket.MSG_PEEK) == b""
    except (OSError, ValueError):  # reset, or closed on our side
        return True


# ----------------------------------------------------------------------------------------------- connections

READING, ANSWERING, REFUSED = "reading", "answering", "refused"
EVICTABLE_AFTER = 1.0  # seconds a connection must have waited for its request before a newer one may take its place
REFUSAL_SECONDS = 2.0  # to send the request a 503 answers


class ConnectionTable:
    """Every open connection, what it is doing (reading its next request, answering one, or being turned away with
    503) and since when: the cap on how many are open, and which to close first."""

    def __init__(self, limit: int):
        self.limit = limit
        self._lock = threading.Lock()
        self._open: dict[socket.socket, tuple[str, float]] = {}

    def admit(self, connection: socket.socket) -> str | None:
        """READING for a connection that may go on; at the cap, the one that has waited longest for its request
        (over EVICTABLE_AFTER) is closed to make room. Else REFUSED (answer it 503), or None once as many are being
        refused as may be open (close it now)."""
        now = time.monotonic()
        with self._lock:
            counted = [(since, c) for c, (state, since) in self._open.items() if state != REFUSED]
            if len(counted) >= self.limit:
                waiting = [(since, c) for since, c in counted
                           if self._open[c][0] == READING and now - since > EVICTABLE_AFTER]
                if not waiting:
                    refused = len(self._open) - len(counted)
                    if refused >= self.limit:
                        return None
                    self._open[connection] = (REFUSED, now)
                    return REFUSED
                oldest = min(waiting, key=lambda entry: entry[0])[1]
                del self._open[oldest]
                _shut(oldest)
            self._open[connection] = (READING, now)
            return READING

    def state(self, connection: socket.socket) -> str | None:
        with self._lock:
            entry = self._open.get(connection)
        return entry and entry[0]

    def mark(self, connection: socket.socket, state: str) -> None:
        with self._lock:
            if connection in self._open and self._open[connection][0] != REFUSED:
                self._open[connection] = (state, time.monotonic())

    def remove(self, connection: socket.socket) -> None:
        with self._lock:
            self._open.pop(connection, None)

    def count(self) -> int:
        with self._lock:
            return len(self._open)

    def close_overdue(self, request_seconds: float) -> None:
        """Closes the connections that are still sending a request after `request_seconds` (REFUSAL_SECONDS for
        those being refused): trickling a byte at a time holds no connection for long."""
        now = time.monotonic()
        with self._lock:
            overdue = [c for c, (state, since) in self._open.items()
                       if (state == READING and now - since > request_seconds)
                       or (state == REFUSED and now - since > REFUSAL_SECONDS)]
            for connection in overdue:
                del self._open[connection]
        for connection in overdue:
            _shut(connection)

    def close_waiting(self) -> None:
        """Closes the connections waiting for a request (or being refused); answers in progress go on."""
        with self._lock:
            waiting = [c for c, (state, _) in self._open.items() if state != ANSWERING]
            for connection in waiting:
                del self._open[connection]
        for connection in waiting:
            _shut(connection)


def _shut(connection: socket.socket) -> None:
    """Ends a connection another thread serves: its reads return end of file and it finishes."""
    try:
        connection.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


class PlayHTTPServer(ThreadingHTTPServer):
    """ThreadingHTTPServer (a thread per connection) with a cap on connections, deadlines for slow clients, a long
    listen queue, closes that let the client read its answer, and no tracebacks for clients that go away."""

    daemon_threads = True
    request_queue_size = 256  # connections waiting to be accepted: a burst of clients is queued, not reset
    linger_seconds = 1.0  # to read what a client still sends after its answer, before closing
    linger_bytes = 1 << 20

    def __init__(self, address, player: PlayServer):
        self.player = player
        self.connections = ConnectionTable(player.limits.max_connections)
        super().__init__(address, PlayHandler)

    def process_request(self, request, client_address):
        if self.connections.admit(request) is None:
            self.close_request(request)  # as many are being refused as may be open: no thread for this one
            return
        super().process_request(request, client_address)

    def service_actions(self):  # serve_forever calls this twice a second
        self.connections.close_overdue(self.player.limits.request_seconds)

    def shutdown_request(self, request):
        """Ends a connection so that the client can read the whole answer: closing a socket with unread bytes in
        it (a body we refused to read) would reset the connection and lose the answer on the client's side."""
        self.connections.remove(request)
        try:
            request.shutdown(socket.SHUT_WR)
            deadline = time.monotonic() + self.linger_seconds
            drained = 0
            while drained < self.linger_bytes and (left := deadline - time.monotonic()) > 0:
                request.settimeout(left)
                chunk = request.recv(65536)
                if not chunk:
                    break
                drained += len(chunk)
        except OSError:
            pass
        self.close_request(request)

    def handle_error(self, request, client_address):
        error = sys.exc_info()[1]
        if isinstance(error, OSError):  # a client that went away or timed out: nothing to report
            return
        print(f"genie play: {type(error).__name__}: {error} (connection from {client_address[0]})", file=sys.stderr)


# ----------------------------------------------------------------------------------------------- requests


class _LineReader:
    """A connection's reader that remembers whether its last line was the end of the stream: a request head cut
    short, which is never acted on."""

    def __init__(self, reader):
        self.reader = reader
        self.ended = False

    def readline(self, limit: int = -1) -> bytes:
        line = self.reader.readline(limit)
        self.ended = not line
        return line

    def read(self, size: int = -1) -> bytes:
        return self.reader.read(size)

    def close(self) -> None:
        self.reader.close()


@attrs.define(frozen=True)
class Route:
    method: str
    pattern: re.Pattern
    action: str  # the PlayHandler method that answers it, called with the pattern's groups
    body: str = "none"  # what it reads: "none", "json" (or nothing), "json or image" (one of them, said so)


ROUTES = (
    Route("GET", re.compile(r"/"), "page"),
    Route("GET", re.compile(r"/api/info"), "info"),
    Route("GET", re.compile(r"/api/prompts/(\d+)\.png"), "prompt_png"),
    Route("POST", re.compile(r"/api/sessions"), "create", body="json or image"),
    Route("GET", re.compile(r"/api/sessions/([\w-]+)/events"), "events"),
    Route("POST", re.compile(r"/api/sessions/([\w-]+)/(step|undo|reset)"), "change", body="json"),
    Route("GET", re.compile(r"/api/sessions/([\w-]+)/session\.gif"), "gif"),
    Route("GET", re.compile(r"/api/sessions/([\w-]+)"), "describe"),
    Route("DELETE", re.compile(r"/api/sessions/([\w-]+)"), "delete"),
)


class CheckedRequestHandler(BaseHTTPRequestHandler):
    """One connection of a PlayHTTPServer: each request is checked in `_dispatch` (its request line, its address,
    where it comes from, its token, its route, its body) and then handed to its route's method, which the subclass
    has; an error at any point is answered {"error": ...}."""

    server: PlayHTTPServer
    protocol_version = "HTTP/1.1"
    default_request_version = "HTTP/1.0"  # a request line without a version still gets a status line and headers
    disable_nagle_algorithm = True  # answers and events are small writes: send each at once
    server_version = "genie-play"

    def log_message(self, *args):  # quiet: one line per frame would drown the terminal
        pass

    def do_GET(self):
        self._dispatch()

    # Every method a route might take goes through the route table, so that the answer is 404 or 405 in JSON.
    do_POST = do_DELETE = do_PUT = do_PATCH = do_HEAD = do_OPTIONS = do_GET

    @property
    def player(self) -> PlayServer:
        return self.server.player

    @property
    def limits(self) -> Limits:
        return self.server.player.limits

    def setup(self):
        super().setup()
        self.rfile = _LineReader(self.rfile)

    def parse_request(self) -> bool:
        for _ in range(8):  # blank lines before a request line are skipped (RFC 9112, 2.2), not taken for the end
            if str(self.raw_requestline, "iso-8859-1").split():  # (blank as http.server sees it)
                break
            self.raw_requestline = self.rfile.readline(65537)
        if len(self.raw_requestline) > 65536:
            self.send_error(HTTPStatus.REQUEST_URI_TOO_LONG)
            return False
        if not super().parse_request():
            return False
        if self.rfile.ended:  # http.client takes the end of the stream for the blank line that ends the head
            self.send_error(HTTPStatus.BAD_REQUEST, "the request head ended before its blank line")
            return False
        return True

    def handle_one_request(self):
        connections = self.server.connections
        if connections.state(self.connection) is None:  # closed to make room or overdue
            self.close_connection = True
            return
        connections.mark(self.connection, READING)
        refused = connections.state(self.connection) == REFUSED
        self.connection.settimeout(REFUSAL_SECONDS if refused else self.limits.keep_alive_seconds)
        self._body_read = False
        self._expects_continue = False
        super().handle_one_request()

    def handle_expect_100(self) -> bool:
        self._expects_continue = True  # "100 Continue" once the request has passed its checks (`_read_body`)
        return True

    def client_gone(self) -> bool:
        return peer_closed(self.connection)

    # ------------------------------------------------------------------------------------------- checks

    def _dispatch(self):
        path, _, query = self.path.partition("?")
        try:
            self._check_request_line()
            if self.server.connections.state(self.connection) == REFUSED:
                raise ApiError(HTTPStatus.SERVICE_UNAVAILABLE, f"{self.limits.max_connections} connections are open, "
                                                               f"the most this server allows; try again in a moment")
            self._check_host()
            self._check_origin(path)
            self._authorize(path, query)
            route, groups = self._route(path)
            body = self._read_body(route)
            self.server.connections.mark(self.connection, ANSWERING)
            self.connection.settimeout(self.limits.send_seconds)
            getattr(self, route.action)(*groups, **({"body": body} if route.body != "none" else {}))
        except _Answered:
            pass
        except (Abandoned, ConnectionError):  # the client has gone: nobody to answer
            self.close_connection = True
        except TimeoutError:
            self._answer_error(HTTPStatus.REQUEST_TIMEOUT, "the request did not arrive in time")
        except ApiError as error:
            self._answer_error(error.status, str(error))
        except GenieError as error:
            self._answer_error(HTTPStatus.BAD_REQUEST, str(error))
        except Exception as error:  # noqa: BLE001 - a bug answers 500 and the server goes on
            print(f"genie play: internal error on {self.command} {path}: {type(error).__name__}: {error}",
                  file=sys.stderr)
            self._answer_error(HTTPStatus.INTERNAL_SERVER_ERROR, f"internal error: {type(error).__name__}: {error}")

    def _check_request_line(self):
        if len(self.requestline.split()) != 3:
            raise ApiError(HTTPStatus.BAD_REQUEST, "the request line must be METHOD PATH HTTP/1.x")

    def _check_host(self):
        """The Host header must name this server: a page on another name that resolves here (DNS rebinding) is
        refused. IP addresses cannot be rebound; the port is not checked (an SSH tunnel changes it)."""
        hosts = self.headers.get_all("Host") or []
        if len(hosts) != 1:
            raise ApiError(HTTPStatus.BAD_REQUEST, "a request needs exactly one Host header")
        if not self.player.serves_host(hosts[0]):
            raise ApiError(HTTPStatus.FORBIDDEN, f"Host {_shown(hosts[0])} is not this server's address; open it as "
                                                 f"{self.player.host_names_said()}")

    def _check_origin(self, path: str):
        """Browsers say where a request comes from: only the page itself may use the API (scripts send no
        Origin). Links from other sites to the page itself still open it."""
        origin = self.headers.get("Origin")
        if origin is not None and origin.partition("://")[2].lower() != (self.headers.get("Host") or "").lower():
            raise ApiError(HTTPStatus.FORBIDDEN, f"Origin {_shown(origin)} is not this server's page; the API answers "
                                                 f"its own page and scripts only")
        site = (self.headers.get("Sec-Fetch-Site") or "").lower()
        if path.startswith("/api/") and site in ("cross-site", "same-site"):
            raise ApiError(HTTPStatus.FORBIDDEN, f"a {site} request; the API answers its own page and scripts only")

    def _authorize(self, path: str, query: str):
        player = self.player
        if player.token is None:
            return
        try:
            from_query = parse_qs(query).get("token", [None])[0]
        except ValueError:  # more fields than parse_qs takes
            from_query = None
        if path == "/" and from_query is not None and player.allows(from_query):
            # The printed address: keep the token in a cookie for the page's own requests (fetch, event
            # stream, images, GIF) and show the page at its plain address.
            cookie = f"{TOKEN_COOKIE}={from_query}; Path=/; HttpOnly; SameSite=Strict"
            self._send(b"", "text/plain", HTTPStatus.SEE_OTHER, {"Location": "/", "Set-Cookie": cookie})
            raise _Answered
        bearer = (self.headers.get("Authorization") or "").removeprefix("Bearer ").strip() or None
        try:
            cookie = SimpleCookie(self.headers.get("Cookie") or "").get(TOKEN_COOKIE)
        except CookieError:  # a malformed header counts as no cookie
            cookie = None
        presented = [bearer, cookie.value if cookie else None]
        if player.on_loopback or path == "/":
            presented.append(from_query)  # on other machines' reach, a URL's token opens the page only
        if any(player.allows(token) for token in presented if token):
            return
        if from_query is not None and not player.on_loopback:
            raise ApiError(HTTPStatus.FORBIDDEN, "on this address the API takes the access token from an "
                                                 "'Authorization: Bearer TOKEN' header or the page's cookie, not "
                                                 "from the URL")
        raise ApiError(HTTPStatus.FORBIDDEN, "this server needs its access token: open the address it printed "
                                             "(ending in ?token=...), or send 'Authorization: Bearer TOKEN'")

    def _route(self, path: str) -> tuple[Route, tuple]:
        allowed = []
        for route in ROUTES:
            match = route.pattern.fullmatch(path)
            if match and route.method == self.command:
                return route, match.groups()
            if match:
                allowed.append(route.method)
        if allowed:
            raise ApiError(HTTPStatus.METHOD_NOT_ALLOWED, f"{_plain(self.command)} {_plain(path)}: use "
                                                          f"{' or '.join(allowed)}")
        raise ApiError(HTTPStatus.NOT_FOUND, f"no such address: {_plain(path, 80)}")

    def _content_type(self) -> str:
        return (self.headers.get("Content-Type") or "").split(";")[0].strip().lower()

    def _read_body(self, route: Route) -> bytes:
        """The whole body, after checking how long it says it is (digits only, within the route's limit) and that
        its Content-Type is what the route reads."""
        if self.headers.get("Transfer-Encoding") is not None:
            raise ApiError(HTTPStatus.NOT_IMPLEMENTED, "Transfer-Encoding is not supported; send the body with a "
                                                       "Content-Length")
        lengths = {value.strip() for value in self.headers.get_all("Content-Length") or []}
        if len(lengths) > 1:
            raise ApiError(HTTPStatus.BAD_REQUEST, "the request has several different Content-Length headers")
        text = lengths.pop() if lengths else "0"
        if re.fullmatch(r"-\d+", text):
            raise ApiError(HTTPStatus.BAD_REQUEST, f"Content-Length {_plain(text)} is negative; a body has 0 or more "
                                                   f"bytes")
        if not (text.isascii() and text.isdigit()):
            raise ApiError(HTTPStatus.BAD_REQUEST, "Content-Length is not a number")
        content_type = self._content_type()
        upload = route.body == "json or image" and content_type in UPLOAD_TYPES
        limit = self.limits.max_upload_bytes if upload else self.limits.max_json_bytes
        text = text.lstrip("0") or "0"
        if len(text) > 18 or int(text) > limit:  # (no int() of a million digits)
            raise ApiError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                           f"request body of {text if len(text) <= 18 else 'over 10**18'} bytes is larger than the "
                           f"{limit} allowed")
        length = int(text)
        if route.body == "json or image" and not upload and content_type != "application/json":
            raise ApiError(HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
                           f"Content-Type {_shown(content_type)}: send JSON ({{\"prompt\": N}}) or an image "
                           f"({', '.join(UPLOAD_TYPES)})")
        # JSON said so (a form or a text/plain fetch from another site is refused); only an empty body, as undo and
        # reset may send, needs no Content-Type
        if route.body == "json" and content_type != "application/json" and (length or content_type):
            raise ApiError(HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
                           f"Content-Type {_shown(content_type)}: send JSON (application/json)")
        if length and self._expects_continue:
            self.send_response_only(HTTPStatus.CONTINUE)
            self.end_headers()
        body = self.rfile.read(length) if length else b""
        if len(body) < length:
            raise ApiError(HTTPStatus.BAD_REQUEST, f"the body ended after {len(body)} of its {length} bytes")
        self._body_read = True
        return body

    # ------------------------------------------------------------------------------------------- answers

    def _send(self, body: bytes, content_type: str, status: HTTPStatus = HTTPStatus.OK, extra: dict | None = None):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")
        self.send_header("Content-Security-Policy", "frame-ancestors 'none'")
        if self.close_connection:
            self.send_header("Connection", "close")
        for key, value in (extra or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, value: dict, status: HTTPStatus = HTTPStatus.OK):
        self._send(json.dumps(value).encode(), "application/json", status)

    def _answer_error(self, status: HTTPStatus, message: str):
        """{"error": message}; a connection whose body was not read is closed after it. A client that has gone
        by now is not there to read it, and that is fine."""
        if not self._body_read:
            self.close_connection = True
        one_line = "; ".join(line.strip() for line in message.splitlines() if line.strip())  # (a recipe's problems)
        try:
            self._json({"error": one_line}, status)
        except OSError:  # the client went away (BrokenPipeError, ConnectionResetError) or stopped reading
            self.close_connection = True

    def send_error(self, code, message=None, explain=None):
        """http.server's own refusals (a malformed request line, headers too long, an unknown method) in JSON
        too, as every other error."""
        self._body_read = False
        self._answer_error(HTTPStatus(code), (message or HTTPStatus(code).phrase)[:200])


class PlayHandler(CheckedRequestHandler):
    """The API's routes (see ROUTES), each called with its path's parts and, if it reads one, the checked body."""

    def page(self):
        self._send(self.player.page, "text/html; charset=utf-8")

    def info(self):
        self._json(self.player.info())

    def prompt_png(self, index: str):
        prompts = self.player.play.prompts
        if len(index) > 6 or int(index) >= len(prompts):
            raise ApiError(HTTPStatus.NOT_FOUND, f"no prompt {_shown(int(index) if len(index) <= 6 else index)}; this "
                                                 f"run has prompts 0..{len(prompts) - 1}"
                           if prompts else "this run has no validation prompts; upload an image")
        buffer = io.BytesIO()
        save_png(prompts[int(index)], buffer)
        self._send(buffer.getvalue(), "image/png")

    def create(self, body: bytes):
        player = self.player
        seed = 0
        if self._content_type() in UPLOAD_TYPES:
            prompt = decode_image(io.BytesIO(body), player.play.resolution, "uploaded image",
                                  formats=tuple(UPLOAD_TYPES.values()), max_pixels=self.limits.max_upload_pixels)
        else:
            options = parse_json_object(body)
            unknown = set(options) - {"prompt", "seed"}
            if unknown:
                raise ApiError(HTTPStatus.BAD_REQUEST, f"unknown field {_plain(', '.join(sorted(unknown)))}; "
                                                       f"fields: prompt, seed")
            index, seed = options.get("prompt", 0), options.get("seed", 0)
            prompts = player.play.prompts
            if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed <= MAX_SEED:
                raise ApiError(HTTPStatus.BAD_REQUEST, f"seed {_shown(seed)} is not an integer in 0..{MAX_SEED}")
            if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < len(prompts):
                raise ApiError(HTTPStatus.BAD_REQUEST,
                               f"prompt {_shown(index)} is not one of this run's prompts 0..{len(prompts) - 1}"
                               if prompts else "this run has no validation prompts; upload a PNG or JPEG")
            prompt = prompts[index]
        session = player.create(prompt, seed, abandoned=self.client_gone)
        self._json(player.state(session, "start"), HTTPStatus.CREATED)

    def change(self, sid: str, what: str, body: bytes):
        player = self.player
        session = player.session(sid)
        options = parse_json_object(body)
        with session.lock:
            if what == "step":
                if "action" not in options:
                    raise ApiError(HTTPStatus.BAD_REQUEST, "step needs an 'action'")
                action = options.pop("action")
                session.step(action, options, abandoned=self.client_gone)
            elif options:
                raise ApiError(HTTPStatus.BAD_REQUEST, f"{what} takes no fields, got {_plain(', '.join(options))}")
            elif what == "undo":
                session.undo()
            else:
                session.reset()
            state = player.state(session, what)
            player.publish(session, state)  # under the session's lock: event streams see changes in their order
        self._json(state)

    def describe(self, sid: str):
        session = self.player.session(sid)
        with session.lock:
            self._json(self.player.state(session, "describe"))

    def gif(self, sid: str):
        session = self.player.session(sid)
        body = session.gif(abandoned=self.client_gone)  # on this thread; takes the session's lock for its frames only
        disposition = f'attachment; filename="{self.player.play.name}.gif"'
        self._send(body, "image/gif", extra={"Content-Disposition": disposition})

    def delete(self, sid: str):
        self.player.session(sid)
        self.player.drop(sid)
        self._json({"session": sid, "event": "deleted"})

    def events(self, sid: str):
        player = self.player
        session = player.session(sid)
        q = player.subscribe(sid)
        try:
            self.close_connection = True
            self.send_response(HTTPStatus.OK)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            with session.lock:
                first = player.state(session, "describe")
            self._event(first)
            while True:
                try:
                    state = q.get(timeout=15)
                except queue.Empty:
                    self.wfile.write(b": keep-alive\n\n")  # also finds out when the page has gone
                    continue
                if state is None:
                    self._event({"session": sid, "event": "closed"}, "closed")
                    return
                self._event(state)
        finally:
            player.unsubscribe(sid, q)

    def _event(self, state: dict, name: str = "frame"):
        self.wfile.write(f"event: {name}\ndata: {json.dumps(state)}\n\n".encode())


# ----------------------------------------------------------------------------------------------- sessions


class PlayServer:
    """The sessions of one world and the HTTP server in front of them. `start()` serves from a background thread;
    the frames are computed through `play.compute`: on the requests' threads, or on the thread that serves it (the
    CLI's main thread, see `Compute`)."""

    def __init__(self, play: PlayWorld, host: str = "127.0.0.1", port: int = 0, limits: Limits = Limits(),
                 token: str | None = None):
        """`token`: the access token every request must carry (None: none needed)."""
        self.play, self.limits, self.token = play, limits, token
        self.sessions: dict[str, PlaySession] = {}
        self.listeners: dict[str, list[queue.Queue]] = {}
        self.lock = threading.Lock()  # guards the two dicts above
        self.page = resources.files("genie_core.play").joinpath("page.html").read_bytes()
        self.on_loopback = _is_loopback(host)
        self.host_names = {"localhost"}  # besides IP addresses: the names a browser may call this server by
        if not self.on_loopback:
            machine = socket.gethostname().lower()
            self.host_names |= {machine, f"{machine}.local"} | ({host.lower()} if host and not _is_ip(host) else set())
        self.httpd = PlayHTTPServer((host, port), self)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """The address to open: this machine's name when serving on every interface, and the token if any."""
        host, port = self.httpd.server_address[:2]
        if host in ("0.0.0.0", "::"):
            host = socket.gethostname()
        return f"http://{host}:{port}/" + (f"?token={self.token}" if self.token else "")

    def allows(self, presented: str | None) -> bool:
        """Whether a request that presents this token may go on."""
        if self.token is None:
            return True
        return presented is not None and hmac.compare_digest(presented.encode(), self.token.encode())

    def serves_host(self, host_header: str) -> bool:
        """Whether a Host header names this server: an IP address, or one of `host_names` (or NAME.localhost)."""
        name = host_header.strip().lower()
        if name.startswith("["):  # [IPv6]:port
            name = name[1:].partition("]")[0]
        elif name.count(":") == 1:
            name = name.partition(":")[0]
        return _is_ip(name) or name in self.host_names or name.endswith(".localhost")

    def host_names_said(self) -> str:
        return ", ".join(sorted(self.host_names)) + " or an IP address"

    def start(self) -> "PlayServer":
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        with self.lock:
            for queues in self.listeners.values():
                for q in queues:
                    q.put(None)  # event streams end with a "closed" event
        self.httpd.connections.close_waiting()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.close()

    def expire(self) -> None:
        """Drops the sessions nobody used for `idle_seconds` (their event streams end)."""
        now = time.monotonic()
        with self.lock:
            idle = [s for s, session in self.sessions.items() if now - session.last_used > self.limits.idle_seconds]
            for sid in idle:
                self._drop(sid)

    def drop(self, sid: str) -> None:
        with self.lock:
            self._drop(sid)

    def _drop(self, sid: str) -> None:
        self.sessions.pop(sid, None)
        for q in self.listeners.pop(sid, []):
            q.put(None)

    def session(self, sid: str) -> PlaySession:
        self.expire()
        with self.lock:
            session = self.sessions.get(sid)
        if session is None:
            raise ApiError(HTTPStatus.NOT_FOUND, f"no session {_shown(sid)} (it may have expired after "
                                                 f"{self.limits.idle_seconds:.0f} s idle); start a new one")
        session.last_used = time.monotonic()
        return session

    def create(self, prompt, seed: int, abandoned=None) -> PlaySession:
        self.expire()
        self._check_room()
        # encodes the prompt: outside the lock
        session = PlaySession(self.play, prompt, seed, abandoned, max_frames=self.limits.max_frames)
        with self.lock:
            self._check_room()  # another request may have taken the last place meanwhile
            self.sessions[session.id] = session
            self.listeners[session.id] = []
        return session

    def _check_room(self) -> None:
        if len(self.sessions) >= self.limits.max_sessions:
            raise ApiError(HTTPStatus.SERVICE_UNAVAILABLE, f"{len(self.sessions)} sessions are playing, the most "
                                                           f"this server allows; try again later")

    def state(self, session: PlaySession, event: str) -> dict:
        """What the page shows after a change: the frame, where the session is, how fast frames come."""
        fps = session.fps()
        return {"session": session.id, "event": event, "frame": png_data_url(session.frames[-1]),
                "frames": session.frame_count, "actions": session.recent_actions(RECENT_ACTIONS),
                "fps": None if fps is None else round(fps, 2)}

    def publish(self, session: PlaySession, state: dict) -> None:
        with self.lock:
            queues = list(self.listeners.get(session.id, []))
        for q in queues:
            q.put(state)

    def subscribe(self, sid: str) -> queue.Queue:
        q: queue.Queue = queue.Queue()
        with self.lock:
            if sid not in self.listeners:
                raise ApiError(HTTPStatus.NOT_FOUND, f"no session {_shown(sid)}")
            self.listeners[sid].append(q)
        return q

    def unsubscribe(self, sid: str, q: queue.Queue) -> None:
        with self.lock:
            if q in self.listeners.get(sid, []):
                self.listeners[sid].remove(q)

    def info(self) -> dict:
        play = self.play
        return {"run": play.name, "num_actions": play.world.num_actions, "arrow_keys": play.keys,
                "resolution": list(play.resolution), "sampler": {"name": type(play.world.sampler).__name__,
                                                                  **play.sampler_options()},
                "sampler_ranges": play.knob_ranges(),
                "context": play.world.context, "window": play.world.config.window, "prompts": len(play.prompts),
                "limits": attrs.asdict(self.limits)}


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return False
