"""A full-size batch (50,000 requests) finishes in about its configured time.

Measured on the 2-core dev machine, default timings (0.5 + 2.0 + 0.2 = 2.7 s), create → completed:
≈ 2.7–3.1 s with the emulator in its own process (`serve`) on a quiet machine; in the test
process (client polling every 50 ms) ≈ 2.8–3.4 s quiet and up to ≈ 4.5–5.4 s while other test
runs saturate both cores (6.4 s at load 4). The bounds only catch pathologies (e.g. quadratic
work, a runner that blocks the loop).
"""

from __future__ import annotations

import time

import openai
import orjson
import pytest

from batchops.emulator import EmulatorServer, Scenario
from batchops.emulator.testing import DEFAULT_KEY, TERMINAL

N = 50_000
SYSTEM = "You are a careful classifier of customer reviews."
REVIEW = (
    "The product arrived on time, the packaging was fine, but the battery life is "
    "disappointing compared to the description."
)


def _big_file() -> bytes:
    return b"".join(
        orjson.dumps(
            {
                "custom_id": f"row-{i}",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": {
                    "model": "gpt-4o-mini",
                    "max_tokens": 200,
                    "messages": [
                        {"role": "system", "content": SYSTEM},
                        {"role": "user", "content": f"Classify review {i}: {REVIEW}"},
                    ],
                },
            }
        )
        + b"\n"
        for i in range(N)
    )


@pytest.mark.slow
def test_50k_request_batch_finishes_in_configured_time() -> None:
    sc = Scenario()  # validating 0.5 s, in_progress 2.0 s, finalizing 0.2 s
    configured = sc.validating_seconds + sc.in_progress_seconds + sc.finalizing_seconds
    data = _big_file()
    with EmulatorServer(scenario=sc) as emu:
        client = openai.OpenAI(base_url=emu.base_url, api_key=DEFAULT_KEY, max_retries=0)
        f = client.files.create(file=("big.jsonl", data), purpose="batch")
        start = time.monotonic()
        b = client.batches.create(
            input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        slowest_poll = 0.0
        while b.status not in TERMINAL:
            time.sleep(0.05)
            t = time.monotonic()
            b = client.batches.retrieve(b.id)
            slowest_poll = max(slowest_poll, time.monotonic() - t)
        elapsed = time.monotonic() - start
        assert b.status == "completed"
        assert b.request_counts.completed == N and b.request_counts.failed == 0
        content = client.files.content(b.output_file_id).content
        assert content.count(b"\n") == N
    print(
        f"\n50k batch: {elapsed:.2f} s (configured {configured:.1f} s), slowest poll {slowest_poll:.3f} s"
    )
    # Loose bounds: a loaded CI machine (load 4 on 2 cores) measured 6.4 s / 0.4 s.
    assert elapsed < 4 * configured
    assert slowest_poll < 1.5
