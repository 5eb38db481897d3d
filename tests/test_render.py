"""render.py: templates, request bodies per endpoint, images as data URLs."""

from __future__ import annotations

import base64
import json
import random
from pathlib import Path

import polars as pl
import pytest

from batchops.errors import InputError
from batchops.render import (
    ImageProblem,
    check_template,
    image_data_url,
    line_pieces,
    render_text,
    request_body,
    request_line,
    template_fields,
    text_expr,
)
from batchops.spec import JobSpec

SAMPLE_IMAGES = Path(__file__).resolve().parents[1] / "data" / "sample" / "images"
COLUMNS = ["name", "price", "product name", "2020"]


def spec(**kw) -> JobSpec:
    kw.setdefault("prompt", "{name}")
    return JobSpec(source="x.csv", models=[{"name": "m"}], **kw)


# -------------------------------------------------------------------------------- templates


def test_fields_in_order_of_first_use_braces_escaped():
    assert template_fields("{price} for {name}, again {price} {{literal}} }}{{") == [
        "price",
        "name",
    ]
    assert template_fields("no placeholders") == []
    assert template_fields("{product name} in {2020}") == ["product name", "2020"]


def test_unknown_placeholder_names_the_source_and_its_columns():
    with pytest.raises(InputError) as e:
        check_template("A {colour} thing", ["a", "b", "c"], source_name="data/x.csv")
    assert (
        str(e.value)
        == "--prompt: placeholder {colour} names no column of data/x.csv (columns: a, b, c)"
    )
    with pytest.raises(InputError, match=r"--system: .*did you mean \{Price\}\?"):
        check_template("{price}", ["Price", "b"], what="--system")


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        ("{price:.2f}", "{price:.2f} has a conversion or format spec"),
        ("{name!r}", "{name!r} has a conversion or format spec"),
        ("{name.upper}", "{name.upper} uses attribute or index access"),
        ("{name[0]}", "{name[0]} uses attribute or index access"),
        ("{}", "{} is positional"),
        ("{0}", "placeholder {0} names no column of the source"),
        ("a { b", "expected '}' before end of string (write {{ and }} for literal braces)"),
        ("a } b", "Single '}' encountered"),
        ("   ", "--prompt is empty"),
    ],
)
def test_malformed_templates_are_refused_clearly(template, expected):
    with pytest.raises(InputError) as e:
        check_template(template, COLUMNS)
    assert expected in str(e.value)
    assert "\n" not in str(e.value)


def test_render_text_inserts_cells_exactly():
    row = {"name": "Mug {x}", "price": "", "product name": "P", "2020": "y"}
    assert (
        render_text("{name} costs {price}! {{ok}} {product name}/{2020}", row)
        == "Mug {x} costs ! {ok} P/y"
    )
    assert render_text("{price}", {"price": None}) == ""


AWKWARD = [
    "",
    'q"uote',
    "back\\slash",
    "new\nline\r\ntab\t",
    "\x00\x01\x1f\x7f",
    "猫😀</script>",
    "\u2028\u2029",
    "{braces}",
]


def test_text_expr_matches_render_text():
    rng = random.Random(5)
    rows = [{c: rng.choice(AWKWARD) + rng.choice(AWKWARD) for c in COLUMNS} for _ in range(200)]
    df = pl.DataFrame(rows, schema=dict.fromkeys(COLUMNS, pl.String))
    for template in [
        "{name}",
        "x {{ {name}{price} }} y {product name}{2020}",
        "constant only",
        "{price}!",
    ]:
        got = df.with_columns(text_expr(template).alias("t"))["t"].to_list()
        assert got == [render_text(template, r) for r in rows]


# ---------------------------------------------------------------------------------- bodies


