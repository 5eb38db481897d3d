"""Deterministic answers, token counts, image sizes and schema-valid JSON (no server)."""

from __future__ import annotations

import math
import random
import string
from typing import Any

import jsonschema
import pytest

from batchops.emulator.answers import (
    count_tokens,
    expected_answer,
    expected_embedding,
    make_answer,
    prompt_tokens,
)
from batchops.emulator.schema_fill import fill, violating
from batchops.emulator.testing import (
    data_url,
    gif_header,
    image_message,
    jpeg_header,
    png_bytes,
    webp_header,
)
from batchops.emulator.tokens import (
    ImageError,
    cut_to_tokens,
    decode_data_url,
    image_size,
)
from batchops.pricing import image_tokens


@pytest.mark.parametrize(
    ("text", "tokens"),
    [
        ("", 0),
        ("   \n\t", 0),
        ("Hello, world!", 4),
        ("extraordinary", 4),  # 13 letters: ceil(13 / 4)
        ("sixsix", 1),
        ("seven77", 2),
        ("snake_case_name", 4),
        ("你好世界", 4),
        ("naïve café", 2),
        ("😀!", 2),
        ("gpt-4o-mini says:", 7),
        ("a\x1cb", 2),
    ],
)
def test_count_tokens_rules(text: str, tokens: int) -> None:
    assert count_tokens(text) == tokens


def test_fast_ascii_path_agrees_with_general_rule() -> None:
    rng = random.Random(3)
    alphabet = string.printable + "\x00\x1d"
    for _ in range(2000):
        t = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60)))
        # the same text with one non-ASCII char appended goes through the regex path
        assert count_tokens(t + "é") in (count_tokens(t) + 1, count_tokens(t))
        assert count_tokens(t + " é") == count_tokens(t) + 1


def test_cut_to_tokens() -> None:
    text = "The extraordinary weather, 你好, continues tomorrow!"
    n = count_tokens(text)
    for k in range(n + 2):
        cut = cut_to_tokens(text, k)
        assert text.startswith(cut)
        assert count_tokens(cut) == min(k, n)
    assert cut_to_tokens("hello", 0) == ""


# --------------------------------------------------------------------------- images


@pytest.mark.parametrize(
    ("data", "size"),
    [
        (png_bytes(640, 480), (640, 480)),
        (gif_header(33, 44), (33, 44)),
        (jpeg_header(1920, 1080), (1920, 1080)),
        (jpeg_header(300, 200, exif_bytes=70_000), (300, 200)),
        (webp_header(500, 400, "VP8X"), (500, 400)),
        (webp_header(123, 77, "VP8L"), (123, 77)),
        (webp_header(640, 360, "VP8 "), (640, 360)),
    ],
)
def test_image_sizes(data: bytes, size: tuple[int, int]) -> None:
    assert image_size(data) == size
    mime = "image/jpeg" if data[:2] == b"\xff\xd8" else "image/png"
    assert decode_data_url(data_url(data, mime)) == (len(data), size)


@pytest.mark.parametrize(
    "url",
    [
        "data:image/png;base64,AAAA",
        "data:image/png;base64,@@@@",
        "data:image/png,rawdata",
        "data:image/png;base64," + data_url(b"\xff\xd8\xff\xe0")[22:],
    ],
)
def test_bad_images(url: str) -> None:
    with pytest.raises(ImageError):
        decode_data_url(url)


@pytest.mark.parametrize(
    ("w", "h", "detail", "tokens"),
    [
        (1024, 1024, "high", 765),
        (1024, 1024, "auto", 765),
        (1024, 1024, "low", 85),
        (2048, 4096, "high", 1105),
        (4096, 8192, "auto", 1105),
        (100, 100, "high", 255),
        (512, 512, "high", 255),
        (513, 512, "high", 425),
    ],
)
def test_image_tokens(w: int, h: int, detail: str, tokens: int) -> None:
    assert image_tokens(w, h, detail) == tokens


def test_image_prompt_tokens_and_note() -> None:
    png = png_bytes(1024, 1024)
    body = {"model": "m", "messages": image_message("Describe", data_url(png), "high")}
    assert prompt_tokens(body, "/v1/chat/completions") == 3 + 4 + 2 + 765  # Describe: 8 letters
    assert expected_answer("m", body) == f"m says: Describe [1 image: {len(png)} bytes]"
    remote = {"model": "m", "messages": image_message("Look", "https://x.test/a.png", "low")}
    assert prompt_tokens(remote, "/v1/chat/completions") == 3 + 4 + 1 + 85
    assert expected_answer("m", remote) == "m says: Look [1 image: remote]"


