"""Prices, costs, token and image estimates (batchops/pricing.py). Fast: no network, no server."""

from __future__ import annotations

import base64
import math
import random
import struct
import warnings
import zlib
from datetime import UTC, datetime
from decimal import Decimal

import genai_prices
import polars as pl
import pytest

from batchops.pricing import (
    DEFAULT_IMAGE_SIZE,
    REPLY_PRIMING_TOKENS,
    TOKENS_PER_MESSAGE,
    ModelPrice,
    PriceTier,
    UnknownPriceWarning,
    cost_of,
    cost_or_none,
    data_url_image_size,
    estimate_cost,
    estimate_request_tokens,
    estimate_text_tokens,
    estimate_text_tokens_series,
    image_size,
    image_tokens,
    overrides_from_spec,
    price_for,
    sum_costs,
)
from batchops.records import Usage
from batchops.spec import JobSpec, ModelEntry, PriceOverride

# genai-prices 0.2.3 lists OpenAI batch prices from 2026-10-14 on (its `processing: batch`
# variants carry that start date); before it, batchops falls back to 50 % of the sync price.
AFTER_BATCH_DATA = datetime(2026, 11, 1, tzinfo=UTC)
BEFORE_BATCH_DATA = datetime(2025, 6, 1, tzinfo=UTC)
LIB = f"genai-prices {genai_prices.__version__}"


def _unique(name: str) -> str:
    # the unknown-price warning fires once per model per process: fresh names keep tests independent
    return f"{name}-{random.getrandbits(48):x}"


# ------------------------------------------------------------------------------ library prices


def test_known_model_sync_price_from_library() -> None:
    p = price_for("gpt-4o-mini", batch=False, when=AFTER_BATCH_DATA)
    assert p is not None
    assert (p.input_per_mtok, p.cached_input_per_mtok, p.output_per_mtok) == (0.15, 0.075, 0.6)
    assert p.batch is False
    assert p.source.startswith(LIB) and "openai:gpt-4o-mini" in p.source


def test_batch_price_is_half_from_library_batch_variant() -> None:
    sync = price_for("gpt-4o-mini", batch=False, when=AFTER_BATCH_DATA)
    batch = price_for("gpt-4o-mini", batch=True, when=AFTER_BATCH_DATA)
    assert sync is not None and batch is not None
    assert batch.batch is True
    assert batch.input_per_mtok == sync.input_per_mtok / 2 == 0.075
    assert batch.output_per_mtok == sync.output_per_mtok / 2 == 0.3
    assert batch.source == f"{LIB} (openai:gpt-4o-mini, batch price)"
    # the library's batch table has no cached rate for this model, so cached input keeps the
    # standard cached rate (its documented choice), which here equals the batch input rate
    assert batch.cached_input_per_mtok == 0.075


def test_batch_price_falls_back_to_half_before_library_batch_date() -> None:
    batch = price_for("gpt-4o-mini", batch=True, when=BEFORE_BATCH_DATA)
    assert batch is not None
    assert (batch.input_per_mtok, batch.cached_input_per_mtok, batch.output_per_mtok) == (
        0.075,
        0.0375,
        0.3,
    )
    assert "50% of the sync price" in batch.source and "2025-06-01" in batch.source


def test_batch_fallback_for_model_without_batch_variant() -> None:
    sync = price_for("text-embedding-3-small", batch=False, when=AFTER_BATCH_DATA)
    batch = price_for("text-embedding-3-small", batch=True, when=AFTER_BATCH_DATA)
    assert sync is not None and batch is not None
    assert batch.input_per_mtok == sync.input_per_mtok / 2
    assert batch.output_per_mtok == 0.0  # embeddings have no output price
    assert "50% of the sync price" in batch.source


def test_batch_variant_without_discount_is_not_halved() -> None:
    # genai-prices: "The Batch table lists the same rates as standard" for gpt-3.5-turbo-1106
    sync = price_for("gpt-3.5-turbo-1106", batch=False, when=AFTER_BATCH_DATA)
    batch = price_for("gpt-3.5-turbo-1106", batch=True, when=AFTER_BATCH_DATA)
    assert sync is not None and batch is not None
    assert batch.input_per_mtok == sync.input_per_mtok
    assert batch.source.endswith("batch price)")


