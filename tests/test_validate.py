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


# ------------------------------------------------------------------ the dry run's template check

BEFORE, BETWEEN, AFTER = TEMPLATE = (
    '{"custom_id":',
    ',"method":"POST","url":"/v1/chat/completions","body":{"model":"gpt-4o-mini",'
    '"messages":[{"role":"user","content":',
    "}]}}",
)
TRICKY_TEXTS = [
    "",
    'say "hi"',
    "a\\b\\\\c\\",
    "tab\tline\nbreak\r\x01\x1f\x7f",
    "ends with a backslash \\",
    '\\"',
    "line seps \u2028 \u2029, emoji 😀, 猫, café",
    "NaN Infinity -Infinity null true",
]


def _system_template() -> validate.Template:
    """A constant system message with quotes, a line break and a backslash: the template
    holds escapes of its own."""
    from batchops.chunking import text_template
    from batchops.spec import JobSpec

    system = 'Answer in "French".\nUse \\ for paths, \u2028 never.'
    spec = JobSpec(source="x.csv", prompt="{p}", system=system, models=[{"name": "gpt-4o-mini"}])
    template = text_template(spec, "gpt-4o-mini")
    assert template is not None and "\\" in template[1]
    return template


TEMPLATES = {"plain": TEMPLATE, "system": _system_template()}


def template_line(cid: bytes, text: bytes, template: validate.Template = TEMPLATE) -> bytes:
    before, between, after = template
    return before.encode() + cid + between.encode() + text + after.encode()


def template_file(
    tmp_path: Path,
    odd: bytes | None = None,
    template: validate.Template = TEMPLATE,
    name: str = "t.jsonl",
) -> Path:
    """20 lines made from a template (texts JSON-escaped by batchops' own dumps) and, when
    given, `odd` (raw bytes) as the 11th line."""
    from batchops.render import dumps

    lines = [
        template_line(dumps(f"r{i}"), dumps(TRICKY_TEXTS[i % len(TRICKY_TEXTS)]), template)
        for i in range(20)
    ]
    if odd is not None:
        lines.insert(10, odd)
    path = tmp_path / name
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def odd_lines(t: validate.Template) -> dict[str, bytes]:
    """Template-shaped lines (or nearly) that the per-line check refuses."""
    line = template_line(b'"x1"', b'"x"', t)
    return {
        "an unescaped quote in the text": template_line(b'"x1"', b'"a"b"', t),
        "an escaped closing quote": template_line(b'"x1"', b'"ab"c\\"', t),
        "a bad escape": template_line(b'"x1"', b'"a\\xb"', t),
        "a short unicode escape": template_line(b'"x1"', b'"a\\u12"', t),
        "a lone surrogate escape": template_line(b'"x1"', b'"a\\ud800b"', t),
        "a raw control character": template_line(b'"x1"', b'"a\x01b"', t),
        "a raw tab": template_line(b'"x1"', b'"a\tb"', t),
        "invalid UTF-8": template_line(b'"x1"', b'"a\xffb"', t),
        "an encoded surrogate": template_line(b'"x1"', b'"a\xed\xa0\x80b"', t),
        "a duplicate custom_id": template_line(b'"r3"', b'"x"', t),
        "an empty custom_id": template_line(b'""', b'"x"', t),
        "a numeric custom_id": template_line(b"5", b'"x"', t),
        "a quote in the custom_id": template_line(b'"a"b"', b'"x"', t),
        "NaN for the text": template_line(b'"x1"', b"NaN", t),
        "two objects on one line": line + b' {"custom_id":"zz"}',
        "a truncated line": line[:-2],
        "another model": line.replace(b"gpt-4o-mini", b"gpt-4o"),
        "stream true": line.replace(b'"model"', b'"stream":true,"model"'),
        "an escape of the template unescaped": line.replace(b'\\"French\\"', b'"French\\"'),
    }


def valid_odd_lines(t: validate.Template) -> dict[str, bytes]:
    """Unusual but valid lines: the template check may leave them to the other checks."""
    return {
        "a surrogate pair escape": template_line(b'"x1"', b'"\\ud83d\\ude00"', t),
        "an escaped custom_id": template_line(b'"x\\"1"', b'"x"', t),
        "a non-ASCII custom_id": template_line('"é1"'.encode(), b'"x"', t),
        "a 40-byte custom_id": template_line(b'"' + b"y" * 40 + b'"', b'"x"', t),
        "a long custom_id": template_line(b'"' + b"x" * 100 + b'"', b'"x"', t),
        "a unicode escape": template_line(b'"x1"', b'"\\u00e9\\uD7FF"', t),
        "a CRLF line end": template_line(b'"x1"', b'"x"', t) + b"\r",
        "a blank line": b"",  # skipped by the per-line check (not a request)
    }


ODD_NAMES = list(odd_lines(TEMPLATE)) + list(valid_odd_lines(TEMPLATE)) + list(LAX)


@pytest.mark.parametrize("which", list(TEMPLATES))
def test_the_template_check_passes_what_batchops_writes(tmp_path: Path, which: str):
    template = TEMPLATES[which]
    path = template_file(tmp_path, template=template)
    fast = validate._template_check(path, EP, template, 50_000, 200_000_000)
    slow = validate.check_file(path, EP)
    assert fast is not None and slow.ok
    assert (fast.requests, fast.n_bytes, fast.model) == (20, slow.n_bytes, "gpt-4o-mini")
    (checked,) = validate.check_files([path], EP, template)
    assert checked.ok and checked.requests == 20


