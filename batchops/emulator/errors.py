"""HTTP error bodies as the real API words them (see shared batch-api-facts.md §5).

Every error leaves the emulator as `{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from batchops.masking import mask_key

ORG = "org-emulator"
PROJECT = "proj_emulator"


@dataclass
class ApiError(Exception):
    """An error answer: status, the four envelope fields, and extra response headers."""

    status: int
    message: str
    type: str = "invalid_request_error"
    param: str | None = None
    code: str | None = None
    headers: dict[str, str] = field(default_factory=dict)

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


def invalid_api_key(key: str) -> ApiError:
    return ApiError(
        401,
        f"Incorrect API key provided: {mask_key(key)}. You can find your API key at "
        "https://platform.openai.com/account/api-keys.",
        code="invalid_api_key",
    )


def missing_api_key() -> ApiError:
    return ApiError(
        401,
        "You didn't provide an API key. You need to provide your API key in an Authorization "
        "header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY), or as the password "
        "field (with blank username) if you're accessing the API from your browser and are "
        "prompted for a username and password. You can obtain an API key from "
        "https://platform.openai.com/account/api-keys.",
    )


def insufficient_quota(retry_after: float) -> ApiError:
    return ApiError(
        429,
        "You exceeded your current quota, please check your plan and billing details. For more "
        "information on this error, read the docs: "
        "https://platform.openai.com/docs/guides/error-codes/api-errors.",
        type="insufficient_quota",
        code="insufficient_quota",
        headers={"x-should-retry": "false", "retry-after": _secs(retry_after)},
    )


def rate_limited(model: str, limit: int, used: int, retry_after: float) -> ApiError:
    wait = f"{int(retry_after * 1000)}ms" if retry_after < 1 else f"{retry_after:g}s"
    return ApiError(
        429,
        f"Rate limit reached for {model} in organization {ORG} on requests per min (RPM): "
        f"Limit {limit}, Used {used}, Requested 1. Please try again in {wait}. Visit "
        "https://platform.openai.com/account/rate-limits to learn more.",
        type="requests",
        code="rate_limit_exceeded",
        headers={"retry-after": _secs(retry_after)},
    )


def model_denied(model: str) -> ApiError:
    return ApiError(
        403,
        f"Project `{PROJECT}` does not have access to model `{model}`",
        code="model_not_found",
    )


def model_unknown(model: str) -> ApiError:
    return ApiError(
        404,
        f"The model `{model}` does not exist or you do not have access to it.",
        code="model_not_found",
    )


def server_error(status: int = 500) -> ApiError:
    messages = {
        500: "The server had an error while processing your request. Sorry about that!",
        502: "Bad gateway.",
        503: "The server is overloaded or not ready yet.",
        504: "Gateway timeout.",
    }
    message = messages.get(status, f"Injected HTTP error {status}.")
    kind = "server_error" if status >= 500 else "invalid_request_error"
    return ApiError(status, message, type=kind, code="server_error" if status == 500 else None)


def rejected() -> ApiError:
    return ApiError(
        400,
        "The request was rejected by the emulator's reject_fraction fault (invalid request).",
        code="invalid_request",
    )


def unsupported_image() -> ApiError:
    return ApiError(
        400,
        "You uploaded an unsupported image. Please make sure your image has of one the "
        "following formats: ['png', 'jpeg', 'gif', 'webp'].",
        code="invalid_image_format",
    )


def no_such_file(file_id: str) -> ApiError:
    return ApiError(404, f"No such File object: {file_id}", param="id")


def no_such_batch(batch_id: str) -> ApiError:
    return ApiError(404, f"No batch found with id '{batch_id}'.", param="batch_id")


def missing_param(name: str) -> ApiError:
    return ApiError(
        400, f"Missing required parameter: '{name}'.", param=name, code="missing_required_parameter"
    )


def invalid_value(param: str, value: Any, allowed: list[str]) -> ApiError:
    quoted = [f"'{a}'" for a in allowed]
    listed = quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + f", and {quoted[-1]}"
    return ApiError(
        400,
        f"Invalid value: '{value}'. Supported values are: {listed}.",
        param=param,
        code="invalid_value",
    )


def json_type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a decimal"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def invalid_type(param: str, expected: str, value: Any) -> ApiError:
    return ApiError(
        400,
        f"Invalid type for '{param}': expected {expected}, but got {json_type_name(value)} instead.",
        param=param,
        code="invalid_type",
    )


def bad_json_body() -> ApiError:
    return ApiError(
        400,
        "We could not parse the JSON body of your request. (HINT: This likely means you aren't "
        "using your HTTP library correctly. The OpenAI API expects a JSON payload, but what was "
        "sent was not valid JSON. If you have trouble figuring out how to fix this, please "
        "contact us through our help center at help.openai.com.)",
    )


def invalid_url(method: str, path: str) -> ApiError:
    return ApiError(404, f"Invalid URL ({method} {path})")


def _secs(seconds: float) -> str:
    return f"{seconds:g}"


def injected(e: Any) -> ApiError:
    """An `InjectedError` knob as the error answer (OpenAI's envelope, the knob's words)."""
    headers = {"retry-after": f"{e.retry_after:g}"} if e.retry_after is not None else {}
    return ApiError(e.status, e.message, type=e.type, code=e.code, headers=headers)
