"""What the Anthropic and Gemini dialects share: their HTTP wrapper (counting, transport faults,
auth, error envelopes) and batches that run on the OpenAI dialect's state machine.

A dialect batch is an ordinary runner `Batch` (dialect != "openai") whose requests were turned
into chat-completions bodies, so execution, answers, quotas, faults, expiry, cancel and
`/_emulator/stats` are exactly the OpenAI dialect's. It lives only in `emu.live` (the runner)
and in the dialect's own registry, never in the OpenAI listings.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from batchops.emulator import errors as E
from batchops.emulator.answers import ImageError, prompt_tokens
from batchops.emulator.errors import ApiError
from batchops.emulator.ids import hex_id
from batchops.emulator.state import Batch, Emulator
from batchops.emulator.validation import BatchRequest, CreateParams, InputCheck

log = logging.getLogger("batchops.emulator")

CHAT = "/v1/chat/completions"
TERMINAL = ("completed", "failed", "expired", "cancelled")


class JSONResponse(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


@dataclass
class DialectError(Exception):
    """An error answer already in the dialect's envelope."""

    status: int
    body: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)

    def response(self) -> Response:
        return JSONResponse(self.body, status_code=self.status, headers=self.headers)


class Dialect:
    """One dialect's envelope rules: how a key is read and how errors are worded."""

    name = "dialect"

    def api_key(self, request: Request) -> str | None:
        raise NotImplementedError

    def check_request(self, request: Request) -> None:
        """Dialect-specific header checks after auth (e.g. anthropic-version)."""

    def auth_error(self, key: str | None) -> DialectError:
        raise NotImplementedError

    def translate(self, err: ApiError) -> DialectError:
        """An error raised by shared code (OpenAI wording) in this dialect's envelope."""
        raise NotImplementedError


@dataclass(slots=True)
class Call:
    request: Request
    emu: Emulator
    key: str

    @property
    def path(self) -> dict[str, Any]:
        return self.request.path_params

    async def json(self, dialect: Dialect) -> Any:
        raw = await self.request.body()
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise dialect.translate(ApiError(400, "The request body is not valid JSON.")) from None


Handler = Callable[[Call], Awaitable[Response]]


def endpoint(
    dialect: Dialect, handler: Handler, template: str
) -> Callable[[Request], Awaitable[Response]]:
    """Like app._api for the OpenAI routes: count, inject transport faults, authenticate,
    and answer every error in the dialect's envelope (never a bare 500)."""
    from batchops.emulator.app import _drop  # the connection-dropping trick is shared

    async def run(request: Request) -> Response:
        emu: Emulator = request.app.state.emulator
        sc = emu.scenario
        c = emu.counters
        c.calls[template] += 1
        c.api_calls += 1
        n = c.api_calls
        if sc.slow_response_seconds:
            await asyncio.sleep(sc.slow_response_seconds)
        drop = sc.drop_connection_every > 0 and n % sc.drop_connection_every == 0
        # A route's own count: carried out, then dropped, whatever other calls came between.
        route_drop = (
            sc.drop_route_every > 0
            and template == sc.drop_route
            and c.calls[template] % sc.drop_route_every == 0
        )
        if drop and not sc.drop_after_processing:
            return await _drop(request)
        try:
            if (
                not (drop or route_drop)
                and sc.http_error_every > 0
                and n % sc.http_error_every == 0
            ):
                raise E.server_error(sc.http_error_status)
            key = dialect.api_key(request)
            allowed = sc.api_keys
            if not key or (allowed is not None and key not in allowed):
                raise dialect.auth_error(key)
            dialect.check_request(request)
            response = await handler(Call(request, emu, key))
        except DialectError as err:
            response = err.response()
        except ApiError as err:
            response = dialect.translate(err).response()
        except ClientDisconnect:
            return Response(status_code=499)
        except Exception:  # a bug: still answer with the envelope
            log.exception("emulator handler failed on %s", template)
            response = dialect.translate(E.server_error(500)).response()
        if drop or route_drop:
            return await _drop(request)
        response.headers.setdefault("request-id", hex_id("req_"))
        return response

    return run


def rate_limit_headers(emu: Emulator, err: DialectError) -> DialectError:
    """429s carry retry-after unless the scenario says they must not."""
    if err.status == 429:
        if emu.scenario.omit_retry_after:
            err.headers.pop("retry-after", None)
        else:
            err.headers.setdefault("retry-after", f"{emu.scenario.retry_after_seconds:g}")
    return err


