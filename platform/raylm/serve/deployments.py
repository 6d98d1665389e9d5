"""One Serve deployment per served model. Requests that arrive together are batched with
`@serve.batch`; generation streams: the batched method is an async generator that yields one
list per decoding step (an event per request, `StopIteration` for finished ones)."""

from __future__ import annotations

import asyncio
import logging
from typing import Any, AsyncGenerator, Optional

from ray import serve

from raylm.serve.engine import ClassifierEngine, GenRequest, LMEngine, RequestError

log = logging.getLogger("ray.serve")
_END = object()


def _model_dir(spec: dict[str, Any]) -> str:
    from raylm import registry

    return str(registry.local_path(spec["card"]))


def _threads(num_cpus: float) -> None:
    import torch

    torch.set_num_threads(max(1, int(num_cpus)))


def _log_loaded(spec: dict[str, Any], compression: dict[str, Any]) -> None:
    card = spec["card"]
    measured = (card.get("serving") or {}).get("compression")
    log.info("raylm: serving %s as %r; compression %s; quality change measured at deploy: %s",
             card.get("id"), spec["name"], compression or "none", measured or "not measured")


def _merge_events(a: dict[int, dict], b: dict[int, dict]) -> dict[int, dict]:
    out = dict(a)
    for i, ev in b.items():
        if i not in out:
            out[i] = ev
            continue
        prev = out[i]
        out[i] = {"text": prev["text"] + ev["text"], "finish_reason": ev["finish_reason"] or prev["finish_reason"],
                  **{k: prev.get(k, []) + ev.get(k, []) for k in ("tokens", "token_texts", "logprobs", "top_logprobs")}}
    return out


