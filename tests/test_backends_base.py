"""`batchops.backends.base`: what a failed call says about the remote side.

A call whose connection was never opened cannot have been carried out (`unsent`), so the
engine needs no lookup before trying again; a call that reached a server stays ambiguous."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import pytest

from batchops.backends import make_backend
from batchops.backends.base import RemoteError
from batchops.spec import ModelEntry, RetryPolicy

FAST = RetryPolicy(initial_delay=0.001, max_delay=0.001)
MODELS = {"openai": "gpt-4o-mini", "anthropic": "claude-sonnet-4-5", "gemini": "gemini-2.5-flash"}
KEYS = {"openai": "sk-test-0000", "anthropic": "sk-ant-test-0000", "gemini": "gk-test-0000abcd"}


def closed_port() -> int:
    """A port nothing listens on: bound by us, then released."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def hangs_up() -> Iterator[str]:
    """A server that accepts every connection and closes it at once: the request was sent."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(16)

    def serve() -> None:
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            conn.recv(65536)
            conn.close()

    threading.Thread(target=serve, daemon=True).start()
    yield f"http://127.0.0.1:{srv.getsockname()[1]}/v1"
    srv.close()


def call_error(provider: str, base_url: str) -> RemoteError:
    entry = ModelEntry(name=MODELS[provider], provider=provider, base_url=base_url)
    backend = make_backend(entry, KEYS[provider], None, policy=FAST)
    with pytest.raises(RemoteError) as caught:
        backend.cancel("batch_1")  # a plain call (a failed poll is only logged)
    return caught.value


@pytest.mark.parametrize("provider", sorted(MODELS))
def test_a_server_nobody_listens_on_gives_an_unsent_error(provider: str):
    err = call_error(provider, f"http://127.0.0.1:{closed_port()}/v1")
    assert err.unsent and err.nothing_created and not err.refused
    assert err.cls == "api_error" and err.status is None
    assert "could not connect" in err.message


@pytest.mark.parametrize("provider", sorted(MODELS))
def test_a_connection_closed_after_the_request_stays_ambiguous(provider: str, hangs_up: str):
    err = call_error(provider, hangs_up)
    assert not err.unsent and not err.nothing_created
    assert err.status is None
