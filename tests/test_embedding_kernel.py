"""compute.kernels.embedding: rows of a host table gathered by ids on the device, against torch's index_select."""

from __future__ import annotations

import pytest
import torch

from compute.kernels.embedding import embedding_rows


def test_on_cpu_the_rows_are_index_selects_and_bad_arguments_are_refused():
    table = torch.randn(50, 24, dtype=torch.bfloat16)
    ids = torch.tensor([3, 0, 49, 3])
    out = torch.empty(4, 24, dtype=torch.bfloat16)
    assert embedding_rows(table, ids, out) is out
    assert torch.equal(out, table[ids])
    with pytest.raises(ValueError, match="int64"):
        embedding_rows(table, ids.int(), out)
    with pytest.raises(ValueError, match="out must be"):
        embedding_rows(table, ids, torch.empty(4, 24))
    with pytest.raises(ValueError, match="2-D host tensor"):
        embedding_rows(table[:, :12], ids, out)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("hidden", [896, 5120, 1000])
def test_on_cuda_the_device_reads_the_pinned_table(hidden):
    table = torch.randn(3000, hidden, dtype=torch.bfloat16).pin_memory()
    ids = torch.randint(0, 3000, (16,), device="cuda")
    out = torch.empty(16, hidden, dtype=torch.bfloat16, device="cuda")
    embedding_rows(table, ids, out)
    assert torch.equal(out.cpu(), table[ids.cpu()])
    with pytest.raises(ValueError, match="pinned"):
        embedding_rows(table.clone(), ids, out)