@serve.deployment
class LMDeployment:
    def __init__(self, spec: dict[str, Any]):
        o = spec["options"]
        _threads(o["num_cpus"])
        self.spec = spec
        c = o["compression"]
        self.engine = LMEngine(_model_dir(spec), num_gpus=o["num_gpus"], dtype=o["dtype"], quantize=c["quantize"],
                               prune=c["prune"], chat_template=o.get("chat_template"),
                               max_prompt_tokens=o.get("max_prompt_tokens"))
        self._one_at_a_time: Optional[asyncio.Semaphore] = None
        self.reconfigure({"batching": o["batching"]})
        _log_loaded(spec, self.engine.compression)

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """The batching settings (the deployment's `user_config`): Serve calls this after the
        constructor and again, on the running replica, when a redeploy changes only them."""
        b = user_config["batching"]
        self._generate_batch.set_max_batch_size(b["max_batch_size"])
        self._generate_batch.set_batch_wait_timeout_s(b["batch_wait_timeout_s"])
        # Batches of one skip `@serve.batch`'s queue and batching task (a few event-loop turns per
        # request); one generation at a time all the same, as `@serve.batch` runs its batches
        self._one_at_a_time = (self._one_at_a_time or asyncio.Semaphore(1)) if b["max_batch_size"] == 1 else None
        self.stream_interval_s = b["stream_interval_s"]

    def info(self) -> dict[str, Any]:
        return {"context": self.engine.context, "max_prompt_tokens": self.engine.max_prompt_tokens,
                "vocab_size": len(self.engine.tok), "device": str(self.engine.device)}

    def prepare(self, req: dict[str, Any]) -> GenRequest:
        """A request dict from the ingress -> a checked GenRequest (RequestError when it cannot run)."""
        if req.get("messages") is not None:
            prompt: Any = self.engine.render_chat(req["messages"])
        else:
            prompt = req["prompt"]
        g = GenRequest(prompt_ids=self.engine.encode(prompt), max_tokens=req["max_tokens"],
                       temperature=req["temperature"], top_p=req["top_p"], stop=req.get("stop") or [],
                       seed=req.get("seed"), logprobs=req.get("logprobs"))
        self.engine.check(g)
        return g

    async def generate(self, req: dict[str, Any]) -> AsyncGenerator[dict[str, Any], None]:
        """Stream one request's events (called with `handle.options(stream=True)`); requests
        that arrive together share one batched `generate` call (with batches of one, each runs
        alone, in turn)."""
        if self._one_at_a_time is None:
            async for ev in self._generate_batch(req):
                yield ev
            return
        async with self._one_at_a_time:
            async for out in self._generate_events([req]):
                if out[0] is StopIteration:
                    return
                yield out[0]

    async def _generate_events(self, reqs: list[dict[str, Any]]) -> AsyncGenerator[list[Any], None]:
        """Per request: first `{"type": "start", "prompt_tokens", "prompt_ids"}` or `{"type":
        "error"}`, then one `{"type": "delta", ...}` per step with new text, the last one with a
        finish_reason."""
        n = len(reqs)
        first: list[Any] = []
        live: list[int] = []
        prepared: list[GenRequest] = []
        for i, r in enumerate(reqs):
            try:
                g = self.prepare(r)
            except RequestError as e:
                first.append({"type": "error", "message": str(e)})
                continue
            first.append({"type": "start", "prompt_tokens": len(g.prompt_ids),
                          "prompt_ids": g.prompt_ids if r.get("echo") else None})
            if r["max_tokens"] > 0:
                live.append(i)
                prepared.append(g)
        log.debug("raylm: generation batch of %d (%d generating)", n, len(live))
        yield first
        finished = [i not in live for i in range(n)]
        if not live:
            return
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        streaming = any(reqs[i].get("stream") for i in live)
        held: list[dict[int, dict]] = []

        def emit(events: dict[int, dict]) -> None:
            if streaming:
                loop.call_soon_threadsafe(queue.put_nowait, events)
            else:  # nobody reads partial text: do not wake the event loop every step
                held.append(events)

        def run() -> None:
            try:
                self.engine.generate(prepared, emit)
            finally:
                if held:
                    merged = held[0]
                    for more in held[1:]:
                        merged = _merge_events(merged, more)
                    loop.call_soon_threadsafe(queue.put_nowait, merged)
                loop.call_soon_threadsafe(queue.put_nowait, _END)

        task = loop.run_in_executor(None, run)
        # Every yield becomes one stream item per request, and each item costs the replica
        # milliseconds, so coalesce: a batch with no streaming request yields once at the end;
        # otherwise the first tokens go at once (time to first token), later ones at most every
        # stream_interval_s.
        ended, first_tokens, last = False, True, 0.0
        while not ended:
            events = await queue.get()
            if events is _END:
                break
            if not streaming:
                while (more := await queue.get()) is not _END:
                    events = _merge_events(events, more)
                ended = True
            elif not first_tokens:  # the first tokens go alone, at once: time to first token
                wait = last + self.stream_interval_s - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                while not queue.empty():
                    more = queue.get_nowait()
                    if more is _END:
                        ended = True
                        break
                    events = _merge_events(events, more)
            first_tokens = False
            out: list[Any] = []
            for i in range(n):
                if finished[i]:
                    out.append(StopIteration)
                    continue
                ev = events.get(live.index(i))
                if ev is None:
                    out.append({"type": "delta", "text": "", "finish_reason": None, "tokens": [], "token_texts": [],
                                "logprobs": [], "top_logprobs": []})
                else:
                    out.append({"type": "delta", **ev})
                    finished[i] = ev["finish_reason"] is not None
            yield out
            last = loop.time()
        await task  # re-raises what the generation thread raised

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def _generate_batch(self, reqs: list[dict[str, Any]]) -> AsyncGenerator[list[Any], None]:
        # (a method of its own: `@serve.batch` finds `self` by the decorated function's name)
        async for out in self._generate_events(reqs):
            yield out

    async def score(self, prompt_ids: list[list[int]], top: int) -> list[dict[str, Any]]:
        """Prompt-token log-probabilities (OpenAI `echo` + `logprobs`)."""
        out = await asyncio.get_running_loop().run_in_executor(None, self.engine.score, prompt_ids, top)
        for o in out:
            o["token_texts"] = self.engine.token_texts(o["tokens"])
        return out


@serve.deployment
class ClassifierDeployment:
    def __init__(self, spec: dict[str, Any]):
        o = spec["options"]
        _threads(o["num_cpus"])
        c = o["compression"]
        self.engine = ClassifierEngine(_model_dir(spec), num_gpus=o["num_gpus"], dtype=o["dtype"],
                                       quantize=c["quantize"], prune=c["prune"])
        self.reconfigure({"batching": o["batching"]})
        _log_loaded(spec, self.engine.compression)

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """The batching settings (`user_config`), applied in place as for LMDeployment."""
        b = user_config["batching"]
        self.classify.set_max_batch_size(b["max_batch_size"])
        self.classify.set_batch_wait_timeout_s(b["batch_wait_timeout_s"])

    def info(self) -> dict[str, Any]:
        return {"labels": self.engine.labels, "max_length": self.engine.max_len, "long_texts": self.engine.long_texts,
                "max_windows": self.engine.max_windows, "device": str(self.engine.device)}

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def classify(self, batches: list[list[str]]) -> list[list[dict[str, Any]]]:
        flat = [t for b in batches for t in b]
        res = await asyncio.get_running_loop().run_in_executor(None, self.engine.classify, flat)
        out, k = [], 0
        for b in batches:
            out.append(res[k:k + len(b)])
            k += len(b)
        return out
