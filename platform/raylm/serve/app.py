"""The Serve ingress: a FastAPI app (API keys, limits, validation, OpenAI-compatible routes,
feedback, metrics, playground) that reaches one deployment per model through DeploymentHandles.
serve/graph.py assembles the application from a deploy config.

    app_builder(args) -> serve.Application   (import path for `serve deploy` / a RayService)

Every error a client can cause is a JSON body `{"error": {"message", "type", "code"}}` with
the right status (400, 401, 403, 404, 413, 422, 429, 503); nothing a client sends gives a 500.


Request bodies, error bodies and SSE lines are in `protocol.py`; metrics in `metrics.py`;
merging model streams in `streams.py`.
"""

import asyncio
import datetime as dt
import json
import logging
import math
import random
import time
import uuid
from typing import Any, AsyncIterator, Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ValidationError
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from raylm.serve.config import DeployConfig
from raylm.serve.metrics import metrics
from raylm.serve.playground import playground_page
from raylm.serve.recent import RecentResponses, chat_record
from raylm.serve.streams import cancel as _cancel
from raylm.serve.streams import merge as _merge
from raylm.serve.protocol import (ApiError, ChatRequest, ClassifyRequest, CompletionRequest, FeedbackRequest, Stop,
                                  body_schema, error_body, error_response, sse, validation_message)

log = logging.getLogger("ray.serve")
ROUTES = {"/", "/healthz", "/v1/models", "/v1/completions", "/v1/chat/completions", "/v1/classify", "/v1/feedback"}


# --- the app ---------------------------------------------------------------------------------

app = FastAPI(title="raylm", description="OpenAI-compatible completions, chat and classification on Ray Serve",
              version="1")


@app.exception_handler(ApiError)
async def _api_error(request: Request, e: ApiError):
    return error_response(e)


@app.exception_handler(RequestValidationError)
async def _validation_error(request: Request, e: RequestValidationError):
    msg, param = validation_message(e.errors())
    return JSONResponse(error_body(msg, "invalid_request_error", "invalid_body", param), status_code=422)


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, e: StarletteHTTPException):
    msg = {404: f"no route {request.url.path}", 405: f"{request.method} is not allowed on {request.url.path}"}.get(
        e.status_code, str(e.detail))
    return JSONResponse(error_body(msg, "invalid_request_error", "not_found" if e.status_code == 404 else None),
                        status_code=e.status_code, headers=getattr(e, "headers", None))


@app.exception_handler(Exception)
async def _unexpected(request: Request, e: Exception):
    ref = uuid.uuid4().hex[:12]
    log.exception("raylm: internal error %s on %s", ref, request.url.path)
    return JSONResponse(error_body(f"internal error (reference {ref}; details are in the server log)",
                                   "server_error", "internal_error"), status_code=500)