@pytest.mark.parametrize(
    "name",
    ["gpt-4o-mini-2024-07-18", "GPT-4o-mini", "openai/gpt-4o-mini", "gpt-4o-mini-2099-12-31"],
)
def test_model_name_variants_resolve(name: str) -> None:
    p = price_for(name, batch=False, when=AFTER_BATCH_DATA)
    assert p is not None and p.model == name
    assert "openai:gpt-4o-mini" in p.source and p.input_per_mtok == 0.15


def test_naive_datetime_is_utc() -> None:
    naive = price_for("gpt-4o-mini", batch=True, when=datetime(2026, 11, 1))
    assert naive == price_for("gpt-4o-mini", batch=True, when=AFTER_BATCH_DATA)


@pytest.mark.parametrize(
    ("model", "batch"), [("gpt-4o-mini", False), ("gpt-4o-mini", True), ("o3", True)]
)
def test_cost_agrees_with_genai_prices(model: str, batch: bool) -> None:
    usage = Usage(prompt_tokens=12_345, cached_tokens=2_000, completion_tokens=678)
    p = price_for(model, batch=batch, when=AFTER_BATCH_DATA)
    assert p is not None
    ref = genai_prices.calc_price(
        genai_prices.Usage(input_tokens=12_345, cache_read_tokens=2_000, output_tokens=678),
        model,
        provider_id="openai",
        genai_request_timestamp=AFTER_BATCH_DATA,
        price_context={"processing": "batch"} if batch else None,
    )
    assert cost_of(usage, p) == pytest.approx(float(ref.total_price), abs=1e-12)


def test_long_context_tier_applies_per_request_only() -> None:
    p = price_for("gpt-5.4", batch=True, when=AFTER_BATCH_DATA)
    assert p is not None and p.tiers and p.tiers[0].above_prompt_tokens == 272_000
    big = Usage(prompt_tokens=300_000, cached_tokens=1_000, completion_tokens=1_000)
    ref = genai_prices.calc_price(
        genai_prices.Usage(input_tokens=300_000, cache_read_tokens=1_000, output_tokens=1_000),
        "gpt-5.4",
        provider_id="openai",
        genai_request_timestamp=AFTER_BATCH_DATA,
        price_context={"processing": "batch"},
    )
    assert cost_of(big, p) == pytest.approx(float(ref.total_price), abs=1e-12)
    # summed usage of many small requests must not trigger the per-request tier
    base = (
        299_000 * p.input_per_mtok + 1_000 * p.cached_input_per_mtok
    ) + 1_000 * p.output_per_mtok
    assert cost_of(big, p, per_request=False) == pytest.approx(base / 1e6, abs=1e-12)


# ------------------------------------------------------------------------------ overrides


def test_override_prices_unknown_model() -> None:
    ov = {"qwen-plus": PriceOverride(input=0.4, output=1.2, cached_input=0.16, batch_discount=0.5)}
    sync = price_for("qwen-plus", batch=False, overrides=ov)
    batch = price_for("qwen-plus", batch=True, overrides=ov)
    assert sync == ModelPrice("qwen-plus", 0.4, 0.16, 1.2, "batchops.toml override", False)
    assert batch is not None and batch.source == "batchops.toml override (batch discount 0.5)"
    assert (batch.input_per_mtok, batch.cached_input_per_mtok, batch.output_per_mtok) == (
        0.2,
        0.08,
        0.6,
    )


def test_override_defaults_and_custom_discount() -> None:
    ov = {"my-model": PriceOverride(input=1.0, output=3.0, batch_discount=0.2)}
    p = price_for("my-model", batch=True, overrides=ov)
    assert p is not None
    assert (p.input_per_mtok, p.cached_input_per_mtok, p.output_per_mtok) == (0.8, 0.8, 2.4)


def test_override_wins_over_library_and_matches_case_insensitively() -> None:
    ov = {"GPT-4o-Mini": PriceOverride(input=9.0, output=9.0)}
    p = price_for("gpt-4o-mini", batch=False, overrides=ov)
    assert p is not None and p.source == "batchops.toml override" and p.input_per_mtok == 9.0