@pytest.mark.parametrize("which", list(TEMPLATES))
@pytest.mark.parametrize("odd", ODD_NAMES, ids=str)
def test_the_template_check_is_as_strict_as_the_per_line_one(tmp_path: Path, odd: str, which: str):
    template = TEMPLATES[which]
    bad, valid = odd_lines(template), valid_odd_lines(template)
    line = {**bad, **valid}.get(odd)
    if line is None:  # the columnar check's cases, as whole lines
        line = _HEAD % b"bad" + LAX[odd]
    path = template_file(tmp_path, line, template)
    (fast,) = validate.check_files([path], EP, template)
    slow = validate.check_file(path, EP)
    assert (fast.requests, fast.model, [str(p) for p in fast.problems]) == (
        slow.requests,
        slow.model,
        [str(p) for p in slow.problems],
    )
    if which == "plain" and odd == "an escape of the template unescaped":
        return  # the plain template has no such escape: the line is a good one
    assert slow.ok == (odd in valid)
    if odd in bad or odd in LAX:
        assert validate._template_check(path, EP, template, 50_000, 200_000_000) is None


@pytest.mark.parametrize("which", list(TEMPLATES))
def test_the_template_check_never_passes_a_file_the_per_line_check_refuses(
    tmp_path: Path, which: str
):
    """Single-byte changes anywhere in a good file, to the bytes JSON is made of: whenever the
    template check says valid, so does the per-line check, with the same counts."""
    import random

    template = TEMPLATES[which]
    good = template_file(tmp_path, template=template).read_bytes()
    rng = random.Random(18)
    swaps = b'"\\{}[],:\n\r\t\x00\x01u0d8 a\xff\xc3'
    passed = 0
    for i in range(400):
        data = bytearray(good)
        for _ in range(rng.choice((1, 1, 2))):
            data[rng.randrange(len(data))] = rng.choice(swaps)
        path = tmp_path / f"m{i}.jsonl"
        path.write_bytes(bytes(data))
        fast = validate._template_check(path, EP, template, 50_000, 200_000_000)
        if fast is not None:
            slow = validate.check_file(path, EP)
            assert slow.ok and (fast.requests, fast.model) == (slow.requests, slow.model), data
            passed += 1
        path.unlink()
    assert 0 < passed < 400  # some changes stay valid (inside a text), most do not


def test_a_template_that_does_not_make_valid_requests_is_not_used(tmp_path: Path):
    path = template_file(tmp_path)
    for template in (
        (BEFORE, BETWEEN.replace("POST", "GET"), AFTER),
        (BEFORE, BETWEEN.replace("/v1/chat", "/v2/chat"), AFTER),
        (BEFORE, BETWEEN + '"x","stream":true,"y":', AFTER),
        ('{"x":', BETWEEN, AFTER),  # the first string is not the custom_id
    ):
        assert validate._template_check(path, EP, template, 50_000, 200_000_000) is None
    assert validate._template_check(path, EP, TEMPLATE, 19, 200_000_000) is None  # > max


def test_the_template_check_finds_a_repeated_id_whatever_the_ids_lengths(tmp_path: Path):
    """A repeated id in a later block of lines whose other ids are long (found by a wider
    look) is still a repeat: the ids' hashes do not depend on how far each block looked."""
    from batchops.render import dumps

    ids = [f"r{i}" for i in range(validate._ROWS + 500)]
    ids[validate._ROWS + 100] = "x" * 40  # the second block needs the wide look
    ids[validate._ROWS + 200] = "r3"  # … and repeats an id of the first block
    path = tmp_path / "t.jsonl"
    path.write_bytes(b"".join(template_line(dumps(c), dumps("t"), TEMPLATE) + b"\n" for c in ids))
    assert validate._template_check(path, EP, TEMPLATE, 50_000, 200_000_000) is None
    (checked,) = validate.check_files([path], EP, TEMPLATE)
    assert [p.code for p in checked.problems] == ["duplicate_custom_id"]


def test_the_template_check_takes_lines_longer_than_its_blocks(tmp_path: Path):
    """A line longer than the block the file is scanned in is compared where it ends."""
    from batchops.render import dumps

    texts = ["short", "x" * (validate._BLOCK * 2 + 5), 'then "quoted"', "y" * validate._BLOCK]
    path = tmp_path / "t.jsonl"
    lines = [template_line(dumps(f"r{i}"), dumps(t), TEMPLATE) for i, t in enumerate(texts)]
    path.write_bytes(b"\n".join(lines) + b"\n")
    fast = validate._template_check(path, EP, TEMPLATE, 50_000, 200_000_000)
    assert fast is not None and fast.requests == 4 == validate.check_file(path, EP).requests
    bad = path.read_bytes().replace(b'"r3"', b'"r1"')  # a repeat, in the last block
    path.write_bytes(bad)
    assert validate._template_check(path, EP, TEMPLATE, 50_000, 200_000_000) is None
