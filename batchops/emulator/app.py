"""The Starlette application: OpenAI routes (+ Azure aliases), admin routes, fault injection.

Every API route goes through `_api()`, which counts the call, injects transport faults,
authenticates, and turns any ApiError into the official error envelope (never a bare 500).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from typing import Any, BinaryIO

import orjson
from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from batchops.emulator import anthropic_dialect, gemini_dialect, result_faults
from batchops.emulator import errors as E
from batchops.emulator.errors import ApiError
from batchops.emulator.executor import execute
from batchops.emulator.ids import hex_id
from batchops.emulator.runner import run_forever, start_validation
from batchops.emulator.state import Emulator, page
from batchops.emulator.validation import validate_create, validate_expiry

log = logging.getLogger("batchops.emulator")

FILE_PURPOSES = ["assistants", "batch", "fine-tune", "vision", "user_data", "evals"]
MAX_ANY_FILE = 512 * 1024 * 1024
DEFAULT_MODELS = [
    "gpt-4o-mini",
    "gpt-4o",
    "gpt-4.1",
    "gpt-4.1-mini",
    "gpt-4.1-nano",
    "gpt-5-mini",
    "text-embedding-3-small",
    "text-embedding-3-large",
]
DOWNLOAD_CHUNK = 1 << 20  # file bytes are streamed from disk in reads of this size
# Scope key under which the server's protocol puts a callable that aborts the connection.
ABORT_SCOPE_KEY = "batchops.abort"


class JSONResponse(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


def error_response(err: ApiError) -> Response:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


@dataclass(slots=True)
class Call:
    """One authenticated API call, as the route handlers see it."""

    request: Request
    emu: Emulator
    key: str
    azure: bool  # classic Azure path (/openai/...): short endpoint names allowed

    @property
    def path(self) -> dict[str, Any]:
        return self.request.path_params

    async def json(self) -> Any:
        raw = await self.request.body()
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise E.bad_json_body() from None

    def query_int(self, name: str, default: int, lo: int, hi: int) -> int:
        raw = self.request.query_params.get(name)
        if raw is None or raw == "":
            return default
        try:
            value = int(raw)
        except ValueError:
            raise E.invalid_type(name, "an integer", raw) from None
        if value < lo or value > hi:
            low = value < lo
            raise ApiError(
                400,
                f"Invalid '{name}': integer {'below minimum' if low else 'above maximum'} value. "
                f"Expected a value {'>=' if low else '<='} {lo if low else hi}, but got {value} "
                "instead.",
                param=name,
                code="integer_below_min_value" if low else "integer_above_max_value",
            )
        return value


Handler = Callable[[Call], Awaitable[Response]]


def _api_key(request: Request) -> str | None:
    auth = request.headers.get("authorization", "")
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip() or None
    return request.headers.get("api-key") or None


async def _drop(request: Request) -> Response:
    """Close the connection without an answer (the client sees a connection error)."""
    abort = request.scope.get(ABORT_SCOPE_KEY)
    if abort is not None:
        abort()
        # Let the protocol notice the lost connection, so nothing is written or logged.
        for _ in range(3):
            await asyncio.sleep(0)
    return Response(status_code=500)


def _api(
    handler: Handler, template: str, *, azure: bool
) -> Callable[[Request], Awaitable[Response]]:
    async def endpoint(request: Request) -> Response:
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
        if not (drop or route_drop) and sc.http_error_every > 0 and n % sc.http_error_every == 0:
            response = error_response(E.server_error(sc.http_error_status))
        else:
            try:
                key = emu.authenticate(_api_key(request))
                response = await handler(Call(request, emu, key, azure))
            except ApiError as err:
                response = error_response(err)
            except HTTPException as exc:  # e.g. a malformed multipart body
                response = error_response(ApiError(exc.status_code, str(exc.detail)))
            except ClientDisconnect:  # the client is gone (killed mid-upload): nobody to answer
                return Response(status_code=499)
            except Exception:  # a bug: still answer with the envelope, never a bare 500
                log.exception("emulator handler failed on %s", template)
                response = error_response(E.server_error(500))
        if drop or route_drop:
            return await _drop(request)
        response.headers["x-request-id"] = hex_id("req_")
        return response

    return endpoint


# --------------------------------------------------------------------------- files


async def create_file(call: Call) -> Response:
    if call.key in call.emu.scenario.upload_error_keys:
        raise E.server_error(500)
    form = await call.request.form(max_files=1, max_fields=20)
    upload = form.get("file")
    purpose = form.get("purpose")
    if not isinstance(upload, UploadFile):
        raise E.missing_param("file")
    if not isinstance(purpose, str) or not purpose:
        raise E.missing_param("purpose")
    if purpose not in FILE_PURPOSES:
        raise ApiError(
            400,
            f"'{purpose}' is not one of {FILE_PURPOSES} - 'purpose'",
            param="purpose",
            code="invalid_value",
        )
    expires: int | None = None
    anchor = form.get("expires_after[anchor]") or form.get("expires_after.anchor")
    seconds = form.get("expires_after[seconds]") or form.get("expires_after.seconds")
    if anchor is not None or seconds is not None:
        expires = validate_expiry({"anchor": anchor, "seconds": seconds}, "expires_after")
    filename = upload.filename or "file"
    size = upload.size or 0
    limit = call.emu.scenario.max_file_bytes if purpose == "batch" else MAX_ANY_FILE
    if purpose == "batch" and not filename.lower().endswith(".jsonl"):
        raise ApiError(400, "Invalid file format for Batch API. Must be .jsonl")
    if size > limit:
        raise ApiError(400, "File is too large.")
    path = call.emu.new_path("file")
    try:
        with path.open("wb") as out:  # to disk in pieces: a 13 MB upload is never one bytes
            written = 0
            while chunk := await upload.read(DOWNLOAD_CHUNK):
                written += len(chunk)
                if written > limit:
                    raise ApiError(400, "File is too large.")
                out.write(chunk)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    finally:
        await upload.close()
    f = call.emu.add_file(filename, purpose, path, expires)
    call.emu.counters.files_uploaded += 1
    return JSONResponse(f.to_api())


async def list_files(call: Call) -> Response:
    q = call.request.query_params
    limit = call.query_int("limit", 10_000, 1, 10_000)
    order = q.get("order", "desc")
    if order not in ("asc", "desc"):
        raise E.invalid_value("order", order, ["asc", "desc"])
    purpose = q.get("purpose")
    files = [f for f in call.emu.files.values() if not purpose or f.purpose == purpose]
    if order == "desc":
        files.reverse()  # dicts keep insertion order: newest last
    return JSONResponse(page(files, q.get("after"), limit))


async def retrieve_file(call: Call) -> Response:
    return JSONResponse(call.emu.get_file(call.path["file_id"]).to_api())


async def file_content(call: Call) -> Response:
    emu = call.emu
    f = emu.get_file(call.path["file_id"])
    if f.purpose == "batch_output" and f.filename.endswith("_output.jsonl"):
        emu.downloads[f.id] += 1
        if result_faults.applies(emu.scenario, emu.downloads[f.id]):
            data = result_faults.damage(f.data, emu.scenario, f.id)
            return Response(data, media_type="application/octet-stream")
    fh = f.path.open("rb")  # opened now: a delete during the download does not cut it
    return StreamingResponse(
        _chunks(fh),
        media_type="application/octet-stream",
        headers={"content-length": str(f.size)},
    )


async def _chunks(fh: BinaryIO) -> AsyncIterator[bytes]:
    with fh:
        while chunk := fh.read(DOWNLOAD_CHUNK):
            yield chunk


async def delete_file(call: Call) -> Response:
    return JSONResponse(call.emu.delete_file(call.path["file_id"]))


# --------------------------------------------------------------------------- batches


async def create_batch(call: Call) -> Response:
    emu = call.emu
    params = validate_create(await call.json(), azure=call.azure)
    f = emu.files.get(params.input_file_id)
    model = emu.file_model(f) if f is not None else None
    inject = emu.scenario.injected("create", model, call.key)
    if inject is not None:
        raise E.injected(inject)
    if not emu.quota_left(model, call.key):
        raise E.insufficient_quota(emu.scenario.retry_after_seconds)
    b = emu.add_batch(params, call.key)
    start_validation(emu, b)
    return JSONResponse(b.to_api())


async def list_batches(call: Call) -> Response:
    limit = call.query_int("limit", 20, 1, 100)
    emu = call.emu
    newest_first = list(reversed(emu.batches.values()))
    result = page(newest_first, call.request.query_params.get("after"), limit)
    if emu.scenario.list_stale:
        # Each batch as it looked the first time it was listed; retrieve still shows the truth.
        result["data"] = [emu.listed.setdefault(b["id"], b) for b in result["data"]]
    return JSONResponse(result)


async def retrieve_batch(call: Call) -> Response:
    return JSONResponse(call.emu.get_batch(call.path["batch_id"]).to_api())


async def cancel_batch(call: Call) -> Response:
    return JSONResponse(call.emu.cancel_batch(call.path["batch_id"]).to_api())


# --------------------------------------------------------------------------- sync endpoints

_REQUIRED = {
    "/v1/chat/completions": "messages",
    "/v1/embeddings": "input",
    "/v1/responses": "input",
}


def _sync(endpoint: str) -> Handler:
    async def handler(call: Call) -> Response:
        emu = call.emu
        sc = emu.scenario
        body = await call.json()
        if not isinstance(body, dict):
            raise E.invalid_type("body", "an object", body)
        model = call.path.get("deployment") or body.get("model")
        if not isinstance(model, str) or not model:
            raise ApiError(400, "you must provide a model parameter")
        if sc.models is not None and model not in sc.models:
            raise E.model_unknown(model)
        if body.get("stream") is True:
            raise ApiError(
                400,
                "Streaming is not supported by the batchops emulator.",
                param="stream",
                code="unsupported_value",
            )
        if body.get(_REQUIRED[endpoint]) in (None, "", []):
            raise E.missing_param(_REQUIRED[endpoint])
        headers = emu.check_rate_limit(call.key, model)
        if sc.sync_latency_seconds:
            await asyncio.sleep(sc.sync_latency_seconds)
        cid = call.request.headers.get("x-batchops-custom-id")
        if not cid:
            cid = "sync:" + hashlib.sha1(await call.request.body()).hexdigest()[:12]
        out = execute(
            emu, custom_id=cid, model=model, body=body, endpoint=endpoint, api_key=call.key
        )
        if out.error is not None:
            err = out.error
            if err.status == 429:
                err.headers.setdefault("retry-after", f"{sc.retry_after_seconds:g}")
            err.headers.update(headers)
            raise err
        return JSONResponse(out.body, headers=headers)

    return handler


def _model_obj(model_id: str) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": 1_700_000_000, "owned_by": "system"}


async def list_models(call: Call) -> Response:
    sc = call.emu.scenario
    names = list(sc.models) if sc.models is not None else DEFAULT_MODELS
    names = [m for m in dict.fromkeys(names) if m not in sc.denied_models]
    return JSONResponse({"object": "list", "data": [_model_obj(m) for m in names]})


async def retrieve_model(call: Call) -> Response:
    sc = call.emu.scenario
    model = call.path["model_id"]
    if (sc.models is not None and model not in sc.models) or model in sc.denied_models:
        raise E.model_unknown(model)
    return JSONResponse(_model_obj(model))


# --------------------------------------------------------------------------- admin


async def admin_health(request: Request) -> Response:
    return JSONResponse({"status": "ok", "time": time.time()})


async def admin_stats(request: Request) -> Response:
    return JSONResponse(request.app.state.emulator.stats())


async def admin_scenario(request: Request) -> Response:
    emu: Emulator = request.app.state.emulator
    if request.method == "POST":
        try:
            changes = orjson.loads(await request.body() or b"{}")
            if not isinstance(changes, dict):
                raise E.invalid_type("body", "an object", changes)
            emu.update_scenario(changes)
        except orjson.JSONDecodeError:
            return error_response(E.bad_json_body())
        except ApiError as err:
            return error_response(err)
        except (ValidationError, TypeError) as exc:
            return error_response(ApiError(400, f"Invalid scenario: {exc}", param="scenario"))
    return JSONResponse(emu.scenario.model_dump())


async def admin_reset(request: Request) -> Response:
    request.app.state.emulator.reset()
    return JSONResponse({"reset": True})


# --------------------------------------------------------------------------- assembly

# (method, path under the API prefix, route template counted in stats, handler)
API_ROUTES: list[tuple[str, str, str, Handler]] = [
    ("POST", "/files", "POST /v1/files", create_file),
    ("GET", "/files", "GET /v1/files", list_files),
    ("GET", "/files/{file_id}", "GET /v1/files/{id}", retrieve_file),
    ("DELETE", "/files/{file_id}", "DELETE /v1/files/{id}", delete_file),
    ("GET", "/files/{file_id}/content", "GET /v1/files/{id}/content", file_content),
    ("POST", "/batches", "POST /v1/batches", create_batch),
    ("GET", "/batches", "GET /v1/batches", list_batches),
    ("GET", "/batches/{batch_id}", "GET /v1/batches/{id}", retrieve_batch),
    ("POST", "/batches/{batch_id}/cancel", "POST /v1/batches/{id}/cancel", cancel_batch),
    ("POST", "/chat/completions", "POST /v1/chat/completions", _sync("/v1/chat/completions")),
    ("POST", "/embeddings", "POST /v1/embeddings", _sync("/v1/embeddings")),
    ("POST", "/responses", "POST /v1/responses", _sync("/v1/responses")),
    ("GET", "/models", "GET /v1/models", list_models),
    ("GET", "/models/{model_id}", "GET /v1/models/{id}", retrieve_model),
]
# OpenAI, Azure v1 API, Azure classic API (api-version query accepted and ignored).
PREFIXES = [("/v1", False), ("/openai/v1", False), ("/openai", True)]
AZURE_DEPLOYMENT_ROUTES = [
    ("/chat/completions", "POST /v1/chat/completions", _sync("/v1/chat/completions")),
    ("/embeddings", "POST /v1/embeddings", _sync("/v1/embeddings")),
]


def _routes() -> list[Route]:
    routes = [
        Route("/_emulator/health", admin_health, methods=["GET"]),
        Route("/_emulator/stats", admin_stats, methods=["GET"]),
        Route("/_emulator/scenario", admin_scenario, methods=["GET", "POST"]),
        Route("/_emulator/reset", admin_reset, methods=["POST"]),
    ]
    # Other dialects first: Gemini routes match only Gemini requests on shared /v1 paths.
    routes += anthropic_dialect.routes() + gemini_dialect.routes()
    for path, template, handler in AZURE_DEPLOYMENT_ROUTES:
        routes.append(
            Route(
                "/openai/deployments/{deployment}" + path,
                _api(handler, template, azure=True),
                methods=["POST"],
            )
        )
    for prefix, azure in PREFIXES:
        for method, path, template, handler in API_ROUTES:
            routes.append(
                Route(prefix + path, _api(handler, template, azure=azure), methods=[method])
            )
    return routes


async def _not_found(request: Request, exc: Exception) -> Response:
    response = error_response(E.invalid_url(request.method, request.url.path))
    response.headers["x-request-id"] = hex_id("req_")
    return response


async def _server_error(request: Request, exc: Exception) -> Response:
    response = error_response(E.server_error(500))
    response.headers["x-request-id"] = hex_id("req_")
    return response


def create_app(emu: Emulator) -> Starlette:
    """The ASGI app; its lifespan runs the batch runner on the server's event loop."""

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        task = asyncio.create_task(run_forever(emu), name="emulator-runner")
        try:
            yield
        finally:
            task.cancel()
            with suppress(asyncio.CancelledError):
                await task

    app = Starlette(
        routes=_routes(),
        lifespan=lifespan,
        exception_handlers={404: _not_found, 405: _not_found, Exception: _server_error},
    )
    app.state.emulator = emu
    return app
