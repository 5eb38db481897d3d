"""Prices, costs and offline token estimates.

Where a price comes from, in order (see docs/pricing.md):

1. the user's override table (`[prices."model"]` in batchops.toml, or a model entry's `price`);
2. the `genai-prices` library snapshot: provider "openai" first, then whichever provider the
   library matches the name to. Batch prices come from the library's `processing = "batch"` price
   variant when one is in force on the given date; otherwise 50 % of the synchronous price
   (OpenAI's documented Batch API discount) and `source` says so;
3. nothing: the price is unknown, costs are `None` (never a silent 0) and an
   `UnknownPriceWarning` names the model and how to add an override.

Token estimates never need the network: tiktoken's encoding files cannot be downloaded here, so
`estimate_text_tokens` is a calibrated linear model over regex counts (see the constants below).
"""

from __future__ import annotations

import base64
import binascii
import difflib
import functools
import json
import math
import re
import struct
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from loguru import logger

from batchops.records import Usage
from batchops.spec import JobSpec, PriceOverride

if TYPE_CHECKING:  # polars and genai-prices are imported lazily: both take ~0.3-0.4 s to import
    import polars as pl
    from genai_prices.types import ModelInfo, Provider

__all__ = [
    "BATCH_FALLBACK_DISCOUNT",
    "DEFAULT_IMAGE_SIZE",
    "REPLY_PRIMING_TOKENS",
    "TOKENS_PER_MESSAGE",
    "TOKENS_PER_NAME",
    "ModelPrice",
    "PriceTier",
    "UnknownPriceWarning",
    "cost_of",
    "cost_or_none",
    "data_url_image_size",
    "estimate_cost",
    "estimate_request_tokens",
    "estimate_text_tokens",
    "estimate_text_tokens_series",
    "image_size",
    "image_tokens",
    "overrides_from_spec",
    "price_for",
    "sum_costs",
]

# --------------------------------------------------------------------------------------------
# Prices
# --------------------------------------------------------------------------------------------

# OpenAI: "50% cost discount compared to synchronous APIs" (batch-api-facts.md §6). Used when the
# price library has no batch price for a model on the requested date.
BATCH_FALLBACK_DISCOUNT = 0.5
# Completion tokens assumed per row for estimates when --max-tokens is not given.
DEFAULT_COMPLETION_ESTIMATE = 256

OVERRIDE_SOURCE = "batchops.toml override"
_BATCH_CONTEXT = {"processing": "batch"}  # genai-prices' price-variant context for Batch API prices
_MTOK = Decimal(1_000_000)
# dated snapshot suffixes: -2024-07-18, -20240718, and the old -0613 / -1106 style
_DATE_SUFFIX = re.compile(r"-(?:\d{4}-\d{2}-\d{2}|\d{8}|\d{4})$")


@dataclass(frozen=True)
class PriceTier:
    """Long-context rates: they replace the base rates for a request whose prompt has more than
    `above_prompt_tokens` tokens (genai-prices' threshold rule; e.g. gpt-5.4 above 272k)."""

    above_prompt_tokens: int
    input_per_mtok: float
    cached_input_per_mtok: float
    output_per_mtok: float
    cache_write_per_mtok: float | None = None  # None: the tier's input rate
    cache_write_1h_per_mtok: float | None = None


@dataclass(frozen=True)
class ModelPrice:
    """USD per 1M tokens for one model in one mode (batch or synchronous)."""

    model: str  # the name as asked for (the library model it matched is named in `source`)
    input_per_mtok: float  # uncached prompt tokens
    cached_input_per_mtok: float  # prompt tokens served from the prompt cache
    output_per_mtok: float  # completion tokens (reasoning tokens included)
    source: str  # "genai-prices <version> (...)" or "batchops.toml override (...)"
    batch: bool  # whether these are batch prices
    tiers: tuple[PriceTier, ...] = ()  # long-context rates, ascending; empty for most models
    # Prompt-cache writes (Anthropic: 1.25x / 2x input); None: billed at the input rate.
    cache_write_per_mtok: float | None = None
    cache_write_1h_per_mtok: float | None = None

    def rates_for(self, prompt_tokens: int) -> tuple[float, float, float]:
        """(input, cached_input, output) per 1M tokens for ONE request of this prompt size."""
        rate = self._rate_of(prompt_tokens)
        return rate.input_per_mtok, rate.cached_input_per_mtok, rate.output_per_mtok

    def write_rates_for(self, prompt_tokens: int) -> tuple[float, float]:
        """(5-minute, 1-hour) cache-write rates per 1M tokens for ONE request of this size."""
        rate = self._rate_of(prompt_tokens)
        inp = rate.input_per_mtok
        w5, w1h = rate.cache_write_per_mtok, rate.cache_write_1h_per_mtok
        return (inp if w5 is None else w5), (inp if w1h is None else w1h)

    def _rate_of(self, prompt_tokens: int) -> PriceTier | ModelPrice:
        for tier in reversed(self.tiers):
            if prompt_tokens > tier.above_prompt_tokens:
                return tier
        return self


