"""A lean keep-alive HTTP/1.1 client for online calls (one origin, POST JSON, whole answers).

Why not the SDK's transport: at local-server speed the client's CPU decides throughput, and the
SDK's request machinery (options, header merging, httpx2/httpcore2/anyio layers, two socket
writes per request) was ~80% of online mode's CPU per request (docs/benchmarks.md). Here a
request is one prebuilt header block plus the body in a single write, and the answer is read
with asyncio streams: status line, headers, then Content-Length / chunked / until-close.

It never retries: a failure is `NoAnswer` (refused, reset, closed before a whole answer) or
`TimedOut`, and the caller maps both exactly as the SDK's connection and timeout errors.
Connections are pooled per event loop (one per request in flight at most) and dropped when the
server says `Connection: close` or has closed them while idle.
"""

from __future__ import annotations

import asyncio
import ssl
import zlib
from dataclasses import dataclass
from urllib.parse import urlsplit
from urllib.request import getproxies, proxy_bypass

# A header block larger than this is not an API answer.
MAX_HEAD = 1 << 16


class NoAnswer(Exception):
    """The connection failed before a whole answer was read."""


class NeverConnected(NoAnswer):
    """No connection could be opened (refused, unreachable): the request never left."""


class TimedOut(Exception):
    """No whole answer within the timeout."""


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    headers: dict[str, str]  # lower-case names
    body: bytes  # decoded (gzip / deflate undone)


def usable_for(base_url: str) -> bool:
    """True when a plain direct connection reaches `base_url` (http/https, no proxy from the
    environment applies to it); otherwise the caller keeps the SDK's transport."""
    u = urlsplit(base_url)
    if u.scheme not in ("http", "https") or not u.hostname:
        return False
    proxies = getproxies()
    proxied = bool(proxies.get(u.scheme) or proxies.get("all"))
    return not proxied or bool(proxy_bypass(u.hostname))


Conn = tuple[asyncio.StreamReader, asyncio.StreamWriter]


class Http1Pool:
    """Keep-alive connections to one origin; `post` sends one request on an idle connection
    (or a new one) and returns its answer."""

    def __init__(
        self,
        base_url: str,
        headers: dict[str, str],
        timeout: float,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        u = urlsplit(base_url)
        self.host = u.hostname or ""
        self.tls = u.scheme == "https"
        self.port = u.port or (443 if self.tls else 80)
        self.prefix = u.path.rstrip("/").encode("ascii")
        self.timeout = timeout
        self.ssl = (ssl_context or ssl.create_default_context()) if self.tls else None
        default_port = self.port == (443 if self.tls else 80)
        host = self.host if default_port else f"{self.host}:{self.port}"
        if ":" in self.host and not default_port:  # an IPv6 literal
            host = f"[{self.host}]:{self.port}"
        # Built once: every request repeats these bytes.
        fixed = {"Host": host, "Accept-Encoding": "gzip, deflate", **headers}
        self._fixed = "".join(f"{k}: {v}\r\n" for k, v in fixed.items()).encode("latin-1")
        self._idle: list[Conn] = []

    async def post(self, path: str, body: bytes, extra: bytes = b"") -> Answer:
        """POST `body` to prefix + `path`; `extra` is more header lines ("Name: value\\r\\n")."""
        head = b"".join(
            (
                b"POST ",
                self.prefix,
                path.encode("ascii"),
                b" HTTP/1.1\r\n",
                self._fixed,
                extra,
                b"Content-Length: %d\r\n\r\n" % len(body),
            )
        )
        conn: Conn | None = None
        try:
            async with asyncio.timeout(self.timeout):
                conn = self._take()
                if conn is None:
                    try:
                        conn = await self._connect()
                    except OSError as exc:
                        raise NeverConnected(str(exc) or type(exc).__name__) from None
                conn[1].write(head + body)
                answer, keep = await _read_answer(conn[0])
        except TimeoutError:
            _drop(conn)
            raise TimedOut from None
        except (OSError, EOFError, ValueError, zlib.error, asyncio.IncompleteReadError) as exc:
            _drop(conn)
            raise NoAnswer(str(exc) or type(exc).__name__) from None
        except BaseException:  # cancelled mid-answer: the connection is in an unknown state
            _drop(conn)
            raise
        if keep:
            self._idle.append(conn)
        else:
            _drop(conn)
        return answer

    def _take(self) -> Conn | None:
        while self._idle:
            conn = self._idle.pop()
            if not conn[0].at_eof() and not conn[1].is_closing():
                return conn
            _drop(conn)  # the server closed it while idle
        return None

    async def _connect(self) -> Conn:
        return await asyncio.open_connection(self.host, self.port, ssl=self.ssl, limit=MAX_HEAD)

    async def aclose(self) -> None:
        idle, self._idle = self._idle, []
        for conn in idle:
            _drop(conn)


def _drop(conn: Conn | None) -> None:
    if conn is not None:
        conn[1].transport.abort()


async def _read_answer(reader: asyncio.StreamReader) -> tuple[Answer, bool]:
    """(answer, keep the connection) of one response; 1xx interim answers are skipped."""
    while True:
        try:
            raw = await reader.readuntil(b"\r\n\r\n")
        except asyncio.LimitOverrunError:
            raise ValueError("answer headers too large") from None
        lines = raw.decode("latin-1").split("\r\n")
        status_line = lines[0].split(" ", 2)
        if len(status_line) < 2 or not status_line[0].startswith("HTTP/"):
            raise ValueError(f"not an HTTP answer: {lines[0][:80]!r}")
        status = int(status_line[1])
        if status >= 200:
            break
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            name = name.strip().lower()
            value = value.strip()
            headers[name] = f"{headers[name]}, {value}" if name in headers else value
    keep = headers.get("connection", "").lower() != "close" and status_line[0] != "HTTP/1.0"
    if "chunked" in headers.get("transfer-encoding", "").lower():
        body = await _read_chunked(reader)
    elif "content-length" in headers:
        body = await reader.readexactly(int(headers["content-length"]))
    elif status in (204, 304):
        body = b""
    else:
        body, keep = await reader.read(), False  # the body ends when the server closes
    encoding = headers.get("content-encoding", "").lower()
    if encoding in ("gzip", "deflate"):
        body = zlib.decompress(body, 47)  # 47: gzip or zlib header, detected
    return Answer(status, headers, body), keep


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    parts: list[bytes] = []
    while True:
        size = int((await reader.readuntil(b"\r\n")).split(b";", 1)[0].strip(), 16)
        if size == 0:
            while await reader.readuntil(b"\r\n") != b"\r\n":  # trailers, then the end
                pass
            return b"".join(parts)
        parts.append(await reader.readexactly(size))
        await reader.readexactly(2)
