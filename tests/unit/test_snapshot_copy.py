"""The snapshot copy: large tensors split into pieces copied on several threads, same bytes."""

from __future__ import annotations

import pytest
import torch

from spotrun.train import writer


@pytest.fixture
def small_pieces(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(writer, "_COPY_PIECE_BYTES", 4096)


@pytest.mark.parametrize(
    "src",
    [
        torch.arange(10_000, dtype=torch.float32),  # split into 10 pieces
        torch.arange(30_000, dtype=torch.int64).reshape(100, 300),  # split, 2-D
        torch.arange(30_000, dtype=torch.float64).reshape(300, 100).t(),  # not contiguous
        torch.tensor(3.5),  # 0-dim
        torch.arange(5, dtype=torch.int16),  # small
    ],
    ids=["flat", "2d", "transposed", "scalar", "small"],
)
def test_pieces_copy_every_byte(small_pieces: None, src: torch.Tensor) -> None:
    dst = torch.empty(src.shape, dtype=src.dtype)
    pieces = writer._pieces(dst, src)
    if src.is_contiguous() and src.nbytes > 4096:
        assert len(pieces) == -(-src.nbytes // 4096)
    else:
        assert len(pieces) == 1
    writer._copy_all(pieces)
    assert torch.equal(dst, src)


def test_pieces_of_several_tensors_copy_together(small_pieces: None) -> None:
    sources = [torch.randn(5_000), torch.randn(70, 70), torch.arange(3)]
    targets = [torch.empty_like(s) for s in sources]
    writer._copy_all(
        [p for d, s in zip(targets, sources, strict=True) for p in writer._pieces(d, s)]
    )
    for dst, src in zip(targets, sources, strict=True):
        assert torch.equal(dst, src)
