"""Reading a worker's ndjson stream: lines split across reads, joined across reads, and longer than any buffer."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from longserve.serve.upstream import ndjson_lines


class _Reads:
    """Stands in for aiohttp's StreamReader: ``iter_any`` yields the bytes as the socket delivered them."""

    def __init__(self, *reads: bytes) -> None:
        self.reads = reads

    async def iter_any(self) -> AsyncIterator[bytes]:
        for data in self.reads:
            yield data


def _lines(*reads: bytes) -> list[bytes]:
    async def collect() -> list[bytes]:
        return [line async for line in ndjson_lines(_Reads(*reads))]

    return asyncio.run(collect())


def test_lines_are_rebuilt_whatever_the_reads() -> None:
    assert _lines(b'{"a":1}\n{"b":2}\n') == [b'{"a":1}', b'{"b":2}']
    assert _lines(b'{"a"', b":1}\n", b'{"b":2}\n{"c"', b":3}\n") == [b'{"a":1}', b'{"b":2}', b'{"c":3}']
    assert _lines(b'{"a":1}\n\n  \n', b'{"b":2}') == [b'{"a":1}', b'{"b":2}']  # blank lines skipped
    assert _lines(b"", b"\n") == [] and _lines() == []


def test_a_line_of_megabytes_in_many_reads_comes_out_whole() -> None:
    line = b'{"prompt_logprobs":[' + b'{"logprob":-1.5},' * 200_000 + b"null]}"
    reads = [line[i : i + 65_536] for i in range(0, len(line), 65_536)]
    assert _lines(b'{"first":0}\n' + reads[0], *reads[1:], b'\n{"last":1}\n') == [
        b'{"first":0}',
        line,
        b'{"last":1}',
    ]
