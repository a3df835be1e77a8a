"""`genie play RUN`: a local web server that lets people play a trained world in the browser.

The page (page.html, no build step, no outside resources) sends actions; frames come back on a server-sent event
stream as they are generated, so holding a key plays continuously. Each browser tab has its own session; sessions
left alone for `idle_seconds` are dropped. Every answer of the JSON API is either the result or {"error": sentence},
and a bad request never stops the server. Nothing the client sends names a file: prompts are uploaded images or the
index of one of the run's validation frames.

    GET  /                              the page
    GET  /api/info                      the world: actions, arrow keys, sampler knobs, prompts, limits
    GET  /api/prompts/I.png             validation prompt I
    POST /api/sessions                  {"prompt": I, "seed": S} or an uploaded PNG/JPEG body -> a new session
    GET  /api/sessions/ID/events        server-sent events: a "frame" event for every change
    POST /api/sessions/ID/step          {"action": A, "steps": N, "temperature": T} -> the new frame
    POST /api/sessions/ID/undo | reset  -> the frame shown afterwards
    GET  /api/sessions/ID/session.gif   the session so far
    DELETE /api/sessions/ID

With an access token (`genie play --host` on an address other people can reach gets one by itself), every request
must carry it: opening the printed address (`/?token=T`) stores it in a cookie for the page's own requests, and
scripts send `Authorization: Bearer T`. Without it the answer is 403.
"""

from __future__ import annotations

import base64
import hmac
import io
import json
import queue
import re
import secrets
import socket
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

from genie_core.errors import GenieError
from genie_core.io.media import decode_image, save_png
from genie_core.play.session import PlaySession, PlayWorld

UPLOAD_TYPES = {"image/png": "PNG", "image/jpeg": "JPEG"}
TOKEN_COOKIE = "genie_play_token"
LOOPBACK = ("127.0.0.1", "localhost", "::1")


@attrs.define(frozen=True)
class Limits:
    max_sessions: int = 16
    idle_seconds: float = 600.0
    max_upload_bytes: int = 5_000_000
    max_upload_pixels: int = 4096 * 4096
    max_json_bytes: int = 10_000


class _Answered(Exception):
    """The request has had its answer (a redirect); nothing more to do."""


class ApiError(Exception):
    def __init__(self, status: HTTPStatus, message: str):
        super().__init__(message)
        self.status = status


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


class PlayServer:
    """The sessions of one world and the HTTP server in front of them. `start()` serves from a background thread;
    the frames are computed through `play.compute`: on the request's thread, or on the thread that serves it (the
    CLI's main thread, see `Compute`)."""

    def __init__(self, play: PlayWorld, host: str = "127.0.0.1", port: int = 0, limits: Limits = Limits(),
                 token: str | None = None):
        """`token`: the access token every request must carry (None: none needed)."""
        self.play, self.limits, self.token = play, limits, token
        self.sessions: dict[str, PlaySession] = {}
        self.listeners: dict[str, list[queue.Queue]] = {}
        self.lock = threading.Lock()  # guards the two dicts above
        self.page = resources.files("genie_core.play").joinpath("page.html").read_bytes()
        self.httpd = ThreadingHTTPServer((host, port), _handler(self))
        self.httpd.daemon_threads = True
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
                    q.put(None)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.close()

    # ------------------------------------------------------------------------------------------- sessions

    def expire(self) -> None:
        """Drops the sessions nobody used for `idle_seconds` (their event streams end)."""
        now = time.monotonic()
        with self.lock:
            idle = [s for s, session in self.sessions.items() if now - session.last_used > self.limits.idle_seconds]
            for sid in idle:
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
            raise ApiError(HTTPStatus.NOT_FOUND, f"no session '{sid}' (it may have expired after "
                                                 f"{self.limits.idle_seconds:.0f} s idle); start a new one")
        session.last_used = time.monotonic()
        return session

    def create(self, prompt, seed: int) -> PlaySession:
        self.expire()
        self._check_room()
        session = PlaySession(self.play, prompt, seed)  # encodes the prompt: outside the lock
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
                "frames": len(session.frames), "actions": session.actions,
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
                raise ApiError(HTTPStatus.NOT_FOUND, f"no session '{sid}'")
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
                "context": play.world.context, "window": play.world.config.window, "prompts": len(play.prompts),
                "limits": attrs.asdict(self.limits)}


