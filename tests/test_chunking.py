"""chunking.py: the columnar builder writes exactly the per-row reference requests, within limits."""

from __future__ import annotations

import base64
import csv
import json
import math
import random
import shutil
from pathlib import Path

import polars as pl
import pytest

from batchops.chunking import build_chunks
from batchops.render import dumps, render_text, request_line
from batchops.source import open_source
from batchops.spec import JobSpec

SAMPLE = Path(__file__).resolve().parents[1] / "data" / "sample"
PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(40))

# Text the JSON encoder must get right; lone surrogates cannot occur in UTF-8 input.
AWKWARD = [
    "",
    'say "hi"',
    "back\\slash \\n not a newline",
    "line\nbreak\r\nand\ttab",
    "".join(map(chr, range(0x20))) + "\x7f",
    "猫 café naïve ß",
    "😀👍🏽 emoji",
    "</script><!--",
    "\u2028\u2029\ufeff\u200b",
    "{not a placeholder}",
    "/slash/",
]


def write_csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    with path.open("w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\r\n")
        writer.writerow(header)
        writer.writerows(rows)
    return path


def make_spec(path: Path, **kw) -> JobSpec:
    kw.setdefault("prompt", "Item {name}: {desc}")
    return JobSpec(source=str(path), models=[{"name": "m"}], **kw)


def build(spec: JobSpec, out: Path, **kw) -> list:
    return list(
        build_chunks(open_source(spec), spec, model="m", out_dir=out, first_chunk_no=1, **kw)
    )


def read_lines(chunks) -> list[dict]:
    """Every line as JSON; any reader's notion of a line must agree, splitlines() included."""
    out = []
    for c in chunks:
        text = c.path.read_text(encoding="utf-8")
        assert text.splitlines() == text.split("\n")[:-1] if text else True
        out += [json.loads(line) for line in text.splitlines()]
    return out


def awkward_table(tmp_path: Path, n: int = 300, seed: int = 1) -> tuple[Path, list[list[str]]]:
    rng = random.Random(seed)
    rows = [
        [
            f"{i:05d}",
            rng.choice(AWKWARD) + rng.choice(AWKWARD),
            rng.choice(AWKWARD) * rng.randint(0, 2),
        ]
        for i in range(n)
    ]
    rows.append(["q\"u\\o'te id", "last", ""])
    return write_csv(tmp_path / "t.csv", ["id", "name", "desc"], rows), rows


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"system": 'Answer in "French".\n', "max_tokens": 20, "temperature": 0.0},
        {"body_extra": {"seed": 7, "stop": ["\n", "</s>"], "metadata": {"k": None, "n": 1.5}}},
        {"endpoint": "/v1/responses", "system": "S", "max_tokens": 5},
        {"endpoint": "/v1/embeddings"},
    ],
)
def test_columnar_lines_equal_the_per_row_reference(tmp_path, options):
    path, rows = awkward_table(tmp_path)
    spec = make_spec(
        path, id_column="id", prompt="N={name} | D={desc} {{x}}", batch_size=64, **options
    )
    chunks = build(spec, tmp_path / "out")
    got = read_lines(chunks)
    want = [
        request_line(
            spec,
            "m",
            r[0],
            render_text(spec.prompt, dict(zip(["id", "name", "desc"], r, strict=True))),
        )
        for r in rows
    ]
    assert got == want
    # custom_id and the text survive byte for byte, not just as equal JSON values
    assert [c for ch in chunks for c in ch.custom_ids] == [r[0] for r in rows]


def test_polars_json_escaping_round_trips_random_unicode(tmp_path):
    rng = random.Random(11)
    alphabet = [chr(c) for c in range(0x80)] + list("é猫😀\u2028\u0085\ufffd\U0010ffff")
    rows = [[str(i), "".join(rng.choices(alphabet, k=rng.randint(0, 40)))] for i in range(500)]
    path = write_csv(tmp_path / "u.csv", ["id", "name"], rows)
    chunks = build(make_spec(path, prompt="{name}", batch_size=50_000), tmp_path / "out")
    got = [line["body"]["messages"][0]["content"] for line in read_lines(chunks)]
    assert got == [r[1] for r in rows]


