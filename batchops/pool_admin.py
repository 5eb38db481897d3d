"""`batchops pool status|reset`: the remembered pool of a run, read and changed offline.

Every invocation of a run saves which (model, key) pairs it found exhausted (key fingerprints
and masked labels, never keys); later invocations skip them until they are reset here or the
`exhausted_cooldown` has passed. Nothing here calls a provider.
"""

from __future__ import annotations

import json
import time
from typing import Any

from batchops.errors import InputError
from batchops.rundir import RunDir

META = "pool_exhausted"


def pool_status(run: RunDir) -> list[dict[str, Any]]:
    """Every (model, key) pair the run has used or exhausted: state, reason, since, calls,
    tokens, cost, failures. Pairs never used and never exhausted show as available."""
    saved = {(e["model"], e["key_id"]): e for e in _saved(run)}
    usage = run.store.usage_by_pair()
    cooldown = run.spec.cooldown_seconds()
    labels = json.loads(run.store.get_meta("pool_keys") or "{}")
    labels.update({e["key_id"]: e["key"] for e in saved.values()})
    pairs = list(dict.fromkeys([*saved, *(p for p in usage if p[0])]))
    now = time.time()
    out = []
    for model, key_id in pairs:
        e = saved.get((model, key_id))
        u = usage.get((model, key_id), {})
        expired = e is not None and cooldown is not None and now - float(e["since"]) >= cooldown
        out.append(
            {
                "model": model,
                "key": labels.get(key_id, "?" if key_id else "-"),
                "state": "available" if e is None or expired else "exhausted",
                "reason": e["reason"] if e else "",
                "since": e["since"] if e else None,
                "calls": u.get("calls", 0),
                "failures": u.get("failures", 0),
                "tokens": u.get("tokens", 0),
                "cost_usd": u.get("cost_usd"),
            }
        )
    return out


def pool_reset(run: RunDir, model: str | None = None, key: str | None = None) -> int:
    """Forget exhausted pairs (all, or those of a model and/or a key given by its masked label
    or its last four characters); returns how many. The next invocation tries them again."""
    saved = _saved(run)
    if model is not None and model not in {e["model"] for e in saved} | set(run.spec.model_names):
        raise InputError(f"pool reset: model {model!r} is not in this run's pool")

    def chosen(e: dict[str, Any]) -> bool:
        return (model is None or e["model"] == model) and (
            key is None or e["key"] == key or e["key"].endswith(key.lstrip("…."))
        )

    keep = [e for e in saved if not chosen(e)]
    run.store.set_meta(META, json.dumps(keep))
    n = len(saved) - len(keep)
    run.store.event("pool", f"pool reset: {n} exhausted pair(s) forgotten")
    return n


def _saved(run: RunDir) -> list[dict[str, Any]]:
    data = json.loads(run.store.get_meta(META) or "[]")
    return data if isinstance(data, list) else []


def forget_exhausted_before(run: RunDir, before: float) -> int:
    """Forget pairs exhausted before this time (the monitor's cooldown); returns how many."""
    saved = _saved(run)
    keep = [e for e in saved if float(e["since"]) >= before]
    if len(keep) != len(saved):
        run.store.set_meta(META, json.dumps(keep))
        run.store.event("pool", f"{len(saved) - len(keep)} exhausted pair(s) past the cooldown")
    return len(saved) - len(keep)