class UnknownPriceWarning(UserWarning):
    """No price is known for a model: its costs are reported as unknown (None), not 0."""


_warned_models: set[str] = set()


def _warn_unknown(model: str) -> None:
    # once per model per process: a run prices every row, one line per model is enough
    if model in _warned_models:
        return
    _warned_models.add(model)
    key = json.dumps(model)  # a TOML basic string: quotes and dots in model names stay valid
    close = similar_priced_models(model)
    msg = (
        f"No price known for model {model!r}"
        + (f" (did you mean {' or '.join(map(repr, close))}?)" if close else "")
        + ": its cost is reported as unknown, not 0. "
        f"Add a price (USD per 1M tokens) to batchops.toml:\n"
        f"  [prices.{key}]\n  input = 0.40\n  output = 1.20\n"
        f"  cached_input = 0.10   # optional, default = input\n"
        f"  batch_discount = 0.5  # optional, fraction taken off in batch mode"
    )
    logger.warning(msg)
    warnings.warn(msg, UnknownPriceWarning, stacklevel=3)


def similar_priced_models(model: str, n: int = 2) -> list[str]:
    """Models with a known price whose names are close to `model` (a typo's likely target)."""
    from genai_prices import data_snapshot

    ids = {m.id for p in data_snapshot.get_snapshot().providers for m in p.models}
    return difflib.get_close_matches(model, sorted(ids), n=n, cutoff=0.85)


def overrides_from_spec(spec: JobSpec) -> dict[str, PriceOverride]:
    """The job's price overrides: the `[prices]` table, then each model entry's own `price`
    (the entry wins: it is the more specific of the two)."""
    out = dict(spec.prices)
    for entry in spec.models:
        if entry.price is not None:
            out[entry.name] = entry.price
    return out


def _dec(x: float) -> Decimal:
    # repr() gives the shortest decimal that round-trips, so 0.15 is exactly Decimal("0.15")
    return Decimal(repr(float(x)))


def _find_override(
    model: str, overrides: Mapping[str, PriceOverride | Mapping[str, Any]] | None
) -> PriceOverride | None:
    if not overrides:
        return None
    found = overrides.get(model)
    if found is None:  # TOML keys are case-sensitive, model names are not
        low = model.lower()
        found = next((v for k, v in overrides.items() if k.lower() == low), None)
    if found is None or isinstance(found, PriceOverride):
        return found
    return PriceOverride.model_validate(found)


def _price_from_override(model: str, ov: PriceOverride, batch: bool) -> ModelPrice:
    cached = ov.input if ov.cached_input is None else ov.cached_input
    factor = Decimal(1) - _dec(ov.batch_discount) if batch else Decimal(1)
    source = OVERRIDE_SOURCE
    if batch:
        source += f" (batch discount {ov.batch_discount:g})"
    return ModelPrice(
        model=model,
        input_per_mtok=float(_dec(ov.input) * factor),
        cached_input_per_mtok=float(_dec(cached) * factor),
        output_per_mtok=float(_dec(ov.output) * factor),
        source=source,
        batch=batch,
        cache_write_per_mtok=None
        if ov.cache_write is None
        else float(_dec(ov.cache_write) * factor),
        cache_write_1h_per_mtok=(
            None if ov.cache_write_1h is None else float(_dec(ov.cache_write_1h) * factor)
        ),
    )


def price_for(
    model: str,
    *,
    batch: bool,
    overrides: Mapping[str, PriceOverride] | None = None,
    when: datetime | None = None,
) -> ModelPrice | None:
    """The price of `model` in batch or synchronous mode on date `when` (default: now, UTC;
    naive datetimes are UTC). None when no price is known (an UnknownPriceWarning is issued once
    per model per process)."""
    ov = _find_override(model, overrides)
    if ov is not None:
        return _price_from_override(model, ov, batch)
    if when is None:
        # minute resolution keeps the cache useful when every row asks for its price
        when = datetime.now(UTC).replace(second=0, microsecond=0)
    elif when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    price = _library_price(model, batch, when)
    if price is None:
        _warn_unknown(model)
    return price


