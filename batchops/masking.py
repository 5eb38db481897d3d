"""The one way secrets are hidden: a key shown as `sk-…abcd`, and any text scrubbed of keys.

Used by the pool (error messages from providers), the log sinks and the CLI's error line; the
emulator masks the keys it echoes the same way.
"""

from __future__ import annotations

import re

# Anything shaped like an OpenAI-style key, even one batchops was not given (a pasted example).
KEY_RE = re.compile(r"sk-[A-Za-z0-9_\-]{8,}")
# Shorter values are no secret (a local server's "EMPTY") and masking them would garble text.
MIN_SECRET = 8


def mask_key(key: str | None) -> str:
    """`sk-…abcd`: enough to tell keys apart in a log, never enough to use one."""
    if not key:
        return "<none>"
    if len(key) <= 8:
        return "…" + key[-2:]
    return f"{key[:3]}…{key[-4:]}"


def mask_secrets(text: str, secrets: list[str]) -> str:
    """`text` with each of these keys, and anything shaped like a key, masked."""
    for s in secrets:
        if len(s) >= MIN_SECRET and s in text:
            text = text.replace(s, mask_key(s))
    return KEY_RE.sub(lambda m: mask_key(m.group(0)), text)
