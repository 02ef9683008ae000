"""HTTP requests of the replica server: routing, auth, limits, problem responses.

Every error leaves as ``application/problem+json``; a request the server could
not read to its end closes the connection, so keep-alive never desynchronises.
"""

from __future__ import annotations

import hmac
import json
import mmap
import socket
import ssl
import sys
import time
import traceback
from http.server import BaseHTTPRequestHandler
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

from drtool import __version__
from drtool.errors import DrtoolError
from drtool.replica import routes
from drtool.replica.numbers import parse_count
from drtool.replica.problems import Problem, problem_body, status_of
from drtool.storage.direct import BLOCK

if TYPE_CHECKING:
    from drtool.replica.server import ReplicaHTTPServer

_SMALL_BODY = 1 << 20  # JSON requests
_REUSED_BODY = 64 << 20  # bodies up to this size share one buffer per connection


class ReplicaHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = f"drtool-replica/{__version__}"
    server: ReplicaHTTPServer

    # -- connection -------------------------------------------------------------------

    def setup(self) -> None:
        self.timeout = self.server.limits.idle_timeout
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def handle(self) -> None:
        self.close_connection = False
        try:
            while not self.close_connection:
                self.server.watch(self.connection, self.client_address)
                self._started = time.monotonic()
                self.handle_one_request()
        except (OSError, ValueError):
            pass  # the client went away or the watchdog cut it off: nothing left to answer
        finally:
            self.server.unwatch(self.connection)

    def log_message(self, format: str, *args: Any) -> None:
        sys.stderr.write(f"drtool-replica: {self.client_address[0]}: {format % args}\n")

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        pass  # one line per request is written when it finishes (_access_log)

    def _access_log(self, status: int, sent: int) -> None:
        ms = (time.monotonic() - self._started) * 1000
        self.server.http_counts.add(self.command, status, sent)
        sys.stderr.write(f'drtool-replica: {self.client_address[0]}:{self.client_address[1]} '
                         f'"{self.command} {self.path}" {status} {sent} {ms:.1f}ms\n')

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """Errors found by http.server itself (bad request line, huge headers) as problems too."""
        self.close_connection = True
        self.request_version = "HTTP/1.1"  # an unparsable request line leaves HTTP/0.9: no status line
        title = self.responses.get(code, ("Error",))[0]
        self._send_problem(Problem(code, title, message or explain or "the request could not be parsed"))

    # -- responses ----------------------------------------------------------------------

    def send_head(self, status: int, content_type: str, length: int, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(length))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self._status, self._sent = status, length

    def send_json(self, status: int, data: Any, headers: dict[str, str] | None = None) -> None:
        body = json.dumps(data, indent=1, sort_keys=True).encode() + b"\n"
        self.send_head(status, "application/json", len(body), headers)
        self.wfile.write(body)

    def _send_problem(self, problem: Problem) -> None:
        body = json.dumps(problem_body(problem)).encode() + b"\n"
        self.send_head(problem.status, "application/problem+json", len(body), problem.headers)
        self.wfile.write(body)
        self._access_log(problem.status, len(body))

    # -- request plumbing ---------------------------------------------------------------

    def do_GET(self) -> None:
        self._dispatch()

    do_PUT = do_POST = do_DELETE = do_HEAD = do_GET

    def parse_request(self) -> bool:
        if not super().parse_request():
            return False
        if not self.request_version.startswith("HTTP/1."):
            # An HTTP/0.9 request line ("GET /"): http.server would answer it without a status line.
            self.send_error(400, "the request line must end with HTTP/1.0 or HTTP/1.1")
            return False
        return True

    def _dispatch(self) -> None:
        self._status, self._sent, self._body_read = 0, 0, False
        self._length: int | None = None
        self._started = time.monotonic()
        try:
            # Headers are in.  Ambiguous framing (where a second, smuggled request could hide
            # in the body) is refused before anything else, and the connection closes.
            self._length = self._framing()
            if self._token_ok():
                self.server.authenticated(self.connection)
            if not self._length:
                # The whole request is in: from here on only the idle timeout applies, so a
                # long response to a slow (but moving) reader is not cut off.
                self.server.unwatch(self.connection)
            try:
                self._route()
            finally:
                if not self._body_read:
                    self._discard_body()
            self._access_log(self._status, self._sent)
        except Problem as problem:
            self._fail(problem)
        except DrtoolError as exc:
            status, title, kind = status_of(exc)
            self._fail(Problem(status, title, str(exc), kind=kind))
        except (ConnectionError, TimeoutError, ssl.SSLError):
            self.close_connection = True  # the client went away mid-request
        except Exception as exc:  # a bug: answer 500, keep serving, log the traceback
            traceback.print_exc(file=sys.stderr)
            self._fail(Problem(500, "Replica server error", f"internal error: {type(exc).__name__}: {exc}"))

    def _fail(self, problem: Problem) -> None:
        if self._status:  # the response had started: the only honest signal left is to hang up
            self.close_connection = True
            self._access_log(self._status, -1)
            return
        if not self._body_read:
            self.close_connection = True
        self._send_problem(problem)

    def _framing(self) -> int | None:
        """The body's length (None: no Content-Length, no body), or a problem when the
        framing is not exactly one Content-Length of plain digits."""
        lengths = self.headers.get_all("Content-Length") or []
        if self.headers.get_all("Transfer-Encoding"):
            if lengths:
                raise Problem(400, "Bad request", "Transfer-Encoding and Content-Length together: ambiguous framing")
            raise Problem(411, "Length required", "chunked request bodies are not accepted; send Content-Length")
        if len(lengths) > 1:
            raise Problem(400, "Bad request", f"{len(lengths)} Content-Length headers: ambiguous framing")
        return parse_count(lengths[0], "Content-Length") if lengths else None

    def _discard_body(self) -> None:
        """Skip a small body nobody read, or hang up rather than read a large one (or any
        body of a client that has not shown the token: it gets no more of our time)."""
        self._body_read = True
        length = self._length or 0
        if 0 < length <= _SMALL_BODY and self.server.is_authenticated(self.connection):
            self.rfile.read(length)
            self.server.unwatch(self.connection)
        elif length:
            self.close_connection = True

    def read_body(self, limit: int) -> memoryview:
        length = self._length
        if length is None:
            self._body_read = True  # there is none: the connection stays in step
            raise Problem(411, "Length required", "this request needs a body with Content-Length")
        if length > limit:
            raise Problem(413, "Request body too large", f"body of {length} bytes exceeds the limit of {limit}")
        view = self._body_buffer(length)
        done = 0
        while done < length:
            got = self.rfile.readinto(view[done:done + (8 << 20)])
            if not got:
                raise ConnectionError("client closed the connection mid-body")
            done += got
        self._body_read = True
        self.server.unwatch(self.connection)
        return view

    def _body_buffer(self, length: int) -> memoryview:
        """Room for a body: one buffer per connection, reused from request to request.

        A fresh 16 MiB bytearray per batch costs a memset and a page fault per
        page; the previous request's body is no longer referenced once it was answered.
        The buffer is page-aligned memory with a block to spare after the body, so the
        replica's journal can append a batch as received through O_DIRECT without copying
        it (drtool.replica.journal pads it with zeros there).
        """
        if length > _REUSED_BODY:
            return memoryview(bytearray(length))
        buffer = getattr(self, "_buffer", None)
        if buffer is None or len(buffer) < length + BLOCK:
            if buffer is not None:
                buffer.close()
            buffer = self._buffer = mmap.mmap(-1, -(-(max(length, _SMALL_BODY) + BLOCK) // BLOCK) * BLOCK)
        return memoryview(buffer)[:length]

    def read_json(self) -> dict[str, Any]:
        body = self.read_body(_SMALL_BODY)
        try:
            data = json.loads(bytes(body))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise Problem(400, "Bad request", f"the body is not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise Problem(400, "Bad request", "the body must be a JSON object")
        return data

    def _token_ok(self) -> bool:
        token = self.server.token
        if token is None:
            return True
        given = self.headers.get("Authorization", "")
        scheme, _, value = given.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(value.strip().encode(), token.encode())

    def authorize(self) -> None:
        if not self._token_ok():
            given = self.headers.get("Authorization", "")
            raise Problem(401, "Unauthorized", "the bearer token is wrong" if given else
                          "this server needs an 'Authorization: Bearer TOKEN' header",
                          {"WWW-Authenticate": 'Bearer realm="drtool-replica"'})

    def _route(self) -> None:
        parts = urlsplit(self.path)
        self.query = _parse_query(parts.query)
        try:
            segments = [unquote(s, errors="strict") for s in parts.path.split("/")[1:]]
        except UnicodeDecodeError:
            raise Problem(400, "Bad request", "the path is not valid percent-encoded UTF-8") from None
        routes.route(self, self.command, segments)


def _parse_query(query: str) -> dict[str, str]:
    """Parse without turning '+' into a space: region runs are written 'first+count'."""
    out: dict[str, str] = {}
    for item in filter(None, query.split("&")):
        key, _, value = item.partition("=")
        try:
            out[unquote(key, errors="strict")] = unquote(value, errors="strict")
        except UnicodeDecodeError:
            raise Problem(400, "Bad request", "the query is not valid percent-encoded UTF-8") from None
    return out