def test_override_given_as_plain_mapping() -> None:
    p = price_for("x-model", batch=False, overrides={"x-model": {"input": 2, "output": 4}})  # type: ignore[dict-item]
    assert p is not None and p.output_per_mtok == 4.0


def test_zero_price_local_model_costs_zero_not_unknown() -> None:
    ov = {"local-vllm": PriceOverride(input=0, output=0)}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no unknown-price warning either
        assert cost_or_none(Usage(1000, 0, 500), "local-vllm", batch=True, overrides=ov) == 0.0
        assert estimate_cost("local-vllm", 10_000, 2_000, batch=False, overrides=ov) == 0.0


def test_overrides_from_spec_model_entry_wins() -> None:
    spec = JobSpec(
        source="in.csv",
        prompt="{x}",
        models=[
            ModelEntry(name="qwen-plus", price=PriceOverride(input=0.5, output=1.5)),
            ModelEntry(name="gpt-4o-mini"),
        ],
        prices={
            "qwen-plus": PriceOverride(input=0.4, output=1.2),
            "qwen-max": PriceOverride(input=2, output=6),
        },
    )
    ov = overrides_from_spec(spec)
    assert ov["qwen-plus"].input == 0.5 and ov["qwen-max"].input == 2
    assert "gpt-4o-mini" not in ov


# ------------------------------------------------------------------------------ unknown prices


def test_unknown_model_is_none_with_one_warning() -> None:
    name = _unique("no-such-model")
    with pytest.warns(UnknownPriceWarning) as record:
        assert price_for(name, batch=True) is None
    msg = str(record[0].message)
    assert name in msg and "batchops.toml" in msg and f'[prices."{name}"]' in msg
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per model per process
        assert cost_or_none(Usage(10, 0, 10), name, batch=True) is None
        assert estimate_cost(name, 100, 100, batch=False) is None


def test_a_typo_in_a_model_name_is_pointed_at_the_model_meant() -> None:
    with pytest.warns(UnknownPriceWarning) as record:
        assert price_for("gpt-4.1-mimi", batch=True) is None
    assert "did you mean 'gpt-4.1-mini'?" in str(record[0].message)
    with pytest.warns(UnknownPriceWarning) as record:  # nothing close: no guess
        assert price_for(_unique("in-house-finetune"), batch=True) is None
    assert "did you mean" not in str(record[0].message)


def test_unknown_price_never_becomes_zero_in_sums() -> None:
    assert sum_costs([0.1, None, 0.2]) is None
    assert sum_costs([0.0, 0.0]) == 0.0
    assert sum_costs([0.1] * 10) == 1.0  # decimal sum: no 0.9999999999999999


# ------------------------------------------------------------------------------ cost arithmetic


def test_cost_arithmetic_with_cached_and_reasoning_tokens() -> None:
    p = ModelPrice("m", 0.15, 0.075, 0.6, "test", False)
    # 800 uncached × 0.15 + 200 cached × 0.075 + 500 completion × 0.6, per 1M tokens;
    # the 300 reasoning tokens are part of the 500 completion tokens and are not added again
    usage = Usage(
        prompt_tokens=1000, cached_tokens=200, completion_tokens=500, reasoning_tokens=300
    )
    assert cost_of(usage, p) == pytest.approx(4.35e-4, abs=1e-9)
    assert cost_of(usage, p) == float(Decimal("0.000435"))
    assert cost_of(Usage(), p) == 0.0


def test_cost_large_counts_exact() -> None:
    p = ModelPrice("m", 2.5, 1.25, 10.0, "test", True)
    usage = Usage(prompt_tokens=123_456_789, cached_tokens=23_456_789, completion_tokens=9_876_543)
    expected = (100_000_000 * 2.5 + 23_456_789 * 1.25 + 9_876_543 * 10.0) / 1e6
    assert cost_of(usage, p) == pytest.approx(expected, abs=1e-9)


def test_cached_more_than_prompt_is_clamped() -> None:
    p = ModelPrice("m", 1.0, 0.5, 2.0, "test", False)
    assert cost_of(Usage(prompt_tokens=100, cached_tokens=150), p) == pytest.approx(50 / 1e6)