def _lookup_candidates(model: str) -> list[tuple[str, str | None]]:
    """(model ref, provider id) pairs to try, most specific first."""
    names = [model]
    prefix: str | None = None
    if "/" in model:  # "openai/gpt-4o-mini" (LiteLLM / OpenRouter style)
        prefix, rest = model.split("/", 1)
        names.append(rest)
    for name in list(names):
        stripped = _DATE_SUFFIX.sub("", name)
        if stripped != name:  # the library knows most snapshots; this catches newer ones
            names.append(stripped)
    out: list[tuple[str, str | None]] = []
    for name in names:
        providers: list[str | None] = ["openai", None]
        if prefix is not None and name != model:
            providers.insert(0, prefix)
        out += [(name, p) for p in providers]
    return out


def _find_library_model(model: str) -> tuple[Provider, ModelInfo] | None:
    from genai_prices import data_snapshot

    snapshot = data_snapshot.get_snapshot()
    for ref, provider_id in _lookup_candidates(model):
        try:
            return snapshot.find_provider_model(ref, None, provider_id, None)
        except LookupError:
            continue
    return None


def _batch_variant_in_force(info: ModelInfo, when: datetime) -> bool:
    """Whether the library has a batch price for this model on this date. Checked separately
    from the prices themselves: a batch variant may list no change ("same as standard")."""
    for variant in info.price_variants or ():
        if variant.constraint is not None and not variant.constraint.active(when):
            continue
        if all(_BATCH_CONTEXT.get(k) == v for k, v in variant.when.items()):
            return True
    return False


def _rate(value: Any) -> tuple[Decimal | None, list[tuple[int, Decimal]]]:
    """(base, [(tier start, price)]) of a genai-prices price value (Decimal or TieredPrices)."""
    if value is None:
        return None, []
    if isinstance(value, Decimal):
        return value, []
    return value.base, [(t.start, t.price) for t in value.tiers]


@functools.lru_cache(maxsize=4096)
def _library_price(model: str, batch: bool, when: datetime) -> ModelPrice | None:
    import genai_prices

    found = _find_library_model(model)
    if found is None:
        return None
    provider, info = found
    has_batch = batch and _batch_variant_in_force(info, when)
    prices = info.get_prices(when, _BATCH_CONTEXT if has_batch else None)
    inp, inp_tiers = _rate(getattr(prices, "input_mtok", None))
    if inp is None:  # priced per request / image / second only: no token price to use
        return None
    cached, cached_tiers = _rate(getattr(prices, "cache_read_mtok", None))
    if cached is None:  # no cache discount listed: cached tokens bill at the input rate
        cached, cached_tiers = inp, inp_tiers
    w5, w5_tiers = _rate(getattr(prices, "cache_write_mtok", None))
    w1h, w1h_tiers = _rate(getattr(prices, "cache_write_1h_mtok", None))
    if w1h is None:  # one listed write rate covers both cache lifetimes
        w1h, w1h_tiers = w5, w5_tiers
    out, out_tiers = _rate(getattr(prices, "output_mtok", None))
    if out is None:  # e.g. embeddings: no output tokens
        out, out_tiers = Decimal(0), []

    factor = Decimal(1)
    detail = f"{provider.id}:{info.id}"
    if batch and has_batch:
        detail += ", batch price"
    elif batch:
        factor = Decimal(1) - _dec(BATCH_FALLBACK_DISCOUNT)
        detail += (
            f"; batch = {float(factor) * 100:g}% of the sync price: the library has no batch price "
            f"for this model on {when.date().isoformat()}"
        )

    def at(base: Decimal, tiers: list[tuple[int, Decimal]], start: int) -> float:
        price = base
        for t_start, t_price in tiers:  # ascending; the last one at or below `start` applies
            if t_start <= start:
                price = t_price
        return float(price * factor)

    def at_or_none(
        base: Decimal | None, tiers: list[tuple[int, Decimal]], start: int
    ) -> float | None:
        return None if base is None else at(base, tiers, start)

    starts = sorted({s for s, _ in inp_tiers + cached_tiers + out_tiers + w5_tiers + w1h_tiers})
    tiers = tuple(
        PriceTier(
            s,
            at(inp, inp_tiers, s),
            at(cached, cached_tiers, s),
            at(out, out_tiers, s),
            at_or_none(w5, w5_tiers, s),
            at_or_none(w1h, w1h_tiers, s),
        )
        for s in starts
    )
    return ModelPrice(
        model=model,
        input_per_mtok=float(inp * factor),
        cached_input_per_mtok=float(cached * factor),
        output_per_mtok=float(out * factor),
        source=f"genai-prices {genai_prices.__version__} ({detail})",
        batch=batch,
        tiers=tiers,
        cache_write_per_mtok=None if w5 is None else float(w5 * factor),
        cache_write_1h_per_mtok=None if w1h is None else float(w1h * factor),
    )


