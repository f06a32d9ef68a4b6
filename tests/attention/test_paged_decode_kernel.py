"""The dense paged decode kernel (Triton) against float64 attention on a GPU: shuffled block tables, contexts
of 1 to 40K keys, head sizes 64, 128 and MLA's 192 (padded to 256 inside), GQA groups 1 to 8, and the split
counts the engine uses. (Triton's interpreter cannot run it: its loop bounds are read from the cache tables.)"""

from __future__ import annotations

import paged_decode_checks
import pytest
import torch

pytestmark = pytest.mark.gpu


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_dense_decode_matches_float64_attention() -> None:
    pytest.importorskip("triton")
    from longserve.attention.paged_decode import dense_splits

    lens = [1, 17, 300, 4096, 40_000, 2, 1023]
    # The engine's split counts: sized for this batch's longest context, and for a 139K-token model.
    splits = sorted({dense_splits(len(lens) * 2, n, torch.device("cuda")) for n in (max(lens), 139_264)})
    paged_decode_checks.check_dense_decode("cuda", lens, (64, 128, 192), (1, 2, 4, 8), splits + [1, 7])