def test_chat_body_text_and_image():
    s = spec(
        system="Be brief.",
        max_tokens=50,
        temperature=0.2,
        body_extra={"seed": 1},
        image_detail="low",
    )
    assert request_body(s, "gpt-x", "hi") == {
        "model": "gpt-x",
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}],
        "max_tokens": 50,
        "temperature": 0.2,
        "seed": 1,
    }
    body = request_body(s, "gpt-x", "hi", "data:image/png;base64,AAAA")
    assert body["messages"][1]["content"] == [
        {"type": "text", "text": "hi"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA", "detail": "low"}},
    ]
    assert request_body(spec(), "m", "") == {
        "model": "m",
        "messages": [{"role": "user", "content": ""}],
    }


def test_responses_body():
    s = spec(endpoint="/v1/responses", system="Sys", max_tokens=9)
    assert request_body(s, "m", "hi", "data:image/jpeg;base64,QQ==") == {
        "model": "m",
        "input": [
            {
                "role": "user",
                "content": [
                    {"type": "input_text", "text": "hi"},
                    {
                        "type": "input_image",
                        "image_url": "data:image/jpeg;base64,QQ==",
                        "detail": "auto",
                    },
                ],
            }
        ],
        "instructions": "Sys",
        "max_output_tokens": 9,
    }


def test_embeddings_body_and_options_without_meaning():
    assert request_body(
        spec(endpoint="/v1/embeddings", body_extra={"dimensions": 8}), "e", "t"
    ) == {
        "model": "e",
        "input": "t",
        "dimensions": 8,
    }
    with pytest.raises(InputError, match="--system has no meaning for /v1/embeddings"):
        request_body(spec(endpoint="/v1/embeddings", system="s"), "e", "t")


@pytest.mark.parametrize(
    "extra", [{"model": "other"}, {"messages": []}, {"max_tokens": 3}, {"stream": True}]
)
def test_body_extra_cannot_override_what_batchops_sets(extra):
    with pytest.raises(InputError, match="body_extra sets"):
        request_body(spec(body_extra=extra), "m", "t")


@pytest.mark.parametrize(
    "s",
    [
        spec(),
        spec(
            system='He said "hi"\n',
            max_tokens=5,
            body_extra={"n": 1, "stop": ["\n"], "meta": {"a": None}},
        ),
        spec(endpoint="/v1/responses", system="S"),
        spec(endpoint="/v1/embeddings"),
    ],
)
def test_line_pieces_splice_to_the_reference_line(s):
    before, between, after = line_pieces(s, "model-1")
    for cid, text in [("007", "hello"), ('i"d\\', "t\n\u2028😀"), ("", "")]:
        line = (
            before
            + json.dumps(cid, ensure_ascii=False)
            + between
            + json.dumps(text, ensure_ascii=False)
            + after
        )
        assert json.loads(line) == request_line(s, "model-1", cid, text)
    assert json.loads(before + '"x"' + between + '"y"' + after)["url"] == s.endpoint


# ---------------------------------------------------------------------------------- images


@pytest.mark.parametrize(
    ("name", "data", "mime"),
    [
        ("a.png", b"\x89PNG\r\n\x1a\nrest", "image/png"),
        ("a.bin", b"\xff\xd8\xff\xe0rest", "image/jpeg"),
        ("a.gif", b"GIF89a...", "image/gif"),
        ("a", b"RIFF\x00\x00\x00\x00WEBPVP8 ", "image/webp"),
    ],
)
def test_data_url_has_mime_and_unchanged_bytes(tmp_path, name, data, mime):
    (tmp_path / name).write_bytes(data)
    url = image_data_url(tmp_path, name)
    prefix = f"data:{mime};base64,"
    assert url.startswith(prefix)
    assert base64.b64decode(url[len(prefix) :]) == data


def test_sample_images_are_png_and_jpeg():
    mimes = {image_data_url(SAMPLE_IMAGES, p.name).split(";")[0] for p in SAMPLE_IMAGES.iterdir()}
    assert mimes == {"data:image/png", "data:image/jpeg"}


def test_image_problems_name_the_file(tmp_path):
    images = tmp_path / "images"
    (images / "sub").mkdir(parents=True)
    (tmp_path / "secret.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    (images / "empty.png").write_bytes(b"")
    (images / "notes.txt").write_bytes(b"hello")
    (images / "fake.JPG").write_bytes(b"not really a jpeg")
    (images / "link.png").symlink_to(tmp_path / "secret.png")
    cases = {
        "x.png": f"image not found: {images}/x.png",
        "../secret.png": f"image path escapes the image dir {images}: ../secret.png",
        str(tmp_path / "secret.png"): "image path escapes the image dir",
        "link.png": "image path escapes the image dir",
        "sub": "image is a directory",
        "empty.png": f"image file is empty: {images}/empty.png",
        "notes.txt": f"not a PNG, JPEG, GIF or WEBP image (by its bytes): {images}/notes.txt",
        # The extension proves nothing: the bytes decide (issue 14).
        "fake.JPG": f"not a PNG, JPEG, GIF or WEBP image (by its bytes): {images}/fake.JPG",
    }
    for cell, reason in cases.items():
        with pytest.raises(ImageProblem) as e:
            image_data_url(images, cell)
        assert e.value.reason.startswith(reason), (cell, e.value.reason)
