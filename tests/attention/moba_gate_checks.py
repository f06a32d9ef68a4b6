"""MoBA's Triton selection kernels against the torch selection, with the attention sink and the local window
on and off: on CUDA, or on the CPU under TRITON_INTERPRET=1 (test_moba_gate_kernels.py runs it there)."""

from __future__ import annotations

import torch


def check_prefill_topk(device: str) -> None:
    from longserve.attention.moba_gating import pick_blocks
    from longserve.attention.moba_triton import moba_prefill_topk_kernel

    g = torch.Generator().manual_seed(0)
    rows, heads, blocks, chunk, topk, first = 40, 3, 9, 16, 5, 100
    scores = torch.randn(rows, heads, blocks, generator=g).to(device)
    scores[:, :, 2] = scores[:, :, 3]  # a tie: the earlier block wins
    positions = torch.arange(first, first + rows, device=device)
    for sink, window in ((False, 0), (True, 0), (False, 30), (True, 17)):
        chosen = torch.empty(rows, heads, topk, dtype=torch.int32, device=device)
        moba_prefill_topk_kernel[(-(-rows // 16), heads)](
            scores, chosen, first, rows, blocks, chunk, int(sink), window, TOPK=topk, BLOCK_R=16, BLOCK_B=16
        )
        want = pick_blocks(scores, positions, chunk, topk, sink, window)
        assert torch.equal(chosen[..., :-1].long().cpu(), want.cpu()), (sink, window)
        assert torch.equal(
            chosen[..., -1].long().cpu(), (positions // chunk)[:, None].expand(rows, heads).cpu()
        )


def check_decode_gate(device: str) -> None:
    from longserve.attention import moba_cuda
    from longserve.attention.moba_triton import moba_decode_gate_kernel

    g = torch.Generator().manual_seed(1)
    batch, heads, kv_heads, dim, page, chunk, topk = 4, 4, 2, 16, 16, 32, 4
    lens = [33, 200, 97, 256]
    max_context = max(lens)
    pages_per_block = chunk // page
    num_pages = sum(-(-n // page) for n in lens) + 1
    tables = torch.zeros(batch, -(-max_context // page), dtype=torch.int32)
    order = torch.randperm(num_pages - 1, generator=g) + 1
    start = 0
    for row, n in enumerate(lens):
        count = -(-n // page)
        tables[row, :count] = order[start : start + count]
        start += count
    gate_cache = torch.randn(num_pages, kv_heads, dim, generator=g).to(device)
    q = torch.randn(batch, heads, dim, generator=g).to(device)
    tables, context_lens = tables.to(device), torch.tensor(lens, dtype=torch.int32, device=device)
    splits = -(-max_context // chunk)
    for sink, window in ((False, 0), (True, 0), (False, 50), (True, 33)):
        chosen = torch.zeros(batch, kv_heads, splits, dtype=torch.int32, device=device)
        moba_decode_gate_kernel[(batch, heads)](
            q, gate_cache, tables, context_lens, chosen,
            q.stride(0), q.stride(1), gate_cache.stride(0), gate_cache.stride(1), tables.stride(0),
            kv_heads, splits, chunk, pages_per_block, int(sink), window,
            GROUP=heads // kv_heads, TOPK=topk, HEAD_DIM=dim, BLOCK_B=16,
        )  # fmt: skip
        # The torch path of the same selection (the kernel path needs CUDA tensors).
        want = moba_cuda.select_decode_blocks(
            q.cpu(),
            gate_cache.cpu(),
            tables.cpu(),
            context_lens.cpu(),
            max_context,
            page,
            chunk,
            topk,
            sink,
            window,
        )
        assert torch.equal(chosen.cpu(), want), (sink, window)
