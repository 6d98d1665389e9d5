"""What an ingress replica remembers of its recent responses, so that `/v1/feedback` can store
the prompt and the answer a user rates. With several ingress replicas (HAProxy hands them
requests in turn) feedback may reach another replica than the one that answered: the app then
has one `SharedResponses` deployment, each replica hands it its new responses every
SHARE_EVERY_S and asks it on a miss. In memory only, everywhere: the newest RECENT_RESPONSES
per ingress replica.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from typing import Any, Optional

from ray import serve

RECENT_RESPONSES = 10_000  # per ingress replica
SHARE_EVERY_S = 0.5

log = logging.getLogger("ray.serve")


@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0})
class SharedResponses:
    """The recent responses of every ingress replica of an app (bound only when it has several)."""

    def __init__(self, limit: int):
        self.limit = limit
        self.items: OrderedDict[str, dict] = OrderedDict()

    def remember(self, batch: dict[str, dict]) -> None:
        self.items.update(batch)
        while len(self.items) > self.limit:
            self.items.popitem(last=False)

    def recall(self, rid: str) -> Optional[dict]:
        return self.items.get(rid)


class RecentResponses:
    """One ingress replica's memory; `shared`: a handle to the app's SharedResponses, or None."""

    def __init__(self, shared: Any = None):
        self.local: OrderedDict[str, dict] = OrderedDict()
        self.shared = shared
        self._unshared: dict[str, dict] = {}
        self._sharing: Optional[asyncio.Task] = None

    def remember(self, rid: str, record: dict[str, Any]) -> None:
        """From the replica's event loop (a route)."""
        self.local[rid] = record
        while len(self.local) > RECENT_RESPONSES:
            self.local.popitem(last=False)
        if self.shared is not None:
            self._unshared[rid] = record
            if self._sharing is None or self._sharing.done():
                self._sharing = asyncio.get_running_loop().create_task(self._share())

    async def _share(self) -> None:
        while self._unshared:  # and those that came while the last batch was on its way
            await asyncio.sleep(SHARE_EVERY_S)
            batch, self._unshared = self._unshared, {}
            try:
                await self.shared.remember.remote(batch)
            except Exception as e:  # feedback on these at another replica is stored without their text
                log.warning("could not share %d recent response(s) with the other ingress replicas: %s",
                            len(batch), e)

    async def recall(self, rid: str) -> Optional[dict[str, Any]]:
        """A recent response by id: this replica's, else (several replicas) the one another served."""
        seen = self.local.get(rid)
        if seen is not None or self.shared is None:
            return seen
        for wait in (0.0, SHARE_EVERY_S + 0.5):  # the replica that served it shares it within SHARE_EVERY_S
            await asyncio.sleep(wait)
            try:
                seen = await self.shared.recall.remote(rid)
            except Exception as e:
                log.warning("could not ask the other ingress replicas for response %s: %s", rid, e)
                return None
            if seen is not None:
                return seen
        return None


def chat_record(model: str, version: str, messages: list[dict], answer: str) -> dict[str, Any]:
    """What feedback on a chat answer stores: the last user message and the answer, and the whole
    conversation with it (a chat data source's `messages_field: messages`: supervised fine-tuning
    on the answers users rated good)."""
    return {"model": model, "version": version, "prompt": messages[-1]["content"], "completion": answer,
            "messages": [*messages, {"role": "assistant", "content": answer}]}