def test_chunks_respect_batch_size_and_are_numbered_in_order(tmp_path):
    path, rows = awkward_table(tmp_path, n=249)
    chunks = build(
        make_spec(path, batch_size=100), tmp_path / "out", file_name=lambda no: f"in_{no}.jsonl"
    )
    assert [c.chunk_no for c in chunks] == [1, 2, 3]
    assert [len(c.row_idxs) for c in chunks] == [100, 100, 50]
    assert [c.path.name for c in chunks] == ["in_1.jsonl", "in_2.jsonl", "in_3.jsonl"]
    assert [i for c in chunks for i in c.row_idxs] == list(range(250))
    assert [i for c in chunks for i in c.custom_ids] == [str(i) for i in range(250)]  # no id column
    for c in chunks:
        assert c.path.stat().st_size == c.n_bytes
        assert c.skipped == []
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "in_1.jsonl",
        "in_2.jsonl",
        "in_3.jsonl",
    ]


def test_byte_limit_splits_chunks_and_skips_a_request_that_can_never_fit(tmp_path):
    rows = [[str(i), "x" * 50] for i in range(40)]
    rows[7][1] = "y" * 5000
    path = write_csv(tmp_path / "b.csv", ["id", "name"], rows)
    spec = make_spec(path, prompt="{name}", batch_size=1000)
    chunks = build(spec, tmp_path / "out", max_bytes=1000)
    assert all(0 < c.n_bytes <= 1000 for c in chunks)
    (skip,) = [s for c in chunks for s in c.skipped]
    assert skip.row_idx == 7
    assert skip.reason.endswith("bytes, over the 1,000-byte limit of a batch file")
    written = [i for c in chunks for i in c.row_idxs]
    assert written == [i for i in range(40) if i != 7]
    assert len(read_lines(chunks)) == 39


def test_only_rows_and_slice(tmp_path):
    path, rows = awkward_table(tmp_path, n=100)
    spec = make_spec(path, id_column="id", start_row=10, end_row=90, batch_size=4)
    chunks = build(spec, tmp_path / "out", only_rows=pl.Series([95, 50, 10, 11, 12, 13, 14, 89]))
    assert [c.row_idxs for c in chunks] == [[10, 11, 12, 13], [14, 50, 89]]
    assert [line["custom_id"] for line in read_lines(chunks)] == [
        rows[i][0] for i in [10, 11, 12, 13, 14, 50, 89]
    ]


def test_token_estimates(tmp_path):
    path = write_csv(tmp_path / "e.csv", ["id", "name"], [["a", "abcd"], ["b", "é" * 5], ["c", ""]])
    spec = make_spec(path, prompt="{name}", system="12345678")
    (chunk,) = build(spec, tmp_path / "o1")
    per_message = 7 + 4 + 2  # framing + system message (8 bytes -> 2 tokens)
    assert chunk.est_prompt_tokens == (1 + per_message) + (3 + per_message) + (0 + per_message)
    (chunk,) = build(spec, tmp_path / "o2", estimate_tokens=lambda s: s.str.len_chars() * 10)
    # The estimator counts the texts and the system prompt; framing is added per request.
    overhead = 7 + 4 + 8 * 10
    assert chunk.est_prompt_tokens == (40 + 50 + 0) + 3 * overhead


def test_a_template_without_placeholders(tmp_path):
    path, _ = awkward_table(tmp_path, n=5)
    chunks = build(make_spec(path, prompt="Say hi"), tmp_path / "out")
    assert [line["body"]["messages"][0]["content"] for line in read_lines(chunks)] == ["Say hi"] * 6


def test_an_abandoned_build_leaves_no_temporary_file(tmp_path):
    path, _ = awkward_table(tmp_path, n=50)
    spec = make_spec(path, batch_size=7)
    gen = build_chunks(
        open_source(spec), spec, model="m", out_dir=tmp_path / "out", first_chunk_no=0
    )
    first = next(gen)
    gen.close()
    assert first.path.exists()
    assert not list((tmp_path / "out").glob("*.tmp"))


# ---------------------------------------------------------------------------------- images


def image_table(tmp_path: Path, cells: list[str]) -> Path:
    images = tmp_path / "images"
    images.mkdir()
    (images / "ok.png").write_bytes(PNG)
    rows = [[f"r{i}", f"name {i}", cell] for i, cell in enumerate(cells)]
    return write_csv(tmp_path / "i.csv", ["id", "name", "img"], rows)