# --------------------------------------------------------------------------- batches


def registry(emu: Emulator, dialect: str) -> dict[str, Any]:
    """The dialect's objects (cleared by emu.reset())."""
    return emu.dialects.setdefault(dialect, {"batches": {}, "seq": 0})


def start_batch(
    emu: Emulator,
    dialect: str,
    key: str,
    model: str,
    requests: list[BatchRequest],
    prefix: str,
    *,
    enqueued_limit: bool = False,
) -> Batch:
    """A runner batch over already-validated chat requests (optionally stuck pending)."""
    reg = registry(emu, dialect)
    seq = reg["seq"]
    reg["seq"] = seq + 1
    mono = time.monotonic()
    b = Batch(
        id=hex_id(prefix),
        seq=seq,
        params=CreateParams("", CHAT, "24h", None, None),
        api_key=key,
        created_at=int(time.time()),
        phase_started=mono,
        created_mono=mono,
        dialect=dialect,
    )
    seed = emu.scenario.seed
    b.ok_rng = random.Random(f"{seed}:{dialect}:{seq}:output")
    b.err_rng = random.Random(f"{seed}:{dialect}:{seq}:error")
    b.requests = requests  # also what a cancel during "validating" reports as canceled
    b.total = len(requests)
    check = InputCheck(requests=requests, model=model)
    if enqueued_limit and model in emu.scenario.enqueued_token_limit:
        # the runner fails the batch (like OpenAI's token_limit_exceeded) when over the limit
        check.prompt_tokens = sum(_prompt_tokens(r.body) for r in requests)
    fut: Future[InputCheck] = Future()
    sc = emu.scenario
    if seq < sc.stuck_first_n and sc.stuck_seconds > 0:
        # Stuck: "validation" ends only later, so the batch shows pending and runs nothing.
        def release() -> None:
            reg["stuck"].pop(seq, None)
            if not fut.done():
                fut.set_result(check)

        # Released when its time is up, or at once when a scenario change lowers stuck_first_n
        # to seq or below (Emulator.update_scenario): tests release it without racing a clock.
        reg.setdefault("stuck", {})[seq] = release
        asyncio.get_running_loop().call_later(sc.scaled(sc.stuck_seconds), release)
    else:
        fut.set_result(check)
    b.check = fut
    emu.live[b.id] = b
    return b


def _prompt_tokens(body: dict[str, Any]) -> int:
    try:
        return prompt_tokens(body, CHAT)
    except (ImageError, ValueError):
        return 0


def cancel(b: Batch) -> None:
    if b.status in ("validating", "in_progress", "finalizing"):
        b.enter("cancelling", int(time.time()), time.monotonic())


@dataclass(slots=True)
class Line:
    """One request's outcome, read back from the runner's OpenAI-shaped line."""

    custom_id: str
    kind: str  # "succeeded" | "errored" | "canceled" | "expired"
    status: int = 200
    body: dict[str, Any] = field(default_factory=dict)


def lines(emu: Emulator, b: Batch, order: dict[str, int]) -> list[Line]:
    """Every finished request of `b` (shuffled by the seed, or in request order)."""
    out: list[Line] = []
    for raw in b.ok_lines:
        d = orjson.loads(raw)
        out.append(Line(d["custom_id"], "succeeded", 200, d["response"]["body"]))
    for raw in b.err_lines:
        d = orjson.loads(raw)
        if d.get("response") is None:
            code = (d.get("error") or {}).get("code")
            kind = "expired" if code == "batch_expired" else "canceled"
            out.append(Line(d["custom_id"], kind, 0))
        else:
            resp = d["response"]
            out.append(Line(d["custom_id"], "errored", resp["status_code"], resp["body"]))
    if emu.scenario.shuffle_output:
        random.Random(f"{emu.scenario.seed}:{b.id}:results").shuffle(out)
    else:
        out.sort(key=lambda x: order.get(x.custom_id, 0))
    return out


def openai_error(body: dict[str, Any]) -> tuple[str, str | None]:
    """(message, code) of an OpenAI error body from the executor."""
    err = body.get("error") or {}
    return str(err.get("message") or ""), err.get("code")


def quota_scope(emu: Emulator, model: str) -> str:
    """Which quota ran out: "model" when the model's, else "key"."""
    sc = emu.scenario
    if model in sc.model_quota:
        used = emu.counters.models.get(model, [0, 0])[0]
        if used >= sc.model_quota[model]:
            return "model"
    return "key"


def rfc3339(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