def test_tier_selection() -> None:
    p = ModelPrice("m", 1.0, 0.1, 4.0, "t", False, (PriceTier(1000, 2.0, 0.2, 8.0),))
    assert p.rates_for(1000) == (1.0, 0.1, 4.0)
    assert p.rates_for(1001) == (2.0, 0.2, 8.0)


def test_estimate_cost_uses_batch_price() -> None:
    cost = estimate_cost("gpt-4o-mini", 1_000_000, 1_000_000, batch=True, when=AFTER_BATCH_DATA)
    assert cost == pytest.approx(0.075 + 0.3, abs=1e-9)
    sync = estimate_cost("gpt-4o-mini", 1_000_000, 1_000_000, batch=False, when=AFTER_BATCH_DATA)
    assert sync == pytest.approx(0.75, abs=1e-9)


# ------------------------------------------------------------------------------ image tokens


@pytest.mark.parametrize(
    ("w", "h", "detail", "tokens"),
    [
        (512, 512, "low", 85),
        (512, 512, "high", 255),  # one tile; small images are not scaled up
        (1024, 1024, "high", 765),  # → 768×768, 4 tiles
        (1024, 1024, "auto", 765),
        (2048, 4096, "high", 1105),  # → 1024×2048 → 768×1536, 6 tiles
        (4096, 8192, "low", 85),
        (513, 500, "high", 425),
        (1920, 1080, "high", 1105),  # → 1365×768, 3×2 tiles
    ],
)
def test_image_tokens_tile_formula(w: int, h: int, detail: str, tokens: int) -> None:
    assert image_tokens(w, h, detail) == tokens
    assert image_tokens(w, h, detail, model="gpt-4o-2024-08-06") == tokens


def test_image_tokens_model_dependent() -> None:
    # gpt-4o-mini bills images at ~33× gpt-4o's tokens: base 2833, 5667 per tile
    assert image_tokens(512, 512, "low", "gpt-4o-mini") == 2833
    assert image_tokens(1024, 1024, "high", "gpt-4o-mini-2024-07-18") == 2833 + 4 * 5667
    # patch models: 32-px patches (max 1536) × multiplier, detail ignored
    assert image_tokens(1024, 1024, "high", "gpt-4.1-mini") == math.ceil(1024 * 1.62)
    assert image_tokens(1024, 1024, "low", "gpt-4.1-mini") == math.ceil(1024 * 1.62)
    assert image_tokens(1800, 2400, "high", "gpt-4.1-nano") == math.ceil(1452 * 2.46)
    assert image_tokens(1024, 1024, "high", "gpt-5") == 70 + 4 * 140
    assert image_tokens(1024, 1024, "high", "some-unknown-vlm") == 765
    with pytest.raises(ValueError):
        image_tokens(0, 10)


# ------------------------------------------------------------------------------ image headers