def cost_of(usage: Usage, price: ModelPrice, *, per_request: bool = True) -> float:
    """USD cost of `usage`: uncached prompt × input + cached × cached_input + cache writes × their
    rate (input where none is known) + completion × output.

    `completion_tokens` already includes reasoning tokens (OpenAI reports reasoning inside
    completion/output tokens), so `usage.reasoning_tokens` is NOT added again. Computed in
    Decimal, so sums of per-row costs are exact to float precision.

    `per_request=True` (default): `usage` is one request, and long-context tiers apply when its
    prompt exceeds a tier's threshold. Pass False for usage summed over many requests (tiers are
    per request, so a sum must not trigger them): base rates are used.
    """
    prompt = max(int(usage.prompt_tokens), 0)
    cached = min(max(int(usage.cached_tokens), 0), prompt)  # cached ⊆ prompt tokens
    w5 = min(max(int(usage.cache_write_tokens), 0), prompt - cached)  # writes ⊆ prompt too
    w1h = min(max(int(usage.cache_write_1h_tokens), 0), prompt - cached - w5)
    completion = max(int(usage.completion_tokens), 0)
    size = prompt if per_request else 0  # summed usage must not trigger per-request tiers
    inp, cin, out = price.rates_for(size)
    cw5, cw1h = price.write_rates_for(size)
    total = (
        Decimal(prompt - cached - w5 - w1h) * _dec(inp)
        + Decimal(cached) * _dec(cin)
        + Decimal(w5) * _dec(cw5)
        + Decimal(w1h) * _dec(cw1h)
        + Decimal(completion) * _dec(out)
    ) / _MTOK
    return float(total)


def cost_or_none(
    usage: Usage,
    model: str,
    *,
    batch: bool,
    overrides: Mapping[str, PriceOverride] | None = None,
    when: datetime | None = None,
) -> float | None:
    """Cost of one request's usage, or None when the model's price is unknown (never 0)."""
    price = price_for(model, batch=batch, overrides=overrides, when=when)
    return None if price is None else cost_of(usage, price)


def estimate_cost(
    model: str,
    prompt_tokens: int,
    completion_tokens: int,
    *,
    batch: bool,
    overrides: Mapping[str, PriceOverride] | None = None,
    when: datetime | None = None,
) -> float | None:
    """Estimated USD cost before submitting, or None when the price is unknown.

    The token counts may be totals over many requests, so base rates are used (no cache hits,
    no long-context tiers)."""
    price = price_for(model, batch=batch, overrides=overrides, when=when)
    if price is None:
        return None
    return cost_of(Usage(prompt_tokens, 0, completion_tokens), price, per_request=False)


# --------------------------------------------------------------------------------------------
# Text token estimate (offline, no tiktoken)
# --------------------------------------------------------------------------------------------
#
# tokens ≈ round( Σ weight_i × (number of matches of pattern_i) / 100 )
#
# The patterns mimic the o200k_base pre-tokeniser (GPT-4o and later): a word is a run of
# letters (≈ 1 token, long words more), 1–3 digits are one token, a run of punctuation is one
# token and absorbs a following newline, a single space is absorbed by the next word, CJK
# characters cost ≈ 0.65 tokens each. Weights are in hundredths of a token and were fitted
# against real o200k_base counts (docs/pricing.md has the measured error per kind of text).
#
# Only explicit character ranges are used (no \w, \s, \p{..}): Python's `re` and the Rust regex
# engine behind polars then agree match for match, so the scalar and the polars versions give
# identical numbers.
_LAT_X = r"\u00aa\u00b5\u00ba\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u02af\u0300-\u036f\u1e00-\u1eff"
_OTHER_SCRIPTS = (  # Greek, Cyrillic, Armenian, Hebrew, Arabic, Indic, Thai/Lao
    r"\u0370-\u03ff\u0400-\u052f\u0531-\u0587\u05d0-\u05ea\u0620-\u064a\u0900-\u0dff"
    r"\u0e00-\u0e7f\u1f00-\u1fff"
)
_CJK = (  # Hangul Jamo, kana, Hangul compatibility, CJK ideographs, Hangul syllables
    r"\u1100-\u11ff\u3040-\u309f\u30a0-\u30ff\u3130-\u318f\u3400-\u4dbf\u4e00-\u9fff"
    r"\uac00-\ud7af\uf900-\ufaff"
)
_LETTER = "A-Za-z" + _LAT_X + _OTHER_SCRIPTS
_SPACE = r" \t\r\n\x0b\x0c\u00a0\u3000"
_PUNCT = rf"[^{_SPACE}{_LETTER}{_CJK}0-9]"  # anything else: punctuation, symbols, emoji

