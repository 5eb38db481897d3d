"""Object ids in the real API's shapes (`file-…`, `batch_…`, `req_…`), never reused."""

from __future__ import annotations

import itertools
import secrets
import string

_B62 = string.digits + string.ascii_letters
_ID_BASE = secrets.token_hex(6)  # random per process, so ids never repeat across restarts
_id_seq = itertools.count(secrets.randbelow(1 << 44))  # random start: ids look less artificial


def new_id(prefix: str, n: int = 22) -> str:
    """`prefix` + n random base62 characters, like `file-2qvouj6sKUCGTbu3odouhk`."""
    return prefix + "".join(secrets.choice(_B62) for _ in range(n))


def hex_id(prefix: str) -> str:
    """`prefix` + 24 hex digits; cheap (a counter), as 50,000-line batches need 100,000 ids."""
    return f"{prefix}{_ID_BASE}{next(_id_seq):012x}"