def _png(w: int, h: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    raw = b"".join(b"\x00" + b"\x00" * w for _ in range(h))
    body = chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + body


def _jpeg(w: int, h: int, app_bytes: int = 16) -> bytes:
    app0 = b"\xff\xe0" + struct.pack(">H", app_bytes + 2) + b"\x00" * app_bytes
    dqt = b"\xff\xdb" + struct.pack(">H", 67) + b"\x00" * 65
    sof = b"\xff\xc0" + struct.pack(">HBHHB", 11, 8, h, w, 1) + b"\x01\x11\x00"
    return b"\xff\xd8" + app0 + dqt + sof + b"\xff\xda\x00\x08" + b"\x00" * 6 + b"\xff\xd9"


def _gif(w: int, h: int) -> bytes:
    return b"GIF89a" + struct.pack("<HH", w, h) + b"\x00\x00\x00" + b"\x3b"


def _webp(chunk: bytes, payload: bytes) -> bytes:
    body = b"WEBP" + chunk + struct.pack("<I", len(payload)) + payload
    return b"RIFF" + struct.pack("<I", len(body)) + body


def _webp_lossy(w: int, h: int) -> bytes:
    return _webp(b"VP8 ", b"\x00\x00\x00" + b"\x9d\x01\x2a" + struct.pack("<HH", w, h) + b"\0" * 4)


def _webp_lossless(w: int, h: int) -> bytes:
    bits = (w - 1) | ((h - 1) << 14)
    return _webp(b"VP8L", b"\x2f" + struct.pack("<I", bits) + b"\0" * 4)


def _webp_extended(w: int, h: int) -> bytes:
    return _webp(
        b"VP8X", b"\x10\0\0\0" + (w - 1).to_bytes(3, "little") + (h - 1).to_bytes(3, "little")
    )


@pytest.mark.parametrize("make", [_png, _jpeg, _gif, _webp_lossy, _webp_lossless, _webp_extended])
def test_image_size_formats(make) -> None:  # type: ignore[no-untyped-def]
    assert image_size(make(3, 2)) == (3, 2)
    assert image_size(make(1000, 700)) == (1000, 700)


def test_image_size_rejects_other_or_truncated_data() -> None:
    assert image_size(b"") is None
    assert image_size(b"not an image at all") is None
    assert image_size(_png(5, 5)[:20]) is None
    assert image_size(_jpeg(5, 5)[:30]) is None
    assert image_size(b"%PDF-1.7\n") is None


def test_data_url_image_size() -> None:
    png = "data:image/png;base64," + base64.b64encode(_png(64, 32)).decode()
    assert data_url_image_size(png) == (64, 32)
    # a JPEG whose frame header sits behind a 60 KB APP segment (EXIF-like): decoded in steps
    jpg = "data:image/jpeg;base64," + base64.b64encode(_jpeg(800, 600, 60_000)).decode()
    assert data_url_image_size(jpg) == (800, 600)
    assert data_url_image_size("https://example.com/cat.png") is None
    assert data_url_image_size("data:image/png;base64,!!!notbase64!!!") is None
    assert data_url_image_size("data:text/plain,hello") is None


# ------------------------------------------------------------------------------ text tokens

# Held-out samples (not used to fit the weights) with their real o200k_base token counts,
# measured with the o200k_base.tiktoken file bundled in the bpe-openai wheel.
CALIBRATION: list[tuple[int, str]] = [
    (41, "Classify the sentiment of this customer review as positive, negative or neutral. Answer with one word.\n\nReview: The delivery was two days late, but the headphones sound great and the battery lasts all week."),
    (78, "Summarize the following support ticket in one sentence.\nTicket #004512 (priority: high)\nCustomer: Bob O'Neil <bob.oneil@example.com>\nSubject: Refund not received\nBody: I returned the order on 2024-03-14 and was promised a refund of $129.99 within 5 business days. It has been three weeks. Please advise."),
    (56, "You are a product catalog assistant. Write a one-sentence description and pick a category.\nTitle: Stainless steel water bottle, 750ml\nSKU: BX-4471-EU\nBrand: Acme\nPrice (EUR): 24,90\nIn stock: yes"),
    (87, "Extract the company name, the invoice number and the total amount from the text below and return them as JSON.\n\nINVOICE INV-2023-00871\nGlobex Corporation, 1200 Industrial Way, Springfield\nDate: 12/05/2023\nSubtotal: 1,480.00 USD\nTax (8.25%): 122.10 USD\nTotal due: 1,602.10 USD"),
    (27, 'Translate to French: "Our office will be closed on Monday for the public holiday. Orders placed over the weekend will ship on Tuesday."'),
    (47, '{"id": "00042", "name": "Zoe Kravitz", "score": 87.125, "tags": ["vip", "newsletter"], "note": "asked about bulk pricing for 500 units"}'),
    (70, 'def moving_average(values: list[float], window: int = 3) -> list[float]:\n    if window <= 0:\n        raise ValueError("window must be positive")\n    return [sum(values[i - window + 1 : i + 1]) / window for i in range(window - 1, len(values))]'),
    (27, "Internationalization and localization are often abbreviated as i18n and l10n; both are essential for software that serves a worldwide audience."),
    (36, "请将下面的评论分类为正面、负面或中性，只回答一个词。评论：物流很快，包装完好，但是尺寸比描述的小一点。"),
    (34, "この商品はとても使いやすく、デザインも気に入っています。ただし、説明書が英語のみなのは少し不便でした。"),
    (23, "Le service client a répondu rapidement et le produit est arrivé en parfait état, mais la notice est très succincte."),
    (21, "Die Lieferung kam pünktlich an, aber die Bedienungsanleitung ist leider unvollständig."),
    (21, "Best purchase ever!!! 😍😍 Totally worth it 👍 would recommend to anyone looking for a budget laptop."),
    (40, "Q3 revenue grew 12.4% year over year to $4.87B, driven by cloud services (+23%) and advertising (+7%); operating margin was 31.2%."),
    (31, "Rate the answer from 1 to 5.\nQuestion: What is the capital of Australia?\nAnswer: Sydney is the capital of Australia.\nReference: Canberra"),
    (26, "name,age,city\nAlice,34,Berlin\nBob,27,Madrid\nCarla,45,Lisbon"),
]  # fmt: skip


def test_text_estimate_within_10_percent_of_o200k() -> None:
    real = sum(n for n, _ in CALIBRATION)
    est = sum(estimate_text_tokens(t) for _, t in CALIBRATION)
    assert abs(est - real) / real < 0.05  # measured: -0.8 %
    english = [(n, t) for n, t in CALIBRATION[:8] + CALIBRATION[13:15]]
    for n, t in english:  # English and mixed prompts, one by one
        assert abs(estimate_text_tokens(t) - n) / n <= 0.12, t
    for n, t in CALIBRATION:  # every sample, including CJK, German compounds and bare CSV
        assert abs(estimate_text_tokens(t) - n) / n <= 0.30, t


def test_text_estimate_basics() -> None:
    assert estimate_text_tokens("") == 0
    assert estimate_text_tokens("a") == 1
    assert estimate_text_tokens("Hello world, this is a test.") == 8
    assert estimate_text_tokens("1234567") == 3  # digits go in groups of three
    assert estimate_text_tokens("x" * 400) > 40  # a long run of letters is not one token


def _fuzz_texts(n: int) -> list[str]:
    rng = random.Random(7)
    ranges = [(0x20, 0x7E), (0x09, 0x0D), (0xA0, 0x2FF), (0x300, 0x6FF), (0x900, 0xE7F)]
    ranges += [(0x1100, 0x11FF), (0x1E00, 0x1FFF), (0x2000, 0x2BFF), (0x3000, 0x30FF)]
    ranges += [(0x3400, 0x9FFF), (0xAC00, 0xD7AF), (0xE000, 0xFFFD), (0x10000, 0x1FAFF)]
    out = []
    for _ in range(n):
        chars = []
        for _ in range(rng.randint(0, 40)):
            lo, hi = rng.choice(ranges)
            chars.append(chr(rng.randint(lo, hi)))
        out.append("".join(chars))
    return out


def test_series_matches_scalar_exactly() -> None:
    texts = [t for _, t in CALIBRATION] + _fuzz_texts(2000)
    texts += ["", " ", "\n", "  x", "x.\n", "...b", "a.b.c", "\u3000\u00a0", "e\u0301"]
    series = estimate_text_tokens_series(pl.Series("prompt", texts))
    assert series.name == "prompt" and series.dtype == pl.Int64
    assert series.to_list() == [estimate_text_tokens(t) for t in texts]


def test_series_nulls_and_empty() -> None:
    assert estimate_text_tokens_series(pl.Series("t", ["hi", None, ""])).to_list() == [1, 0, 0]
    assert estimate_text_tokens_series(pl.Series("t", [], dtype=pl.String)).to_list() == []


# ------------------------------------------------------------------------------ request bodies


def test_chat_request_tokens() -> None:
    system, user = "You are terse.", "Classify: great product, fast delivery."
    body = {
        "model": "gpt-4o-mini",
        "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}],
    }
    expected = REPLY_PRIMING_TOKENS + 2 * (TOKENS_PER_MESSAGE + 1)
    expected += estimate_text_tokens(system) + estimate_text_tokens(user)
    assert estimate_request_tokens(body) == expected
    named = {"messages": [{"role": "user", "name": "bob", "content": user}]}
    assert estimate_request_tokens(named) == 3 + 4 + estimate_text_tokens(user) + 1 + 1


def test_chat_request_with_images() -> None:
    url = "data:image/png;base64," + base64.b64encode(_png(1024, 1024)).decode()

    def body(detail: str, model: str, image_url: str = url) -> dict:
        parts = [
            {"type": "text", "text": "Describe this picture:"},
            {"type": "image_url", "image_url": {"url": image_url, "detail": detail}},
        ]
        return {"model": model, "messages": [{"role": "user", "content": parts}]}

    text = 3 + 4 + estimate_text_tokens("Describe this picture:")
    assert estimate_request_tokens(body("high", "gpt-4o")) == text + 765
    assert estimate_request_tokens(body("low", "gpt-4o")) == text + 85
    assert estimate_request_tokens(body("high", "gpt-4o-mini")) == text + 2833 + 4 * 5667
    remote = body("auto", "gpt-4o", "https://example.com/x.png")
    assert estimate_request_tokens(remote) == text + image_tokens(*DEFAULT_IMAGE_SIZE)


def test_responses_request_tokens() -> None:
    text = "Summarise: the meeting moved to Friday."
    as_string = {"model": "gpt-4o-mini", "input": text}
    as_items = {
        "model": "gpt-4o-mini",
        "input": [{"role": "user", "content": [{"type": "input_text", "text": text}]}],
    }
    expected = 3 + 4 + estimate_text_tokens(text)
    assert estimate_request_tokens(as_string, "/v1/responses") == expected
    assert estimate_request_tokens(as_items) == expected
    with_instructions = dict(as_string, instructions="Be brief.")
    assert estimate_request_tokens(with_instructions) == expected + 4 + estimate_text_tokens(
        "Be brief."
    )
    url = "data:image/gif;base64," + base64.b64encode(_gif(512, 512)).decode()
    image = {"type": "input_image", "image_url": url, "detail": "high"}
    with_image = {"model": "gpt-4o", "input": [{"role": "user", "content": [image]}]}
    assert estimate_request_tokens(with_image) == 3 + 4 + 255


def test_embeddings_request_tokens() -> None:
    one = {"model": "text-embedding-3-small", "input": "hello world"}
    assert estimate_request_tokens(one) == 2  # no chat formatting
    many = {"model": "text-embedding-3-small", "input": ["hello world", "good morning"]}
    assert estimate_request_tokens(many, "/v1/embeddings") == 4
    assert estimate_request_tokens({"model": "e", "input": [1, 2, 3]}, "/v1/embeddings") == 3
    assert estimate_request_tokens({"model": "e", "input": [[1, 2], [3]]}, "/v1/embeddings") == 3


def test_tools_and_schema_are_counted() -> None:
    base = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}
    schema = {
        "name": "out",
        "schema": {"type": "object", "properties": {"label": {"type": "string"}}},
    }
    with_schema = dict(base, response_format={"type": "json_schema", "json_schema": schema})
    assert estimate_request_tokens(with_schema) > estimate_request_tokens(base)


