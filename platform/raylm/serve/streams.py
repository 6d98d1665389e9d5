"""Reading model streams in the ingress: the events of several generation streams merged as
they come, and cancelling the ones nobody reads any more."""

from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator


def cancel(gens: list[Any]) -> None:
    """Cancel streams we no longer read (one that was refused raises its refusal again)."""
    for g in gens:
        try:
            g.cancel()
        except Exception:  # noqa: BLE001 - nothing left to clean up for that one
            pass


async def merge(gens: list[Any]) -> AsyncIterator[tuple[int, dict]]:
    """Events of several streams as they come: (stream index, event)."""
    if len(gens) == 1:
        async for ev in gens[0]:
            yield 0, ev
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(i: int, g: Any) -> None:
        try:
            async for ev in g:
                await queue.put((i, ev))
        except Exception as e:  # noqa: BLE001 - handed to the consumer
            await queue.put((i, e))
        finally:
            await queue.put((i, done))

    tasks = [asyncio.create_task(pump(i, g)) for i, g in enumerate(gens)]
    left = len(gens)
    try:
        while left:
            i, ev = await queue.get()
            if ev is done:
                left -= 1
            elif isinstance(ev, Exception):
                raise ev
            else:
                yield i, ev
    finally:
        for t in tasks:
            t.cancel()
