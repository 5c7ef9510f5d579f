"""The solvers' history buffers: selecting running rows keeps their filled slots (solvers/history.py)."""
import pytest
import torch

from fpidsl.runtime.solvers import keep_rows


@pytest.mark.parametrize("filled", [0, 1, 3, 5])
def test_keep_rows_copies_the_filled_slots_of_the_kept_rows(filled):
    buffer = torch.arange(6 * 5 * 4, dtype=torch.float64).reshape(6, 5, 4)
    keep = torch.tensor([0, 2, 5])
    out = keep_rows(buffer, keep, filled)
    assert out.shape == (3, 5, 4) and out.dtype == buffer.dtype and out.is_contiguous()
    assert torch.equal(out[:, :filled], buffer[[0, 2, 5], :filled])  # indexing: an independent selection


def test_keep_rows_writes_a_new_buffer():
    buffer = torch.randn(4, 3, 2)
    before = buffer.clone()
    out = keep_rows(buffer, torch.tensor([1, 3]), 3)
    out.fill_(7.0)
    assert torch.equal(buffer, before)