def test_cache_writes_are_billed_at_their_own_rates() -> None:
    p = ModelPrice(
        "m", 1.0, 0.1, 4.0, "t", False, cache_write_per_mtok=1.25, cache_write_1h_per_mtok=2.0
    )
    usage = Usage(
        prompt_tokens=1_000_000, cached_tokens=100_000, completion_tokens=0,
        cache_write_tokens=200_000, cache_write_1h_tokens=300_000,
    )  # fmt: skip
    # 400k fresh x 1.0 + 100k read x 0.1 + 200k x 1.25 + 300k x 2.0
    assert cost_of(usage, p) == pytest.approx(0.4 + 0.01 + 0.25 + 0.6)
    plain = ModelPrice("m", 1.0, 0.1, 4.0, "t", False)  # no write rate known: input rate
    assert cost_of(usage, plain) == pytest.approx(0.4 + 0.01 + 0.2 + 0.3)


def test_library_prices_claude_cache_writes_above_input() -> None:
    p = price_for("claude-sonnet-4-5", batch=True)
    assert p is not None
    assert p.cache_write_per_mtok == pytest.approx(1.25 * p.input_per_mtok)
    assert p.cache_write_1h_per_mtok == pytest.approx(2 * p.input_per_mtok)


def test_override_may_name_cache_write_rates() -> None:
    ov = {"m": {"input": 1.0, "output": 2.0, "cache_write": 1.5, "batch_discount": 0.5}}
    p = price_for("m", batch=True, overrides={"m": PriceOverride.model_validate(ov["m"])})
    assert p is not None
    assert (p.cache_write_per_mtok, p.cache_write_1h_per_mtok) == (0.75, None)
