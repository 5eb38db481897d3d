"""validate.py finds what the Batch API would reject, with the API's error codes and lines;
the emulator's own input validation is the reference it is checked against."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from batchops import validate
from batchops.emulator.testing import chat_line, jsonl
from batchops.emulator.validation import validate_input

EP = "/v1/chat/completions"


def write(tmp_path: Path, lines: list, name: str = "chunk.jsonl") -> Path:
    path = tmp_path / name
    path.write_bytes(jsonl(lines))
    return path


def codes(check: validate.FileCheck) -> list[tuple[int | None, str]]:
    return [(p.line, p.code) for p in check.problems]


def test_a_good_file_passes_and_is_counted(tmp_path: Path):
    path = write(tmp_path, [chat_line(f"r{i}", f"text {i}") for i in range(5)])
    check = validate.check_file(path, EP)
    assert check.ok and check.requests == 5 and check.model == "gpt-4o-mini"
    assert check.n_bytes == path.stat().st_size
    assert "all valid" in validate.summary([check])


BAD_LINES = [
    ("not json at all", "invalid_json_line"),
    ('["a", "list"]', "invalid_json_line"),
    ({"custom_id": "x", "method": "POST", "url": EP}, "missing_required_parameter"),
    ({"method": "POST", "url": EP, "body": {}}, "missing_required_parameter"),
    ({**chat_line("x", "t"), "url": "/v1/embeddings"}, "invalid_url"),
    ({**chat_line("x", "t"), "method": "GET"}, "invalid_request"),
    ({**chat_line("x", "t"), "custom_id": 7}, "invalid_request"),
    ({**chat_line("x", "t"), "body": "text"}, "invalid_request"),
    (chat_line("x", "t", stream=True), "streaming_unsupported"),
]


@pytest.mark.parametrize(("line", "code"), BAD_LINES)
def test_each_bad_line_gets_the_api_code_and_its_line_number(tmp_path: Path, line, code):
    path = write(tmp_path, [chat_line("ok-1", "fine"), line, chat_line("ok-2", "fine")])
    check = validate.check_file(path, EP)
    assert codes(check) == [(2, code)]
    # The emulator (which copies the API) rejects the same line for the same reason.
    ref = validate_input(
        path.read_bytes(), EP, known_models=None, max_requests=50_000, need_tokens=False
    )
    assert [(e["line"], e["code"]) for e in ref.errors] == [(2, code)]


def test_duplicate_ids_and_mixed_models_like_the_api(tmp_path: Path):
    lines = [
        chat_line("a", "1"),
        chat_line("b", "2"),
        chat_line("a", "3"),  # duplicate custom_id
        chat_line("c", "4", model="gpt-4.1-mini"),  # second model in one file
    ]
    path = write(tmp_path, lines)
    check = validate.check_file(path, EP)
    assert codes(check) == [(3, "duplicate_custom_id"), (4, "mismatched_model")]
    ref = validate_input(
        path.read_bytes(), EP, known_models=None, max_requests=50_000, need_tokens=False
    )
    assert [(e["line"], e["code"]) for e in ref.errors] == codes(check)
    assert "2 problem(s)" in validate.summary([check])


def test_file_limits_requests_and_bytes(tmp_path: Path):
    path = write(tmp_path, [chat_line(f"r{i}", "x" * 50) for i in range(4)])
    check = validate.check_file(path, EP, max_requests=3, max_bytes=100)
    assert {p.code for p in check.problems} == {"too_many_requests", "file_too_large"}
    assert all(p.line is None for p in check.problems)
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"\n")
    assert codes(validate.check_file(empty, EP)) == [(None, "empty_file")]


def test_a_broken_big_file_lists_a_bounded_number_of_problems(tmp_path: Path):
    path = write(tmp_path, ["{broken"] * (validate.MAX_LISTED + 30))
    check = validate.check_file(path, EP)
    assert len(check.problems) == validate.MAX_LISTED and check.unlisted == 30
    assert f"{validate.MAX_LISTED + 30} problem(s)" in validate.summary([check])
    assert str(check.problems[0]) == (
        "chunk.jsonl line 1: invalid_json_line: this line is not parseable as a JSON object"
    )


def test_columnar_and_per_line_checks_agree(tmp_path):
    from batchops.validate import check_file, check_files

    good = tmp_path / "good.jsonl"
    lines = [
        json.dumps(
            {
                "custom_id": f"r{i}",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": {"model": "m", "messages": [{"role": "user", "content": 'hi\n "x"'}]},
            },
            separators=(",", ":"),
        )
        for i in range(50)
    ]
    good.write_text("\n".join(lines) + "\n")
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(lines[:3] + [lines[1]]) + "\n")  # a duplicate custom_id
    numeric = tmp_path / "numeric.jsonl"
    numeric.write_text(lines[0].replace('"r0"', "5") + "\n")  # polars would coerce 5 to "5"
    for path in (good, bad, numeric):
        (fast,) = check_files([path], "/v1/chat/completions")
        slow = check_file(path, "/v1/chat/completions")
        assert (fast.requests, fast.model, [str(p) for p in fast.problems]) == (
            slow.requests,
            slow.model,
            [str(p) for p in slow.problems],
        )
    assert check_files([bad], "/v1/chat/completions")[0].problems[0].code == "duplicate_custom_id"
    assert not check_files([numeric], "/v1/chat/completions")[0].ok


_HEAD = b'{"custom_id":"%s","method":"POST","url":"/v1/chat/completions","body":{"model":"m",'
LAX = {  # what a lax JSON reader may take for valid: each a line the per-line check refuses
    "invalid UTF-8 in a skipped string": b'"messages":[{"role":"user","content":"h\xffi"}]}}',
    "an encoded surrogate": b'"messages":[{"role":"user","content":"h\xed\xa0\x80i"}]}}',
    "a lone surrogate escape": b'"messages":[{"role":"user","content":"h\\ud800i"}]}}',
    "NaN": b'"messages":[],"temperature":NaN}}',
    "-Infinity": b'"messages":[],"temperature": -Infinity}}',
    "two objects on one line": b'"messages":[]}} {"custom_id":"zz"}',
    "a raw control character": b'"messages":[{"role":"user","content":"h\x01i"}]}}',
}


@pytest.mark.parametrize("bad", list(LAX), ids=list(LAX))
def test_the_columnar_check_is_as_strict_as_the_per_line_one(tmp_path: Path, bad: str):
    good = [_HEAD % f"r{i}".encode() + b'"messages":[]}}' for i in range(20)]
    path = tmp_path / "lax.jsonl"
    path.write_bytes(b"\n".join([*good[:10], _HEAD % b"bad" + LAX[bad], *good[10:]]) + b"\n")
    (fast,) = validate.check_files([path], EP)
    slow = validate.check_file(path, EP)
    assert [str(p) for p in fast.problems] == [str(p) for p in slow.problems]
    assert codes(fast) == [(11, "invalid_json_line")]


def test_nan_in_a_prompt_is_text_not_a_number(tmp_path: Path):
    """Prompts may well say NaN or Infinity: still valid, and still the columnar path."""
    lines = [chat_line(f"r{i}", f"price: NaN, [Infinity] {i}") for i in range(5)]
    path = write(tmp_path, lines)
    (check,) = validate.check_files([path], EP)
    assert check.ok and check.requests == 5


def test_a_line_longer_than_a_parse_block_is_checked_whole(tmp_path: Path):
    lines = [chat_line("r1", "x" * (3 << 20)), chat_line("r2", "short")]
    path = write(tmp_path, lines)
    (check,) = validate.check_files([path], EP)
    assert check.ok and check.requests == 2
