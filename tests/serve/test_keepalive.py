"""with_keepalive: None while the source is silent, items in order, and leaving early cancels the pending step
so the source's cleanup runs at once (what frees a worker's slot when a client hangs up)."""

import asyncio
from contextlib import aclosing

from longserve.serve.keepalive import with_keepalive


async def _source(log: list[str], delays: list[float]):
    try:
        for i, delay in enumerate(delays):
            await asyncio.sleep(delay)
            yield i
    finally:
        log.append("closed")


def test_keepalives_fill_the_silences_and_items_keep_their_order():
    async def run():
        log: list[str] = []
        return [x async for x in with_keepalive(_source(log, [0.0, 0.35, 0.0]), 0.1)], log

    items, log = asyncio.run(run())
    assert [x for x in items if x is not None] == [0, 1, 2]
    assert items.count(None) >= 2 and items.index(1) > items.index(0) + 1 and log == ["closed"]


def test_leaving_early_cancels_the_pending_step_and_closes_the_source():
    async def run():
        log: list[str] = []
        source = _source(log, [0.0, 60.0])
        async with aclosing(with_keepalive(source, 0.05)) as items:
            async for item in items:
                if item is None:  # waiting on the 60 s step: hang up
                    break
        return log

    assert asyncio.run(asyncio.wait_for(run(), 5)) == ["closed"]
