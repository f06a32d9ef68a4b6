"""MoBA's Triton selection kernels against the torch selection, with the attention sink and the local window
on and off: on CUDA, or on the CPU under TRITON_INTERPRET=1 (test_moba_gate_kernels.py runs it there)."""

from __future__ import annotations

import torch


def check_prefill_gate(device: str) -> None:
    """The fused prefill gate against the torch selection on integer-valued inputs (exact scores, so many
    exact ties), over several tiles of blocks and running lists of several widths."""
    from longserve.attention.moba_gating import select_moba_blocks
    from longserve.attention.moba_triton import moba_prefill_gate_kernel

    g = torch.Generator().manual_seed(0)
    heads, kv_heads, dim, chunk = 4, 2, 16, 8
    for rows, first, topk in ((40, 100, 5), (70, 1100, 20), (33, 0, 1), (50, 30, 3)):
        blocks = (first + rows) // chunk
        q = torch.randint(-3, 4, (rows, heads, dim), generator=g).float().to(device)
        gates = torch.randint(-2, 3, (max(blocks, 1), kv_heads, dim), generator=g).float()[:blocks].to(device)
        positions = torch.arange(first, first + rows, device=device)
        picks = 1 << max(0, (topk - 2).bit_length())
        for sink, window in ((False, 0), (True, 0), (False, 30), (True, 17)):
            chosen = torch.empty(rows, heads, topk, dtype=torch.int32, device=device)
            moba_prefill_gate_kernel[(-(-rows // 16), heads)](
                q, gates, chosen, first, rows, blocks, chunk, int(sink), window,
                q.stride(0), q.stride(1), gates.stride(0), gates.stride(1),
                GROUP=heads // kv_heads, HEAD_DIM=dim, TOPK=topk, KP=picks, BLOCK_R=16, BLOCK_B=16,
                PRECISION="ieee",
            )  # fmt: skip
            want = select_moba_blocks(q.cpu(), gates.cpu(), positions.cpu(), chunk, topk, sink, window)
            assert torch.equal(chosen[..., :-1].long().cpu(), want), (rows, first, topk, sink, window)
            own = (positions // chunk)[:, None].expand(rows, heads)
            assert torch.equal(chosen[..., -1].long().cpu(), own.cpu())


def check_decode_gate(device: str) -> None:
    """The decode gate's bitmask against the torch selection: a few blocks in one tile, then many blocks over
    several tiles on integer-valued inputs (exact scores, many exact ties)."""
    from longserve.attention import moba_cuda
    from longserve.attention.moba_triton import moba_decode_gate_kernel

    g = torch.Generator().manual_seed(1)
    heads, kv_heads, dim, page = 4, 2, 16, 16
    cases = [([33, 200, 97, 256], 32, 4, False), ([700, 1500, 90, 1300], 16, 11, True)]
    cases.append(([700, 129, 512], 64, 3, True))  # a two-wide running list (test_moba_cuda's decode case)
    for lens, chunk, topk, integers in cases:
        batch, max_context = len(lens), max(lens)
        pages_per_block = chunk // page
        num_pages = sum(-(-n // page) for n in lens) + 1
        tables = torch.zeros(batch, -(-max_context // page), dtype=torch.int32)
        order = torch.randperm(num_pages - 1, generator=g) + 1
        start = 0
        for row, n in enumerate(lens):
            count = -(-n // page)
            tables[row, :count] = order[start : start + count]
            start += count
        if integers:
            gate_cache = torch.randint(-2, 3, (num_pages, kv_heads, dim), generator=g).float().to(device)
            q = torch.randint(-3, 4, (batch, heads, dim), generator=g).float().to(device)
        else:
            gate_cache = torch.randn(num_pages, kv_heads, dim, generator=g).to(device)
            q = torch.randn(batch, heads, dim, generator=g).to(device)
        tables, context_lens = tables.to(device), torch.tensor(lens, dtype=torch.int32, device=device)
        splits = -(-max_context // chunk)
        picks = 1 << max(0, (topk - 2).bit_length())
        for sink, window in ((False, 0), (True, 0), (False, 50), (True, 33)):
            chosen = torch.zeros(batch, kv_heads, splits, dtype=torch.int32, device=device)
            moba_decode_gate_kernel[(batch, kv_heads)](
                q, gate_cache, tables, context_lens, chosen,
                q.stride(0), q.stride(1), gate_cache.stride(0), gate_cache.stride(1), tables.stride(0),
                kv_heads, splits, chunk, pages_per_block, int(sink), window,
                GROUP=heads // kv_heads, TOPK=topk, KP=picks, HEAD_DIM=dim, BLOCK_H=16, BLOCK_B=16,
                PRECISION="ieee",
            )  # fmt: skip
            # The torch path of the same selection (the kernel path needs CUDA tensors).
            want = moba_cuda.select_decode_blocks(
                q.cpu(), gate_cache.cpu(), tables.cpu(), context_lens.cpu(), max_context, page, chunk, topk,
                sink, window,
            )  # fmt: skip
            assert torch.equal(chosen.cpu(), want), (lens, sink, window)


def check_close_blocks(device: str) -> None:
    """The decode rows' block closing: rows whose context is a multiple of the block size store that block's
    mean key at its first page; no other gate row changes (shuffled pages, a row closing its first block)."""
    from longserve.attention.moba_triton import moba_close_blocks_kernel

    g = torch.Generator().manual_seed(2)
    kv_heads, dim, page, chunk = 2, 16, 16, 32
    lens = [64, 50, 32, 97, 160]  # rows 0, 2 and 4 close a block
    pages = [-(-n // page) for n in lens]
    order = (torch.randperm(sum(pages), generator=g) + 1).to(torch.int32)
    tables = torch.zeros(len(lens), max(pages), dtype=torch.int32)
    start = 0
    for row, count in enumerate(pages):
        tables[row, :count] = order[start : start + count]
        start += count
    key_cache = torch.randn((sum(pages) + 1) * page, kv_heads, dim, generator=g)
    gates = torch.full((sum(pages) + 1, kv_heads, dim), float("nan"))
    out = gates.to(device)
    moba_close_blocks_kernel[(len(lens), kv_heads)](
        key_cache.to(device), out, tables.to(device),
        torch.tensor(lens, dtype=torch.int32, device=device),
        key_cache.stride(0), key_cache.stride(1), gates.stride(0), gates.stride(1), tables.stride(0), chunk,
        PAGE_SIZE=page, HEAD_DIM=dim, BLOCK_N=16,
    )  # fmt: skip
    out = out.cpu()
    want = gates.clone()
    for row, n in enumerate(lens):
        if n % chunk == 0:
            positions = torch.arange(n - chunk, n)
            slots = tables[row, positions // page].long() * page + positions % page
            want[tables[row, (n - chunk) // page]] = key_cache[slots].mean(0)
    torch.testing.assert_close(out, want, rtol=1e-6, atol=1e-6, equal_nan=True)