class _Count:
    """Counts every request by route, status and model, and times the whole answers
    (`raylm_serve_requests_total`, `raylm_serve_request_latency_seconds`). Plain ASGI: FastAPI's
    `@app.middleware("http")` wraps each request in a task group and memory streams (measured:
    ~6% of the ingress's CPU per request, ~0.7 ms on 2 cores). Handlers name the model and mark streams in
    `request.state` (the scope's "state")."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        state = scope["state"] = {**scope.get("state", {}), "model": "", "version": "", "streaming": False}
        status = 500  # unless a response starts

        async def sent(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                if state["version"]:  # the registry version that answered (a canary or the model)
                    message["headers"] = [*message.get("headers", []),
                                          (b"x-raylm-model-version", state["version"].encode())]
            await send(message)

        try:
            await self.app(scope, receive, sent)
        finally:
            path = scope["path"]
            route = path if path in ROUTES else "other"
            m = metrics()
            m["requests"].inc(tags={"route": route, "status": str(status), "model": state["model"],
                                    "version": state["version"]})
            if not state["streaming"]:
                m["latency"].observe(time.perf_counter() - t0, tags={"route": route, "model": state["model"]})


app.add_middleware(_Count)


async def _once_more_if_replica_lost(call: Any, what: str) -> Any:
    """`await call()`; when the replica serving it died under it (RayActorError), once more: the
    handle routes the retry to a live replica, or holds it until Serve has started the
    replacement. Only for whole answers, which nobody has seen a part of."""
    from ray.exceptions import RayActorError

    try:
        return await call()
    except RayActorError as e:
        log.warning("raylm: a %s replica was lost under a request (%s); sending it once more", what,
                    type(e).__name__)
        return await call()


@serve.deployment
@serve.ingress(app)
class Ingress:
    def __init__(self, cfg: dict[str, Any], meta: dict[str, dict[str, Any]], handles: dict[str, Any],
                 shared: Any = None):
        from raylm.serve.keys import KeyStore, RateLimiter

        self.cfg = DeployConfig.model_validate(cfg)
        self.models = {name: {**meta[name], "handle": handles[name]} for name in meta}
        for name, m in self.models.items():  # a canary: another version answering a share of the name's requests
            if m.get("canary"):
                m["canary"] = {**m["canary"], "handle": handles[f"{name}@canary"]}
        self.options = {m.name: m for m in self.cfg.models}
        self.keys = KeyStore(self.cfg.auth.keys_file) if self.cfg.auth.required else None
        # HAProxy spreads requests over the ingress replicas in turn: each holds its share of a
        # key's limit, so the app as a whole allows the key's limit
        self.limiter = RateLimiter(self.cfg.limits.rate_limit_per_minute, replicas=self.cfg.ingress.num_replicas)
        self.recent = RecentResponses(shared)  # for feedback records (serve/recent.py)
        self.created = int(time.time())
        metrics()

    # --- checks ------------------------------------------------------------------------------

    def _auth(self, request: Request, scope: Optional[str]):
        from raylm.serve.keys import Principal

        if self.keys is None:
            return Principal("anonymous", frozenset({"admin"}), None)
        header = request.headers.get("authorization", "")
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise ApiError(401, "missing API key: send `Authorization: Bearer <key>`", "authentication_error",
                           "missing_api_key", {"WWW-Authenticate": "Bearer"})
        who = self.keys.lookup(key.strip())
        if who is None:
            raise ApiError(401, "invalid API key", "authentication_error", "invalid_api_key",
                           {"WWW-Authenticate": "Bearer"})
        if scope is not None and not who.allows(scope):
            raise ApiError(403, f"this key lacks the `{scope}` scope (it has: {', '.join(sorted(who.scopes))})",
                           "permission_error", "insufficient_scope")
        wait = self.limiter.take(who.name, who.rate_limit_per_minute)
        if wait > 0:
            raise ApiError(429, f"rate limit of {who.rate_limit_per_minute or self.limiter.default} requests per "
                           f"minute reached for this key; retry in {math.ceil(wait)} s", "rate_limit_error",
                           "rate_limit_exceeded", {"Retry-After": str(math.ceil(wait))})
        return who

    async def _parse(self, request: Request, model: type[BaseModel]) -> Any:
        limit = self.cfg.limits.max_body_bytes
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise ApiError(413, f"request body of {declared} bytes is over the limit of {limit}", code="body_too_large")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise ApiError(413, f"request body is over the limit of {limit} bytes", code="body_too_large")
            chunks.append(chunk)
        try:
            data = json.loads(b"".join(chunks))
        except (ValueError, UnicodeDecodeError):
            raise ApiError(400, "the body is not valid JSON", code="invalid_json") from None
        if not isinstance(data, dict):
            raise ApiError(400, "the body must be a JSON object", code="invalid_json")
        try:
            return model.model_validate(data)
        except ValidationError as e:
            msg, param = validation_message(e.errors())
            raise ApiError(422, msg, code="invalid_body", param=param) from None

    def _model(self, request: Request, name: str, task: str) -> dict[str, Any]:
        m = self.models.get(name)
        if m is None:
            raise ApiError(404, f"model {name!r} not found; served models: {', '.join(sorted(self.models))}",
                           code="model_not_found", param="model")
        request.state.model = name
        if m["task"] != task:
            raise ApiError(400, f"model {name!r} is a {m['task']} model; this route needs a {task} model",
                           code="wrong_task", param="model")
        if m.get("canary") and random.random() < m["canary"]["weight"]:
            m = m["canary"]
        request.state.version = m["registry_id"]
        return m

    def _max_tokens(self, name: str, asked: Optional[int]) -> int:
        o = self.options[name]
        n = o.default_max_tokens if asked is None else asked
        if n > o.max_tokens_cap:
            raise ApiError(400, f"max_tokens {n} is over this model's cap of {o.max_tokens_cap}",
                           code="max_tokens_too_large", param="max_tokens")
        return n

    @staticmethod
    def _stops(stop: Stop) -> list[str]:
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if len(stops) > 4:
            raise ApiError(400, "at most 4 stop sequences", param="stop")
        return [s for s in stops if s]

    async def _start(self, m: dict[str, Any], payloads: list[dict[str, Any]]) -> list[tuple[Any, dict]]:
        """Send every prompt to the model at once (so they batch), then wait for each one's
        first event: an accepted prompt, or the reason it was refused."""
        from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

        gens: list[Any] = []
        try:
            for p in payloads:
                gens.append(m["handle"].options(stream=True).generate.remote(p))
            firsts = await asyncio.gather(*(g.__anext__() for g in gens))
        except BackPressureError:
            _cancel(gens)
            raise ApiError(503, "the model's queue is full; retry shortly", "server_busy", "queue_full",
                           {"Retry-After": "1"}) from None
        except DeploymentUnavailableError:
            raise ApiError(503, "the model is not available yet; retry shortly", "server_busy", "unavailable",
                           {"Retry-After": "5"}) from None
        errors = [f["message"] for f in firsts if f["type"] == "error"]
        if errors:
            _cancel(gens)
            code = "context_length_exceeded" if "tokens" in errors[0] else "invalid_prompt"
            raise ApiError(400, errors[0], code=code, param="prompt")
        return list(zip(gens, firsts))

    def served(self) -> list[dict[str, Any]]:
        """Every registry version this app serves (a handle call: `raylm models delete` asks)."""
        return [{"model": name, "id": x["registry_id"], "uri": x["uri"]} for name, m in self.models.items()
                for x in (m, m.get("canary") or {}) if x.get("uri")]

    # --- routes ------------------------------------------------------------------------------

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def playground(self) -> HTMLResponse:
        page, headers = playground_page()
        return HTMLResponse(page, headers=headers)

    @app.get("/healthz")
    async def healthz(self) -> JSONResponse:
        async def probe(m: dict) -> str:
            handles = [h for x in (m, m.get("canary") or {}) if "handle" in x
                       for h in (x["handle"] if isinstance(x["handle"], list) else [x["handle"]])]
            try:
                await asyncio.wait_for(asyncio.gather(*(h.info.remote() for h in handles)), timeout=5)
                return "ready"
            except Exception:  # noqa: BLE001 - a health check reports, it does not fail
                return "unavailable"

        states = dict(zip(self.models, await asyncio.gather(*(probe(m) for m in self.models.values()))))
        ok = all(s == "ready" for s in states.values())
        return JSONResponse({"status": "ok" if ok else "degraded", "models": states}, status_code=200 if ok else 503)

    def _model_entry(self, name: str) -> dict[str, Any]:
        m = self.models[name]
        return {"id": name, "object": "model", "created": m.get("created", self.created), "owned_by": "raylm",
                "task": m["task"], "registry_id": m["registry_id"], **({"labels": m["labels"]} if m.get("labels") else {}),
                **({"chat": True} if m.get("chat") else {}),  # fine-tuned on conversations: ask on chat routes
                **({"canary": {"registry_id": m["canary"]["registry_id"], "weight": m["canary"]["weight"]}}
                   if m.get("canary") else {})}

    @app.get("/v1/models")
    async def list_models(self, request: Request) -> dict:
        self._auth(request, None)
        return {"object": "list", "data": [self._model_entry(n) for n in self.models]}

    @app.get("/v1/models/{model_id}")
    async def get_model(self, model_id: str, request: Request) -> dict:
        self._auth(request, None)
        if model_id not in self.models:
            raise ApiError(404, f"model {model_id!r} not found", code="model_not_found")
        return self._model_entry(model_id)

    @app.post("/v1/completions", openapi_extra=body_schema(CompletionRequest))
    async def completions(self, request: Request):
        self._auth(request, "generate")
        req: CompletionRequest = await self._parse(request, CompletionRequest)
        m = self._model(request, req.model, "causal_lm")
        p = req.prompt
        prompts: list[Any] = [p] if isinstance(p, str) or (p and isinstance(p[0], int)) else list(p)
        if not prompts or any(len(x) == 0 for x in prompts):
            raise ApiError(400, "the prompt is empty", param="prompt")
        if len(prompts) > 32:
            raise ApiError(400, "at most 32 prompts per request", param="prompt")
        base = {"max_tokens": self._max_tokens(req.model, req.max_tokens), "temperature": req.temperature,
                "top_p": req.top_p, "stop": self._stops(req.stop), "seed": req.seed, "logprobs": req.logprobs,
                "echo": req.echo, "stream": req.stream}
        payloads = [{**base, "prompt": x} for x in prompts]
        rid = f"cmpl-{uuid.uuid4().hex}"
        head = {"id": rid, "object": "text_completion", "created": int(time.time()), "model": req.model,
                "system_fingerprint": m["registry_id"]}
        if req.stream:
            started = await self._start(m, payloads)
            outs = None
        else:
            started, outs = await self._generate(request, m, payloads, req.model)
        prompt_scores = await self._prompt_scores(m, started, req) if (req.echo and req.logprobs is not None) \
            else [None] * len(prompts)
        echo_texts = [self._prompt_text(x, s) if req.echo else "" for x, s in zip(prompts, prompt_scores)]
        if req.stream:
            request.state.streaming = True
            return StreamingResponse(self._stream_completion(request, m, started, head, req, echo_texts, prompt_scores,
                                                             prompts), media_type="text/event-stream")
        choices = []
        for i, o in enumerate(outs):
            lp = self._completion_logprobs(o, prompt_scores[i], echo_texts[i], len(prompts[i]) if isinstance(
                prompts[i], str) else 0) if req.logprobs is not None else None
            choices.append({"text": echo_texts[i] + o["text"], "index": i, "logprobs": lp,
                            "finish_reason": o["finish_reason"] or "length"})
        usage = self._usage(started, outs)
        self.recent.remember(rid, {"model": req.model, "version": m["registry_id"],
                                   "prompt": prompts[0] if isinstance(prompts[0], str) else None,
                             "completion": outs[0]["text"]})
        return {**head, "choices": choices, "usage": usage}

    @staticmethod
    def _prompt_text(prompt: Any, score: Optional[dict]) -> str:
        if isinstance(prompt, str):
            return prompt
        return "".join(score["token_texts"]) if score else ""

    async def _prompt_scores(self, m: dict, started: list, req: CompletionRequest) -> list[Optional[dict]]:
        ids = [first["prompt_ids"] for _, first in started]
        return await m["handle"].score.remote(ids, req.logprobs or 0)

    @staticmethod
    def _completion_logprobs(o: dict, score: Optional[dict], echo_text: str, prompt_chars: int) -> dict:
        tokens, lps, tops = [], [], []
        if score is not None:
            tokens += score["token_texts"]
            lps += score["logprobs"]
            tops += score["top_logprobs"]
        tokens += o["token_texts"]
        lps += o["logprobs"]
        tops += o["top_logprobs"]
        offsets, pos = [], (0 if echo_text else prompt_chars)
        for t in tokens:
            offsets.append(pos)
            pos += len(t)
        return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}

    async def _generate(self, request: Request, m: dict[str, Any], payloads: list[dict[str, Any]],
                        model: str) -> tuple[list, list[dict]]:
        """Start and collect a whole (not streamed) answer, sent once more if its replica died.
        (A stream that has begun cannot be replayed: it ends with an in-band error instead.)"""
        async def once() -> tuple[list, list[dict]]:
            started = await self._start(m, payloads)
            return started, await self._collect(request, started, model)

        return await _once_more_if_replica_lost(once, model)

    async def _collect(self, request: Request, started: list, model: str) -> list[dict]:
        t0 = time.perf_counter()
        outs = [{"text": "", "finish_reason": None, "tokens": [], "token_texts": [], "logprobs": [],
                 "top_logprobs": []} for _ in started]
        first = True
        async for i, ev in _merge([g for g, _ in started]):
            o = outs[i]
            if first and ev["tokens"]:
                metrics()["ttft"].observe(time.perf_counter() - t0, tags={"model": model})
                first = False
            o["text"] += ev["text"]
            for k in ("tokens", "token_texts", "logprobs", "top_logprobs"):
                o[k] += ev.get(k, [])
            o["finish_reason"] = ev["finish_reason"] or o["finish_reason"]
        n = sum(len(o["tokens"]) for o in outs)
        if n:
            metrics()["tokens"].inc(n, tags={"model": model})
        return outs

    @staticmethod
    def _usage(started: list, outs: list[dict]) -> dict:
        p = sum(first["prompt_tokens"] for _, first in started)
        c = sum(len(o["tokens"]) for o in outs)
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    async def _stream_completion(self, request: Request, m: dict, started: list, head: dict, req: CompletionRequest,
                                 echo_texts: list[str], prompt_scores: list, prompts: list) -> AsyncIterator[str]:
        t0 = time.perf_counter()
        n_tokens, text0, first = [0] * len(started), [], True
        try:
            for i, e in enumerate(echo_texts):
                if e:
                    lp = None
                    if req.logprobs is not None and prompt_scores[i]:
                        lp = self._completion_logprobs({"token_texts": [], "logprobs": [], "top_logprobs": []},
                                                       prompt_scores[i], e, 0)
                    yield sse({**head, "choices": [{"text": e, "index": i, "logprobs": lp, "finish_reason": None}]})
            async for i, ev in _merge([g for g, _ in started]):
                if first and ev["tokens"]:
                    metrics()["ttft"].observe(time.perf_counter() - t0, tags={"model": req.model})
                    first = False
                n_tokens[i] += len(ev["tokens"])
                if i == 0:
                    text0.append(ev["text"])
                if not ev["text"] and not ev["finish_reason"]:
                    continue
                lp = None
                if req.logprobs is not None:
                    lp = {"tokens": ev["token_texts"], "token_logprobs": ev["logprobs"],
                          "top_logprobs": ev["top_logprobs"], "text_offset": []}
                yield sse({**head, "choices": [{"text": ev["text"], "index": i, "logprobs": lp,
                                                 "finish_reason": ev["finish_reason"]}]})
            if req.stream_options and req.stream_options.include_usage:
                p = sum(f["prompt_tokens"] for _, f in started)
                yield sse({**head, "choices": [], "usage": {"prompt_tokens": p, "completion_tokens": sum(n_tokens),
                                                             "total_tokens": p + sum(n_tokens)}})
            yield "data: [DONE]\n\n"
        except Exception:  # noqa: BLE001 - the stream has begun: report in-band, never a stack trace
            ref = uuid.uuid4().hex[:12]
            log.exception("raylm: stream %s failed (reference %s)", head["id"], ref)
            yield sse(error_body(f"generation failed (reference {ref})", "server_error", "internal_error"))
            yield "data: [DONE]\n\n"
        finally:
            metrics()["tokens"].inc(sum(n_tokens) or 0, tags={"model": req.model})
            metrics()["latency"].observe(time.perf_counter() - t0, tags={"route": "/v1/completions",
                                                                         "model": req.model})
            self.recent.remember(head["id"], {"model": req.model, "version": head["system_fingerprint"],
                                              "prompt": prompts[0] if isinstance(prompts[0], str)
                                        else None, "completion": "".join(text0)})

    @app.post("/v1/chat/completions", openapi_extra=body_schema(ChatRequest))
    async def chat_completions(self, request: Request):
        self._auth(request, "generate")
        req: ChatRequest = await self._parse(request, ChatRequest)
        m = self._model(request, req.model, "causal_lm")
        messages = []
        for msg in req.messages:
            content = msg.content if isinstance(msg.content, str) or msg.content is None else \
                "".join(p.text for p in msg.content)
            messages.append({"role": msg.role, "content": content or ""})
        asked = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        top = (req.top_logprobs or 0) if req.logprobs else None
        payload = {"messages": messages, "max_tokens": self._max_tokens(req.model, asked),
                   "temperature": req.temperature, "top_p": req.top_p, "stop": self._stops(req.stop),
                   "seed": req.seed, "logprobs": top, "stream": req.stream}
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        head = {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": req.model,
                "system_fingerprint": m["registry_id"]}
        if req.stream:
            started = await self._start(m, [payload])
            request.state.streaming = True
            return StreamingResponse(self._stream_chat(started, {**head, "object": "chat.completion.chunk"}, req,
                                                       messages), media_type="text/event-stream")
        started, (o,) = await self._generate(request, m, [payload], req.model)
        self.recent.remember(rid, chat_record(req.model, m["registry_id"], messages, o["text"]))
        return {**head, "choices": [{"index": 0, "message": {"role": "assistant", "content": o["text"]},
                                     "logprobs": self._chat_logprobs(o) if req.logprobs else None,
                                     "finish_reason": o["finish_reason"] or "length"}],
                "usage": self._usage(started, [o])}

    @staticmethod
    def _chat_logprobs(o: dict) -> dict:
        return {"content": [{"token": t, "logprob": lp, "bytes": list(t.encode("utf-8")),
                             "top_logprobs": [{"token": k, "logprob": v, "bytes": list(k.encode("utf-8"))}
                                              for k, v in (top or {}).items()]}
                            for t, lp, top in zip(o["token_texts"], o["logprobs"], o["top_logprobs"])]}

    async def _stream_chat(self, started: list, head: dict, req: ChatRequest, messages: list[dict]
                           ) -> AsyncIterator[str]:
        t0 = time.perf_counter()
        n, text, first = 0, [], True
        try:
            yield sse({**head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                             "logprobs": None, "finish_reason": None}]})
            async for _, ev in _merge([g for g, _ in started]):
                if first and ev["tokens"]:
                    metrics()["ttft"].observe(time.perf_counter() - t0, tags={"model": req.model})
                    first = False
                n += len(ev["tokens"])
                text.append(ev["text"])
                if ev["text"]:
                    lp = self._chat_logprobs(ev) if req.logprobs else None
                    yield sse({**head, "choices": [{"index": 0, "delta": {"content": ev["text"]}, "logprobs": lp,
                                                     "finish_reason": None}]})
                if ev["finish_reason"]:
                    yield sse({**head, "choices": [{"index": 0, "delta": {}, "logprobs": None,
                                                     "finish_reason": ev["finish_reason"]}]})
            if req.stream_options and req.stream_options.include_usage:
                p = started[0][1]["prompt_tokens"]
                yield sse({**head, "choices": [], "usage": {"prompt_tokens": p, "completion_tokens": n,
                                                             "total_tokens": p + n}})
            yield "data: [DONE]\n\n"
        except Exception:  # noqa: BLE001 - in-band error once the stream has begun
            ref = uuid.uuid4().hex[:12]
            log.exception("raylm: stream %s failed (reference %s)", head["id"], ref)
            yield sse(error_body(f"generation failed (reference {ref})", "server_error", "internal_error"))
            yield "data: [DONE]\n\n"
        finally:
            metrics()["tokens"].inc(n or 0, tags={"model": req.model})
            metrics()["latency"].observe(time.perf_counter() - t0, tags={"route": "/v1/chat/completions",
                                                                         "model": req.model})
            self.recent.remember(head["id"], chat_record(req.model, head["system_fingerprint"], messages,
                                                          "".join(text)))

    @app.post("/v1/classify", openapi_extra=body_schema(ClassifyRequest))
    async def classify(self, request: Request) -> dict:
        from ray.serve.exceptions import BackPressureError

        self._auth(request, "classify")
        req: ClassifyRequest = await self._parse(request, ClassifyRequest)
        m = self._model(request, req.model, "classification")
        texts = [req.texts] if isinstance(req.texts, str) else req.texts
        if not texts or len(texts) > 64:
            raise ApiError(400, "send 1 to 64 texts", param="texts")
        try:
            results = await self._classify(m, texts)
        except BackPressureError:
            raise ApiError(503, "the model's queue is full; retry shortly", "server_busy", "queue_full",
                           {"Retry-After": "1"}) from None
        rid = f"cls-{uuid.uuid4().hex}"
        self.recent.remember(rid, {"model": req.model, "version": m["registry_id"], "prompt": texts[0],
                                   "completion": results[0]["label"]})
        return {"id": rid, "object": "classification", "created": int(time.time()), "model": req.model,
                "system_fingerprint": m["registry_id"],
                "data": [{"index": i, **r} for i, r in enumerate(results)]}

    async def _classify(self, m: dict[str, Any], texts: list[str]) -> list[dict[str, Any]]:
        """The model's (or the ensemble's) answers, sent once more if a replica died under it."""
        async def once() -> list[dict[str, Any]]:
            if m.get("ensemble"):
                return self._combine(m, await asyncio.gather(*(h.classify.remote(texts) for h in m["handle"])))
            return await m["handle"].classify.remote(texts)

        return await _once_more_if_replica_lost(once, m["registry_id"])

    @staticmethod
    def _combine(m: dict[str, Any], member_results: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
        """The members' answers -> the ensemble's (tune/ensemble.py's combiner)."""
        import numpy as np

        from raylm.tune.ensemble import combine

        labels = m["ensemble"]["labels"]
        probs = np.array([[[r["probabilities"][label] for label in labels] for r in res] for res in member_results])
        out = []
        for p in combine(probs, m["ensemble"]).tolist():
            best = max(range(len(p)), key=p.__getitem__)
            out.append({"label": labels[best], "probabilities": dict(zip(labels, p))})
        return out

    @app.post("/v1/feedback", openapi_extra=body_schema(FeedbackRequest))
    async def feedback(self, request: Request) -> dict:
        from raylm import storage

        who = self._auth(request, "feedback")
        req: FeedbackRequest = await self._parse(request, FeedbackRequest)
        seen = await self.recent.recall(req.response_id)
        now = dt.datetime.now(dt.timezone.utc)
        record = {"id": f"fb-{uuid.uuid4().hex}", "response_id": req.response_id, "rating": req.rating,
                  "comment": req.comment, "model": (seen or {}).get("model") or req.model,
                  "model_version": (seen or {}).get("version"),
                  "prompt": (seen or {}).get("prompt"), "completion": (seen or {}).get("completion"),
                  "messages": (seen or {}).get("messages"),
                  "response_known": seen is not None, "key": who.name, "created": now.isoformat(timespec="seconds")}
        record["text"] = (record["prompt"] or "") + (record["completion"] or "")
        uri = storage.join(self.cfg.feedback_uri, f"date={now:%Y-%m-%d}",
                           f"{now:%H%M%S}-{record['id'][3:15]}.jsonl")
        await asyncio.get_running_loop().run_in_executor(None, storage.write_text, uri, json.dumps(record) + "\n")
        return {"id": record["id"], "object": "feedback", "stored": True, "response_known": seen is not None}


def app_builder(args: dict[str, Any]):
    """Import path for Serve configs (`raylm serve-config` writes `raylm.serve.app:app_builder`
    with the deploy config as `args`); the application graph is assembled in serve/graph.py."""
    from raylm.serve.graph import build

    return build(DeployConfig.model_validate(args))