# (pattern, weight in 1/100 token)
TEXT_TOKEN_FEATURES: tuple[tuple[str, int], ...] = (
    (rf"[{_LETTER}]+", 100),  # a word
    (rf"[{_LETTER}]{{7}}", 10),  # long words: +0.1 per 7 letters
    (rf"[{_LETTER}]{{11}}", 100),  # very long words: +1 per 11 letters
    (rf"[{_LAT_X}]", 25),  # accented Latin letters split words more often
    (rf"[{_OTHER_SCRIPTS}]", 5),  # Cyrillic, Greek, … letters
    (rf"[{_CJK}]+", 10),  # a CJK run
    (rf"[{_CJK}]", 65),  # each CJK character
    (r"[0-9]{1,3}", 100),  # numbers are split into groups of up to 3 digits
    (rf"{_PUNCT}+", 100),  # a run of punctuation
    (rf"{_PUNCT}{{3}}", 20),  # long punctuation runs
    (rf"[^\x00-\x7f{_SPACE}{_LETTER}{_CJK}]", 60),  # non-ASCII symbols and emoji
    (r"[\r\n]+", 100),  # a line break
    (rf"{_PUNCT}[\r\n]", -100),  # … absorbed by the punctuation before it
    (r"[ \t\x0b\x0c\u00a0\u3000]{2,}", 100),  # a run of 2+ spaces (indentation)
    (r" [0-9]", 100),  # a space before a number is a token of its own
    # a single punctuation mark glued to the word after it ("a.b", "x(y") costs ~0.2, not 1
    (rf"{_PUNCT}[{_LETTER}]", -80),
    (rf" {_PUNCT}[{_LETTER}]", 80),  # … but not after a space (" (word" is " (" + "word")
    (rf"{_PUNCT}{{2,}}[{_LETTER}]", 80),  # … nor at the end of a longer run
)


@functools.cache
def _text_features() -> tuple[tuple[re.Pattern[str], int], ...]:
    # compiled on first use, not at import (~30 ms of every command, a dry run's included)
    return tuple((re.compile(p), w) for p, w in TEXT_TOKEN_FEATURES)