# --------------------------------------------------------------------------- answers


def test_expected_answer_uses_last_user_text() -> None:
    body = {
        "model": "gpt-4o-mini",
        "messages": [
            {"role": "system", "content": "Be nice."},
            {"role": "user", "content": "first"},
            {"role": "assistant", "content": "ok"},
            {"role": "user", "content": [{"type": "text", "text": "x" * 100}]},
        ],
    }
    assert expected_answer("gpt-4o-mini", body) == "gpt-4o-mini says: " + "x" * 80
    assert prompt_tokens(body, "/v1/chat/completions") == 3 + (4 + 3) + (4 + 1) + (4 + 1) + (4 + 25)


def test_responses_input_items() -> None:
    png = png_bytes(10, 10)
    body = {
        "model": "m",
        "instructions": "Short.",
        "input": [
            {
                "role": "user",
                "content": [
                    {"type": "input_text", "text": "What is in the picture?"},
                    {"type": "input_image", "image_url": data_url(png), "detail": "low"},
                ],
            }
        ],
    }
    ans = expected_answer("m", body, "/v1/responses")
    assert ans == f"m says: What is in the picture? [1 image: {len(png)} bytes]"
    assert prompt_tokens(body, "/v1/responses") == 3 + (4 + 2) + (4 + 7 + 85)  # picture: 2


def test_max_tokens_cut_and_fault_flags() -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "one two three four"}]}
    full = make_answer("m", body, "/v1/chat/completions")
    assert (full.text, full.finish_reason) == ("m says: one two three four", "stop")
    cut = make_answer("m", {**body, "max_completion_tokens": 3}, "/v1/chat/completions")
    assert (cut.text, cut.finish_reason, cut.completion_tokens) == ("m says:", "length", 3)
    half = make_answer("m", body, "/v1/chat/completions", truncate=True)
    assert half.finish_reason == "length" and half.completion_tokens == full.completion_tokens // 2


def test_embeddings_are_unit_vectors_and_deterministic() -> None:
    v = expected_embedding("e", "hello")
    assert len(v) == 8 and v == expected_embedding("e", "hello")
    assert v != expected_embedding("e", "hello!") != expected_embedding("f", "hello")
    assert math.isclose(math.sqrt(sum(x * x for x in v)), 1.0, abs_tol=1e-5)
    assert len(expected_embedding("e", "hello", 256)) == 256
    assert prompt_tokens({"input": ["a b", [1, 2, 3]]}, "/v1/embeddings") == 5


# --------------------------------------------------------------------------- structured outputs

SCHEMAS: list[dict[str, Any]] = [
    {"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]},
    {
        "type": "object",
        "properties": {
            "label": {"type": "string", "enum": ["x", "y", "z"]},
            "short": {"type": "string", "minLength": 3, "maxLength": 5},
            "pct": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1},
            "n": {"type": "integer", "minimum": 10},
            "neg": {"type": "integer", "maximum": -5},
            "flag": {"type": "boolean"},
            "nothing": {"type": "null"},
            "opt": {"type": ["string", "null"]},
            "when": {"type": "string", "format": "date"},
            "const": {"const": "fixed"},
            "items": {
                "type": "array",
                "items": {"$ref": "#/$defs/Item"},
                "minItems": 3,
                "maxItems": 4,
            },
            "choice": {"oneOf": [{"type": "integer"}, {"type": "string"}]},
            "both": {
                "allOf": [
                    {"type": "object", "properties": {"p": {"type": "string"}}, "required": ["p"]},
                    {"properties": {"q": {"type": "integer"}}, "required": ["q"]},
                ]
            },
        },
        "required": ["label", "short", "pct", "n", "neg", "items", "both"],
        "additionalProperties": False,
        "$defs": {
            "Item": {
                "type": "object",
                "properties": {"name": {"type": "string"}, "qty": {"type": "integer"}},
                "required": ["name", "qty"],
                "additionalProperties": False,
            }
        },
    },
    {"type": "array", "items": {"type": "number"}},
]


@pytest.mark.parametrize("schema", SCHEMAS)
def test_fill_is_valid_and_deterministic(schema: dict[str, Any]) -> None:
    value = fill(schema, "seed", "Some user text")
    jsonschema.validate(value, schema)
    assert fill(schema, "seed", "Some user text") == value
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(violating(schema), schema)


def test_json_object_format() -> None:
    body = {
        "model": "m",
        "messages": [{"role": "user", "content": "hi"}],
        "response_format": {"type": "json_object"},
    }
    assert expected_answer("m", body) == '{"answer":"m says: hi"}'