def _handler(server: PlayServer):
    routes = [
        ("GET", re.compile(r"/"), "page"),
        ("GET", re.compile(r"/api/info"), "info"),
        ("GET", re.compile(r"/api/prompts/(\d+)\.png"), "prompt_png"),
        ("POST", re.compile(r"/api/sessions"), "create"),
        ("GET", re.compile(r"/api/sessions/([\w-]+)/events"), "events"),
        ("POST", re.compile(r"/api/sessions/([\w-]+)/(step|undo|reset)"), "change"),
        ("GET", re.compile(r"/api/sessions/([\w-]+)/session\.gif"), "gif"),
        ("GET", re.compile(r"/api/sessions/([\w-]+)"), "describe"),
        ("DELETE", re.compile(r"/api/sessions/([\w-]+)"), "delete"),
    ]

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True  # answers and events are small writes: send each at once
        server_version = "genie-play"

        def log_message(self, *args):  # quiet: one line per frame would drown the terminal
            pass

        def do_GET(self):
            self._dispatch("GET")

        def do_POST(self):
            self._dispatch("POST")

        def do_DELETE(self):
            self._dispatch("DELETE")

        def _dispatch(self, method: str):
            path, _, query = self.path.partition("?")
            try:
                self._authorize(path, parse_qs(query).get("token", [None])[0])
                for verb, pattern, name in routes:
                    match = pattern.fullmatch(path)
                    if match:
                        if verb != method:
                            continue
                        return getattr(self, name)(*match.groups())
                allowed = [verb for verb, pattern, _ in routes if pattern.fullmatch(path)]
                if allowed:
                    raise ApiError(HTTPStatus.METHOD_NOT_ALLOWED, f"{method} {path}: use {' or '.join(allowed)}")
                raise ApiError(HTTPStatus.NOT_FOUND, f"no such address: {path}")
            except _Answered:
                pass
            except ApiError as error:
                self._json({"error": str(error)}, error.status)
            except GenieError as error:
                self._json({"error": str(error)}, HTTPStatus.BAD_REQUEST)
            except (BrokenPipeError, ConnectionResetError):
                pass
            except Exception as error:  # noqa: BLE001 - a bug answers 500 and the server goes on
                self._json({"error": f"internal error: {type(error).__name__}: {error}"},
                           HTTPStatus.INTERNAL_SERVER_ERROR)

        # ----------------------------------------------------------------------------------- plumbing

        def _authorize(self, path: str, from_query: str | None):
            if server.token is None:
                return
            if path == "/" and from_query is not None and server.allows(from_query):
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
            if not any(server.allows(t) for t in (bearer, from_query, cookie.value if cookie else None) if t):
                raise ApiError(HTTPStatus.FORBIDDEN, "this server needs its access token: open the address it printed "
                                                     "(ending in ?token=...), or send 'Authorization: Bearer TOKEN'")

        def _send(self, body: bytes, content_type: str, status: HTTPStatus = HTTPStatus.OK,
                  extra: dict | None = None):
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            for key, value in (extra or {}).items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(body)

        def _json(self, value: dict, status: HTTPStatus = HTTPStatus.OK):
            self._send(json.dumps(value).encode(), "application/json", status)

        def _body(self, limit: int) -> bytes:
            try:
                length = int(self.headers.get("Content-Length") or 0)
            except ValueError:
                self.close_connection = True
                raise ApiError(HTTPStatus.BAD_REQUEST, "Content-Length is not a number") from None
            if length > limit:
                self.close_connection = True  # the body stays unread
                raise ApiError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                               f"request body of {length} bytes is larger than the {limit} allowed")
            return self.rfile.read(length)

        def _json_body(self) -> dict:
            raw = self._body(server.limits.max_json_bytes)
            try:
                value = json.loads(raw or b"{}")
            except json.JSONDecodeError as error:
                raise ApiError(HTTPStatus.BAD_REQUEST, f"request body is not valid JSON ({error})") from None
            if not isinstance(value, dict):
                raise ApiError(HTTPStatus.BAD_REQUEST, "request body must be a JSON object")
            return value

        # ----------------------------------------------------------------------------------- routes

        def page(self):
            self._send(server.page, "text/html; charset=utf-8")

        def info(self):
            self._json(server.info())

        def prompt_png(self, index):
            prompts = server.play.prompts
            i = int(index)
            if i >= len(prompts):
                raise ApiError(HTTPStatus.NOT_FOUND, f"no prompt {i}; this run has prompts 0..{len(prompts) - 1}"
                               if prompts else "this run has no validation prompts; upload an image")
            buffer = io.BytesIO()
            save_png(prompts[i], buffer)
            self._send(buffer.getvalue(), "image/png")

        def create(self):
            content_type = (self.headers.get("Content-Type") or "").split(";")[0].strip().lower()
            seed = 0
            if content_type in UPLOAD_TYPES:
                raw = self._body(server.limits.max_upload_bytes)
                prompt = decode_image(io.BytesIO(raw), server.play.resolution, "uploaded image",
                                      formats=tuple(UPLOAD_TYPES.values()), max_pixels=server.limits.max_upload_pixels)
            elif content_type in ("application/json", ""):
                options = self._json_body()
                unknown = set(options) - {"prompt", "seed"}
                if unknown:
                    raise ApiError(HTTPStatus.BAD_REQUEST, f"unknown field {', '.join(sorted(unknown))}; "
                                                           f"fields: prompt, seed")
                index, seed = options.get("prompt", 0), options.get("seed", 0)
                prompts = server.play.prompts
                if not isinstance(seed, int) or isinstance(seed, bool):
                    raise ApiError(HTTPStatus.BAD_REQUEST, f"seed {seed!r} is not an integer")
                if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < len(prompts):
                    raise ApiError(HTTPStatus.BAD_REQUEST,
                                   f"prompt {index!r} is not one of this run's prompts 0..{len(prompts) - 1}"
                                   if prompts else "this run has no validation prompts; upload a PNG or JPEG")
                prompt = server.play.prompts[index]
            else:
                raise ApiError(HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
                               f"Content-Type {content_type!r}: send JSON ({{\"prompt\": N}}) or an image "
                               f"({', '.join(UPLOAD_TYPES)})")
            session = server.create(prompt, seed)
            self._json(server.state(session, "start"), HTTPStatus.CREATED)

        def change(self, sid, what):
            session = server.session(sid)
            options = self._json_body()
            with session.lock:
                if what == "step":
                    if "action" not in options:
                        raise ApiError(HTTPStatus.BAD_REQUEST, "step needs an 'action'")
                    action = options.pop("action")
                    session.step(action, options)
                elif options:
                    raise ApiError(HTTPStatus.BAD_REQUEST, f"{what} takes no fields, got {', '.join(options)}")
                elif what == "undo":
                    session.undo()
                else:
                    session.reset()
                state = server.state(session, what)
            server.publish(session, state)
            self._json(state)

        def describe(self, sid):
            session = server.session(sid)
            with session.lock:
                self._json(server.state(session, "describe"))

        def gif(self, sid):
            session = server.session(sid)
            with session.lock:
                body = session.gif()
            disposition = f'attachment; filename="{server.play.name}.gif"'
            self._send(body, "image/gif", extra={"Content-Disposition": disposition})

        def delete(self, sid):
            server.session(sid)
            with server.lock:
                server._drop(sid)
            self._json({"session": sid, "event": "deleted"})

        def events(self, sid):
            session = server.session(sid)
            q = server.subscribe(sid)
            self.send_response(HTTPStatus.OK)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.close_connection = True
            try:
                with session.lock:
                    first = server.state(session, "describe")
                self._event(first)
                while True:
                    try:
                        state = q.get(timeout=15)
                    except queue.Empty:
                        self.wfile.write(b": keep-alive\n\n")  # also finds out when the page has gone
                        self.wfile.flush()
                        continue
                    if state is None:
                        self._event({"session": sid, "event": "closed"}, "closed")
                        return
                    self._event(state)
            finally:
                server.unsubscribe(sid, q)

        def _event(self, state: dict, name: str = "frame"):
            self.wfile.write(f"event: {name}\ndata: {json.dumps(state)}\n\n".encode())
            self.wfile.flush()

    return Handler