def estimate_text_tokens(text: str) -> int:
    """Offline estimate of the o200k_base token count of `text` (no message overhead)."""
    if not text:
        return 0
    total = 0
    for rx, weight in _text_features():
        total += weight * len(rx.findall(text))
    return max(0, (total + 50) // 100)  # round half up, in integers: same as the polars twin


def estimate_text_tokens_series(s: pl.Series) -> pl.Series:
    """`estimate_text_tokens` for every value of a polars string Series (null → 0), vectorised:
    the same regex counts and integer arithmetic, so the numbers are identical. One column per
    pattern in a single `select`, so polars counts them in parallel."""
    import polars as pl

    frame = pl.DataFrame({"text": s.cast(pl.String)})
    total = frame.select(_weighted_sum().alias(s.name)).to_series()
    return ((total + 50) // 100).clip(lower_bound=0)


@functools.cache
def _weighted_sum() -> pl.Expr:
    # Built once: making the 18 expressions cost ~0.5 ms a call, a frame of a large build each.
    import polars as pl

    return pl.sum_horizontal(
        pl.col("text").str.count_matches(pattern).cast(pl.Int64).fill_null(0) * weight
        for pattern, weight in TEXT_TOKEN_FEATURES
    )


# Above this many rows a frame is estimated from a sample: the regex counts cost ~5 µs a row,
# the byte count almost nothing, and chunk totals (what limits and budgets use) stay accurate.
SAMPLE_ABOVE_ROWS = 4096
SAMPLE_ROWS = 512


def estimate_text_tokens_fast(s: pl.Series) -> pl.Series:
    """Per-row estimates for large frames: exact on an evenly spaced sample, elsewhere the
    row's UTF-8 bytes × the sample's tokens-per-byte ratio. Identical to
    `estimate_text_tokens_series` for frames of at most SAMPLE_ABOVE_ROWS rows."""
    import polars as pl

    if len(s) <= SAMPLE_ABOVE_ROWS:
        return estimate_text_tokens_series(s)
    text = s.cast(pl.String)
    sample = text.gather_every(len(text) // SAMPLE_ROWS)
    sample_bytes = int(sample.str.len_bytes().fill_null(0).sum())
    ratio = int(estimate_text_tokens_series(sample).sum()) / max(1, sample_bytes)
    est = (text.str.len_bytes().fill_null(0).cast(pl.Float64) * ratio).round(0).cast(pl.Int64)
    return est.alias(s.name)


# --------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------

# Tile formula (gpt-4o class): (base tokens, tokens per 512-px tile). `low` = base tokens only.
# Sources: OpenAI vision guide "Calculating costs"; gpt-4o-mini's 2833/5667 (≈ 33× gpt-4o's, so
# the same dollars per image at its 1/16.7 price) is also what the API is observed to bill.
_TILE_MODELS: dict[str, tuple[int, int]] = {
    "gpt-4o-mini": (2833, 5667),
    "gpt-4o": (85, 170),
    "gpt-4.1": (85, 170),
    "gpt-4.5": (85, 170),
    "gpt-4-turbo": (85, 170),
    "chatgpt-4o": (85, 170),
    "gpt-5": (70, 140),
    "gpt-5-chat": (70, 140),
    "o1": (75, 150),
    "o3": (75, 150),
    "computer-use": (65, 129),
}
# Patch formula: 32-px patches, at most 1536 (the image is scaled down to fit), × a multiplier;
# `detail` has no effect. Multipliers as documented; OpenAI's own price calculator and
# community measurements show 1.2 / 1.5 for gpt-5-mini / gpt-5-nano, so these overestimate.
_PATCH_MODELS: dict[str, float] = {
    "gpt-4.1-mini": 1.62,
    "gpt-4.1-nano": 2.46,
    "o4-mini": 1.72,
    "codex-mini": 1.72,
    "gpt-5-mini": 1.62,
    "gpt-5-nano": 2.46,
}
_DEFAULT_TILE = (85, 170)  # unknown models: the classic gpt-4o formula
_MAX_PATCHES = 1536
# Size assumed for an image whose size cannot be read (a remote URL, a file id): 1024×1024
# (765 tokens on gpt-4o; the price of any square image under the tile formula).
DEFAULT_IMAGE_SIZE = (1024, 1024)


def _image_formula(model: str | None) -> tuple[str, Any]:
    if not model:
        return "tile", _DEFAULT_TILE
    name = model.lower().split("/")[-1]
    best: tuple[int, str, Any] = (0, "tile", _DEFAULT_TILE)
    for table, kind in ((_PATCH_MODELS, "patch"), (_TILE_MODELS, "tile")):
        for prefix, params in table.items():
            # longest matching prefix wins: gpt-4o-mini before gpt-4o, gpt-5-mini before gpt-5
            if (name == prefix or name.startswith(prefix + "-")) and len(prefix) > best[0]:
                best = (len(prefix), kind, params)
    return best[1], best[2]


def _patch_count(width: int, height: int) -> int:
    patches = math.ceil(width / 32) * math.ceil(height / 32)
    if patches <= _MAX_PATCHES:
        return patches
    # scale down to fit 1536 patches, then shrink so that a whole number of patches spans a side
    r = math.sqrt(32 * 32 * _MAX_PATCHES / (width * height))
    r *= min(
        math.floor(width * r / 32) / (width * r / 32),
        math.floor(height * r / 32) / (height * r / 32),
    )
    return min(_MAX_PATCHES, math.ceil(width * r / 32) * math.ceil(height * r / 32))


def image_tokens(width: int, height: int, detail: str = "auto", model: str | None = None) -> int:
    """Prompt tokens billed for one image input.

    Tile formula (gpt-4o class, also used for unknown models): `low` = base (85); `high`/`auto`:
    scale to fit within 2048×2048, then scale the shortest side down to 768 (never up), then
    base + per-tile × number of 512-px tiles (1024×1024 → 765). gpt-4o-mini uses the same formula
    with base 2833 / tile 5667. Patch models (gpt-4.1-mini/nano, o4-mini, gpt-5-mini/nano): 32-px
    patches capped at 1536, times a model multiplier, whatever the detail.
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}×{height}")
    kind, params = _image_formula(model)
    if kind == "patch":
        return int(math.ceil(_patch_count(width, height) * params))
    base, per_tile = params
    if detail == "low":
        return int(base)
    w, h = float(width), float(height)
    if max(w, h) > 2048:
        scale = 2048 / max(w, h)
        w, h = w * scale, h * scale
    if min(w, h) > 768:
        scale = 768 / min(w, h)
        w, h = w * scale, h * scale
    tiles = math.ceil(w / 512) * math.ceil(h / 512)
    return int(base + per_tile * tiles)


_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    i = 2
    n = len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0x01, 0xD8) or 0xD0 <= marker <= 0xD7:  # markers without a length
            i += 2
            continue
        if marker in (0xD9, 0xDA):  # end of image / start of scan before any frame header
            return None
        (length,) = struct.unpack(">H", data[i + 2 : i + 4])
        if marker in _JPEG_SOF:
            if i + 9 > n:
                return None
            h, w = struct.unpack(">HH", data[i + 5 : i + 9])
            return (w, h) if w and h else None
        i += 2 + length
    return None


def _webp_size(data: bytes) -> tuple[int, int] | None:
    chunk = data[12:16]
    if chunk == b"VP8X" and len(data) >= 30:
        w = int.from_bytes(data[24:27], "little") + 1
        h = int.from_bytes(data[27:30], "little") + 1
        return w, h
    if chunk == b"VP8 " and len(data) >= 30 and data[23:26] == b"\x9d\x01\x2a":
        w, h = struct.unpack("<HH", data[26:30])
        return w & 0x3FFF, h & 0x3FFF
    if chunk == b"VP8L" and len(data) >= 25 and data[20] == 0x2F:
        bits = int.from_bytes(data[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    return None


def image_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a PNG, JPEG, GIF or WEBP header, without decoding the image;
    None when the bytes are none of these (or are cut before the size)."""
    try:
        if data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR" and len(data) >= 24:
            w, h = struct.unpack(">II", data[16:24])
            return (w, h) if w and h else None
        if data[:6] in (b"GIF87a", b"GIF89a") and len(data) >= 10:
            w, h = struct.unpack("<HH", data[6:10])
            return (w, h) if w and h else None
        if data[:3] == b"\xff\xd8\xff":
            return _jpeg_size(data)
        if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
            return _webp_size(data)
    except struct.error:
        return None
    return None


def data_url_image_size(url: str) -> tuple[int, int] | None:
    """Size of the image in a base64 `data:` URL, decoding only as much as the header needs."""
    if not url.startswith("data:"):
        return None
    head, sep, payload = url.partition(",")
    if not sep or not head.endswith(";base64"):
        return None
    # PNG/GIF/WEBP sizes sit in the first 30 bytes; a JPEG's frame header can follow large EXIF
    # blocks, so widen the window before decoding everything
    for n_chars in (4096, 262_144, len(payload)):
        chunk = payload[: n_chars - n_chars % 4] if n_chars < len(payload) else payload
        try:
            size = image_size(base64.b64decode(chunk))
        except (binascii.Error, ValueError):
            return None
        if size is not None or n_chars >= len(payload):
            return size
    return None


# --------------------------------------------------------------------------------------------
# Request bodies
# --------------------------------------------------------------------------------------------

# Chat formatting overhead (OpenAI cookbook "How to count tokens", gpt-4o / gpt-4 family):
TOKENS_PER_MESSAGE = 3  # <|start|>{role}<|message|>…<|end|> around every message
TOKENS_PER_NAME = 1  # a message's optional "name"
REPLY_PRIMING_TOKENS = 3  # every reply is primed with <|start|>assistant<|message|>


def _image_part_tokens(url: str | None, detail: str, model: str | None) -> int:
    size = data_url_image_size(url) if url else None
    width, height = size or DEFAULT_IMAGE_SIZE
    return image_tokens(width, height, detail or "auto", model)


def _content_tokens(content: Any, model: str | None) -> int:
    if content is None:
        return 0
    if isinstance(content, str):
        return estimate_text_tokens(content)
    if isinstance(content, dict):
        content = [content]
    total = 0
    for part in content:
        if isinstance(part, str):
            total += estimate_text_tokens(part)
            continue
        if not isinstance(part, dict):
            continue
        kind = part.get("type")
        if kind in ("image_url", "input_image"):
            image = part.get("image_url")
            detail = part.get("detail", "auto")
            if isinstance(image, dict):  # chat: {"url": ..., "detail": ...}
                detail = image.get("detail", detail)
                image = image.get("url")
            total += _image_part_tokens(image, detail, model)
        elif isinstance(part.get("text"), str):  # text / input_text / output_text / refusal
            total += estimate_text_tokens(part["text"])
    return total


def _message_tokens(message: Mapping[str, Any], model: str | None) -> int:
    total = TOKENS_PER_MESSAGE
    for key, value in message.items():
        if key == "content":
            total += _content_tokens(value, model)
        elif key == "name" and isinstance(value, str):
            total += estimate_text_tokens(value) + TOKENS_PER_NAME
        elif key in ("role", "tool_call_id") and isinstance(value, str):
            total += estimate_text_tokens(value)
        elif key in ("tool_calls", "function_call") and value:
            total += estimate_text_tokens(json.dumps(value, ensure_ascii=False))
    return total


def _embedding_input_tokens(value: Any) -> int:
    if isinstance(value, str):
        return estimate_text_tokens(value)
    if isinstance(value, list):
        if all(isinstance(v, int) for v in value):  # already tokens
            return len(value)
        return sum(_embedding_input_tokens(v) for v in value)
    return 0


def _endpoint_kind(body: Mapping[str, Any], endpoint: str | None) -> str:
    if endpoint:
        for kind in ("chat/completions", "responses", "embeddings", "completions"):
            if endpoint.rstrip("/").endswith(kind):
                return kind
    if "messages" in body:
        return "chat/completions"
    if "input" in body:
        inp, model = body["input"], body.get("model")
        if isinstance(inp, list) and any(isinstance(i, Mapping) for i in inp):
            return "responses"  # a list of message items
        if isinstance(inp, list) and inp and all(isinstance(i, int | list) for i in inp):
            return "embeddings"  # token arrays
        if (isinstance(model, str) and "embed" in model.lower()) or (
            {"dimensions", "encoding_format"} & set(body)
        ):
            return "embeddings"
        return "responses"  # ambiguous (plain text input): pass `endpoint` to be sure
    if "prompt" in body:
        return "completions"
    return "responses" if "instructions" in body else "chat/completions"


def estimate_request_tokens(body: Mapping[str, Any], endpoint: str | None = None) -> int:
    """Estimated prompt tokens of one request body, for the endpoint it is sent to (guessed from
    the body when `endpoint` is None): chat completions (`messages`), responses (`input`,
    `instructions`), embeddings (`input` only, no formatting overhead) or legacy completions
    (`prompt`). Includes the per-message overhead and data-URL images (an image whose size
    cannot be read counts as DEFAULT_IMAGE_SIZE). Tool definitions and a JSON-schema response
    format are counted as their JSON text, an approximation."""
    model = body.get("model") if isinstance(body.get("model"), str) else None
    kind = _endpoint_kind(body, endpoint)
    if kind == "embeddings":
        return _embedding_input_tokens(body.get("input"))
    if kind == "completions":
        return _embedding_input_tokens(body.get("prompt"))

    total = 0
    if kind == "chat/completions":
        for message in body.get("messages") or ():
            if isinstance(message, Mapping):
                total += _message_tokens(message, model)
    else:  # responses
        if isinstance(body.get("instructions"), str):  # counted like a system message
            total += _message_tokens({"role": "system", "content": body["instructions"]}, model)
        items = body.get("input")
        if isinstance(items, str):
            items = [{"role": "user", "content": items}]
        for item in items or ():
            if not isinstance(item, Mapping):
                continue
            if "content" in item or "role" in item:
                total += _message_tokens(item, model)
            else:  # function_call_output and other non-message items: their JSON text
                total += estimate_text_tokens(json.dumps(item, ensure_ascii=False))
    total += REPLY_PRIMING_TOKENS

    for key in ("tools", "functions"):
        if body.get(key):
            total += estimate_text_tokens(json.dumps(body[key], ensure_ascii=False))
    fmt = body.get("response_format")  # chat; the Responses API nests it under text.format
    if not isinstance(fmt, Mapping) and isinstance(body.get("text"), Mapping):
        fmt = body["text"].get("format")
    if isinstance(fmt, Mapping) and fmt.get("type") == "json_schema":
        schema = fmt.get("json_schema", fmt.get("schema"))
        total += estimate_text_tokens(json.dumps(schema, ensure_ascii=False))
    return total


def sum_costs(costs: Iterable[float | None]) -> float | None:
    """Sum of per-row costs; None if any of them is unknown (an unknown never becomes 0)."""
    total = Decimal(0)
    for c in costs:
        if c is None:
            return None
        total += _dec(c)
    return float(total)