def test_images_become_data_urls_and_missing_ones_are_skipped(tmp_path):
    cells = ["ok.png", "", "missing.png", "../i.csv", "ok.png"]
    path = image_table(tmp_path, cells)
    spec = make_spec(
        path,
        id_column="id",
        prompt="{name}",
        image_column="img",
        image_dir=str(tmp_path / "images"),
    )
    (chunk,) = build(spec, tmp_path / "out")
    assert chunk.row_idxs == [0, 1, 4]
    assert [(s.row_idx, s.reason.split(":")[0]) for s in chunk.skipped] == [
        (2, "image not found"),
        (3, "image path escapes the image dir " + str(tmp_path / "images")),
    ]
    assert chunk.skipped[0].reason == f"image not found: {tmp_path / 'images' / 'missing.png'}"
    lines = read_lines([chunk])
    url = "data:image/png;base64," + base64.b64encode(PNG).decode()
    assert lines[0] == request_line(spec, "m", "r0", "name 0", url)
    assert lines[1] == request_line(spec, "m", "r1", "name 1")  # empty cell: text only
    text_tokens = math.ceil(len("name 0") / 4) + 7
    assert chunk.est_prompt_tokens == 3 * text_tokens + 2 * 765


def test_skipped_rows_count_toward_their_chunk_and_are_always_reported(tmp_path):
    path = image_table(tmp_path, ["ok.png", "gone1.png", "gone2.png", "ok.png", "ok.png"])
    spec = make_spec(
        path, prompt="{name}", image_column="img", image_dir=str(tmp_path / "images"), batch_size=2
    )
    chunks = build(spec, tmp_path / "out")
    assert [(c.row_idxs, [s.row_idx for s in c.skipped]) for c in chunks] == [
        ([0], [1]),
        ([3], [2]),
        ([4], []),
    ]


def test_a_chunk_whose_rows_are_all_skipped_is_still_yielded(tmp_path):
    path = image_table(tmp_path, ["gone.png"] * 3)
    spec = make_spec(
        path, prompt="{name}", image_column="img", image_dir=str(tmp_path / "images"), batch_size=2
    )
    chunks = build(spec, tmp_path / "out")
    assert [(c.row_idxs, len(c.skipped), c.n_bytes) for c in chunks] == [([], 2, 0), ([], 1, 0)]
    assert all(c.path.exists() for c in chunks)


def test_the_bundled_sample_builds_without_skips(tmp_path):
    sample = tmp_path / "sample"
    shutil.copytree(SAMPLE, sample)
    prompt = (sample / "prompt.txt").read_text(encoding="utf-8")
    spec = JobSpec(
        source=str(sample / "products.csv"),
        id_column="sku",
        prompt=prompt,
        image_column="image",
        image_dir=str(sample / "images"),
        models=[{"name": "gpt-4o-mini"}],
        batch_size=20,
    )
    chunks = list(
        build_chunks(
            open_source(spec), spec, model="gpt-4o-mini", out_dir=tmp_path / "out", first_chunk_no=0
        )
    )
    assert not [s for c in chunks for s in c.skipped]
    lines = read_lines(chunks)
    assert lines[0]["custom_id"] == "007"
    assert sum(isinstance(line["body"]["messages"][0]["content"], list) for line in lines) >= 10


def test_empty_embedding_inputs_are_skipped_not_sent(tmp_path):
    path = write_csv(tmp_path / "e.csv", ["id", "text"], [["a", "x"], ["b", ""], ["c", "y"]])
    spec = make_spec(path, prompt="{text}", endpoint="/v1/embeddings", id_column="id")
    (chunk,) = build(spec, tmp_path / "o")
    assert chunk.row_idxs == [0, 2]
    assert [(s.row_idx, "empty input" in s.reason) for s in chunk.skipped] == [(1, True)]


@pytest.mark.parametrize(
    "ids",
    [["p1", "p2", "x y", "é猫", "~!#$%&'()*+,-./:;<=>?@[]^_`{|}\x7f\ufeff"]]
    + [["p1", f"a{c}b"] for c in ['"', "\\", "\n", "\x00", "\x1f", "\u2028", "\u2029", "\x85"]],
    ids=lambda ids: ascii(ids[-1]),
)
def test_lines_are_byte_identical_to_the_per_row_reference(tmp_path, ids):
    """custom_ids needing no escape are spliced in as they are; both ways give the exact
    bytes of render.dumps (a dry run's files must not change with how they were made)."""
    rows = [[cid, f'text {i} "q" \\ \n {AWKWARD[i % len(AWKWARD)]}'] for i, cid in enumerate(ids)]
    path = write_csv(tmp_path / "ids.csv", ["id", "name"], rows)
    spec = make_spec(path, id_column="id", prompt="{name}")
    (chunk,) = build(spec, tmp_path / "out")
    want = b"".join(dumps(request_line(spec, "m", cid, text)) + b"\n" for cid, text in rows)
    assert chunk.path.read_bytes() == want
