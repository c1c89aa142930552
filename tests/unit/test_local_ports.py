"""Free ports for local servers come from below the kernel's ephemeral range."""

from __future__ import annotations

import socket

import pytest

from spotrun.local import ports
from spotrun.local.ports import candidates, ephemeral_range, free_port

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("ephemeral", "expected"),
    [
        ((32768, 60999), range(ports.LOWEST, ports.HIGHEST + 1)),  # Linux's default
        ((20000, 60999), range(ports.LOWEST, 20000)),
        ((1024, 25000), range(25001, ports.HIGHEST + 1)),
        ((1024, 65535), range(0)),
        ((16000, 17000), range(ports.LOWEST, 16000)),
    ],
)
def test_the_candidates_never_overlap_the_ephemeral_range(
    ephemeral: tuple[int, int], expected: range
) -> None:
    pool = candidates(ephemeral)
    assert pool == expected
    low, high = ephemeral
    assert not any(low <= port <= high for port in pool)


def test_a_free_port_is_outside_the_ephemeral_range_and_bindable() -> None:
    low, high = ephemeral_range()
    for _ in range(20):
        port = free_port()
        if candidates((low, high)):
            assert not low <= port <= high
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))


def test_a_port_already_bound_is_not_handed_out(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        busy = taken.getsockname()[1]
        taken.listen()
        monkeypatch.setattr(ports, "candidates", lambda _: range(busy, busy + 1))
        port = free_port()
    assert port != busy  # the one candidate was taken: the kernel chose instead
