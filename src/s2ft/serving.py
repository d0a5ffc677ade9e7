"""`s2ft serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) for one base model and
many S²FT adapters, batching concurrent requests for different adapters into one
mixed-adapter forward.

Request path: an endpoint validates the request (pydantic; caps on `max_tokens`, prompt
tokens and body size), tokenizes it and puts it on the engine's queue. One worker thread
takes the first waiting request, waits up to `batch_window_ms` for more (up to
`max_batch_size`), and decodes them together. Every step is one forward of the whole batch
with `adapter_names` (the base model is `__base__`), a KV cache, left padding and explicit
position ids. Sampling is per row: greedy at temperature 0, else temperature + top-p with the
row's own seeded generator, so a seeded request samples the same tokens whatever it is batched
with. A row stops at EOS, a stop string, or `max_tokens`. Tokens stream back to the request's
asyncio queue (server-sent events when `stream=true`). If a batch fails, each of its requests
is retried alone, so one bad request fails alone and the others still get answers.

Adapters are the subdirectories of `--adapters-dir`; a subdirectory's name is the model name
clients use. `POST /admin/adapters` loads or unloads one by name (names are plain
identifiers; paths never leave the directory), guarded by a bearer API key when configured.
`/metrics` exposes request, batch, queue-time and token counters in Prometheus format.
"""

# no `from __future__ import annotations`: FastAPI must see the request models defined inside
# create_app() as classes, not as strings it cannot resolve
import asyncio
import json
import logging
import queue
import re
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from s2ft.data import left_pad

log = logging.getLogger("s2ft.serve")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-]{0,63}$")


@dataclass
class ServeConfig:
    """Options of `s2ft serve` (each is a flag)."""

    model: str = "smollm2"  # base model: 'smollm2', 'gemma3-270m', a Hub id, a directory or a .gguf file
    adapters_dir: str | None = None  # each subdirectory holding an S²FT adapter is served under its name
    host: str = "127.0.0.1"  # bind address (localhost by default)
    port: int = 8000
    base_name: str = "base"  # the model name under which the plain base model is served
    max_batch_size: int = 16  # requests decoded together
    batch_window_ms: float = 10.0  # how long the first request waits for others to batch with
    max_tokens: int = 512  # cap on a request's max_tokens
    max_prompt_tokens: int = 2048  # cap on a request's prompt length in tokens
    max_body_bytes: int = 1_000_000  # cap on a request body
    api_key: str | None = None  # bearer key for /admin/adapters (admin is disabled without one)
    schedule: str = "mixed"  # mixed: any adapters in one batch; switch: one adapter per batch, merged in place
    dtype: str = "auto"
    device: str = "auto"

    def __post_init__(self) -> None:
        for name in ("max_batch_size", "max_tokens", "max_prompt_tokens", "max_body_bytes", "port"):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')}: must be positive, got {getattr(self, name)}")
        if self.batch_window_ms < 0:
            raise ValueError(f"--batch-window-ms: must be >= 0, got {self.batch_window_ms}")
        if self.schedule not in ("mixed", "switch"):
            raise ValueError(f"--schedule: must be 'mixed' or 'switch', got {self.schedule!r}")
        if not NAME_RE.match(self.base_name):
            raise ValueError(f"--base-name: {self.base_name!r} is not a plain name")


class RequestError(Exception):
    """A client error: HTTP `status`, a message naming the field (`param`)."""

    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param = status, message, param


@dataclass
class GenRequest:
    prompt_ids: list[int]
    adapter: str  # adapter name, or "__base__"
    max_tokens: int
    temperature: float
    top_p: float
    stop: list[str]
    seed: int | None
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue
    enqueued: float = field(default_factory=time.monotonic)

    def emit(self, *event: Any) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)


# ---------------------------------------------------------------------------------------------
# Engine: model, adapters, batching worker


class Engine:
    def __init__(self, cfg: ServeConfig) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        from s2ft.loading import load_model, load_tokenizer

        self.cfg = cfg
        device = None if cfg.device == "auto" else torch.device(cfg.device)
        dtype = None if cfg.dtype == "auto" else getattr(torch, cfg.dtype)
        self.base = load_model(cfg.model, dtype=dtype, device=device).eval()
        self.tokenizer = load_tokenizer(cfg.model)
        self.device = next(self.base.parameters()).device
        self.model: Any = None  # an S2FTModel once an adapter is loaded
        self.lock = threading.Lock()  # the worker and admin operations take turns on the model
        self.queue: queue.Queue[GenRequest] = queue.Queue()
        self.adapters_dir = Path(cfg.adapters_dir).resolve() if cfg.adapters_dir else None

        self.registry = CollectorRegistry()
        self.m_requests = Counter(
            "s2ft_requests", "Requests by model and outcome", ["model", "outcome"], registry=self.registry
        )
        self.m_batches = Counter("s2ft_batches", "Batches decoded", registry=self.registry)
        self.m_batch_size = Histogram(
            "s2ft_batch_size", "Requests per batch", buckets=(1, 2, 4, 8, 16, 32, 64), registry=self.registry
        )
        self.m_adapters_per_batch = Histogram(
            "s2ft_batch_adapters", "Distinct models per batch", buckets=(1, 2, 4, 8, 16), registry=self.registry
        )
        self.m_queue = Histogram("s2ft_queue_seconds", "Time from arrival to decoding", registry=self.registry)
        self.m_tokens = Counter("s2ft_generated_tokens", "Tokens generated", registry=self.registry)
        self.m_prompt_tokens = Counter("s2ft_prompt_tokens", "Prompt tokens processed", registry=self.registry)
        self.m_tps = Gauge("s2ft_tokens_per_second", "Generated tokens/s of the last batch", registry=self.registry)
        self.m_loaded = Gauge("s2ft_adapters_loaded", "Adapters loaded", registry=self.registry)

        if self.adapters_dir is not None:
            if not self.adapters_dir.is_dir():
                raise FileNotFoundError(f"--adapters-dir {self.adapters_dir}: no such directory")
            for sub in sorted(self.adapters_dir.iterdir()):
                if (sub / "s2ft_config.json").is_file():
                    try:
                        self.load_adapter(sub.name)
                    except Exception as e:  # one bad adapter must not keep the others offline
                        log.error("skipping adapter %s: %s", sub.name, e)
        threading.Thread(target=self._worker, name="s2ft-batcher", daemon=True).start()

    # --------------------------------------------------------------- adapters

    @property
    def adapter_names(self) -> list[str]:
        return [] if self.model is None else list(self.model.adapters)

    def models(self) -> list[str]:
        return [self.cfg.base_name, *self.adapter_names]

    def resolve_name(self, name: str) -> str:
        """Client model name -> internal adapter name (`__base__` for the base model)."""
        if name == self.cfg.base_name:
            return "__base__"
        if name in self.adapter_names:
            return name
        raise RequestError(404, f"model {name!r} not found; available models: {self.models()}", "model")

    def _adapter_path(self, name: str) -> Path:
        if self.adapters_dir is None:
            raise RequestError(400, "the server was started without --adapters-dir", "name")
        if not isinstance(name, str) or not NAME_RE.match(name) or name == self.cfg.base_name:
            raise RequestError(400, f"invalid adapter name {name!r}: letters, digits, '_' and '-' only", "name")
        path = self.adapters_dir / name  # a symlink placed in the directory by its owner is fine
        if path.parent != self.adapters_dir or name in (".", ".."):  # the name regex already forbids this
            raise RequestError(400, f"invalid adapter name {name!r}", "name")
        return path

    def load_adapter(self, name: str) -> None:
        from s2ft.model import S2FTModel

        path = self._adapter_path(name)
        if not path.is_dir():
            raise RequestError(404, f"no adapter directory {name!r} in {self.adapters_dir}", "name")
        with self.lock:
            if name in self.adapter_names:
                raise RequestError(409, f"adapter {name!r} is already loaded", "name")
            if self.model is None:
                self.model = S2FTModel.from_pretrained(self.base, path, adapter_name=name)
                self.model.set_adapter("__base__")
            else:
                self.model.load_adapter(path, adapter_name=name)
        self.m_loaded.set(len(self.adapter_names))
        log.info("loaded adapter %s from %s", name, path)

    def unload_adapter(self, name: str) -> None:
        with self.lock:
            if name not in self.adapter_names:
                raise RequestError(404, f"adapter {name!r} is not loaded; loaded: {self.adapter_names}", "name")
            self.model.delete_adapter(name)
        self.m_loaded.set(len(self.adapter_names))
        log.info("unloaded adapter %s", name)

    # --------------------------------------------------------------- batching

    def submit(self, req: GenRequest) -> None:
        self.queue.put(req)

    def _worker(self) -> None:
        pending: list[GenRequest] = []  # switch schedule: requests waiting for their adapter's turn
        while True:
            if not pending:
                pending.append(self.queue.get())
            deadline = time.monotonic() + self.cfg.batch_window_ms / 1000
            while len(pending) < 4 * self.cfg.max_batch_size:
                try:
                    pending.append(self.queue.get(timeout=max(0.0, deadline - time.monotonic())))
                except queue.Empty:
                    break
            if self.cfg.schedule == "switch":  # the oldest request's adapter goes next
                batch = [r for r in pending if r.adapter == pending[0].adapter][: self.cfg.max_batch_size]
            else:
                batch = pending[: self.cfg.max_batch_size]
            pending = [r for r in pending if not any(r is b for b in batch)]
            with self.lock:
                self._run(batch)

    def _run(self, batch: list[GenRequest]) -> None:
        try:
            self._decode(batch)
        except Exception as e:
            if len(batch) == 1:
                log.exception("request failed")
                batch[0].emit("error", f"generation failed: {type(e).__name__}: {e}")
                return
            log.warning("batch of %d failed (%s); retrying its requests one by one", len(batch), e)
            for req in batch:
                self._run([req])

    @torch.no_grad()
    def _decode(self, batch: list[GenRequest]) -> None:
        t0 = time.monotonic()
        for req in batch:
            self.m_queue.observe(t0 - req.enqueued)
        tok = self.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        eos = {tok.eos_token_id} if tok.eos_token_id is not None else set()
        b = len(batch)
        ids, mask, positions = left_pad([r.prompt_ids for r in batch], pad)  # every next token at the end
        ids, mask, positions = ids.to(self.device), mask.to(self.device), positions.to(self.device)
        names = [r.adapter for r in batch]
        run = self.model if self.model is not None else self.base
        kwargs: dict[str, Any] = {}
        if self.model is not None and self.cfg.schedule == "switch":  # one adapter, merged in place
            if self.model.active_adapter != names[0]:
                self.model.set_adapter(names[0])  # in merged mode: unmerge the old blocks, merge the new
            if not self.model.merge_mode and names[0] != "__base__":
                self.model.merge()
        elif self.model is not None:
            kwargs["adapter_names"] = names
        gens = [torch.Generator(device="cpu").manual_seed(r.seed) if r.seed is not None else None for r in batch]
        out = run(
            input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1, **kwargs
        )
        generated: list[list[int]] = [[] for _ in batch]
        sent = [""] * b
        done = [False] * b
        n_tokens = 0
        for _ in range(max(r.max_tokens for r in batch)):
            logits = out.logits[:, -1].float().cpu()  # (B, V)
            nxt = torch.full((b,), pad, dtype=torch.long)
            for i, r in enumerate(batch):
                if done[i]:
                    continue
                t = _sample(logits[i], r.temperature, r.top_p, gens[i])
                nxt[i] = t
                n_tokens += 1
                finish = None
                if t in eos:
                    finish = "stop"
                else:
                    generated[i].append(t)
                text = tok.decode(generated[i], skip_special_tokens=True)
                cut = _find_stop(text, r.stop)
                if cut is not None:
                    text, finish = text[:cut], "stop"
                elif finish is None and len(generated[i]) >= r.max_tokens:
                    finish = "length"
                hold = 0 if finish else _stop_prefix_len(text, r.stop)  # do not stream a possible stop's start
                if len(text) - hold > len(sent[i]):
                    r.emit("text", text[len(sent[i]) : len(text) - hold])
                    sent[i] = text[: len(text) - hold]
                if finish:
                    done[i] = True
                    r.emit("done", finish, len(r.prompt_ids), len(generated[i]))
            if all(done):
                break
            mask = torch.cat([mask, torch.ones((b, 1), dtype=mask.dtype, device=mask.device)], 1)
            positions = positions[:, -1:] + 1
            out = run(
                input_ids=nxt.unsqueeze(1).to(self.device),
                attention_mask=mask,
                position_ids=positions,
                past_key_values=out.past_key_values,
                use_cache=True,
                **kwargs,
            )
        seconds = time.monotonic() - t0
        self.m_batches.inc()
        self.m_batch_size.observe(b)
        self.m_adapters_per_batch.observe(len(set(names)))
        self.m_tokens.inc(n_tokens)
        self.m_prompt_tokens.inc(sum(len(r.prompt_ids) for r in batch))
        self.m_tps.set(n_tokens / max(seconds, 1e-9))
        log.info(
            "batch of %d (%d models) in %.2fs: %d tokens, %.1f tokens/s, queue %.3fs max",
            b,
            len(set(names)),
            seconds,
            n_tokens,
            n_tokens / max(seconds, 1e-9),
            max(t0 - r.enqueued for r in batch),
        )


def _sample(logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator | None) -> int:
    if temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1:
        sorted_p, order = probs.sort(descending=True)
        keep = sorted_p.cumsum(0) - sorted_p < top_p  # the smallest prefix reaching top_p
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
    return int(torch.multinomial(probs, 1, generator=gen))


def _find_stop(text: str, stops: list[str]) -> int | None:
    hits = [text.find(s) for s in stops if s and s in text]
    return min(hits) if hits else None


def _stop_prefix_len(text: str, stops: list[str]) -> int:
    """Length of the longest end of `text` that is a proper prefix of a stop string."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                best = max(best, k)
                break
    return best


# ---------------------------------------------------------------------------------------------
# HTTP


def create_app(engine: Engine) -> Any:
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
    from pydantic import BaseModel, ConfigDict, Field

    cfg = engine.cfg

    class Message(BaseModel):
        role: Literal["system", "user", "assistant", "tool", "developer"]
        content: str

    class Common(BaseModel):
        model_config = ConfigDict(extra="ignore")  # OpenAI clients send fields we do not use
        model: str
        max_tokens: int | None = Field(default=None, ge=1)
        max_completion_tokens: int | None = Field(default=None, ge=1)
        temperature: float = Field(default=1.0, ge=0.0, le=2.0)
        top_p: float = Field(default=1.0, gt=0.0, le=1.0)
        stop: str | list[str] | None = None
        stream: bool = False
        seed: int | None = None
        n: int = Field(default=1, ge=1, le=1)

    class CompletionBody(Common):
        prompt: str | list[str]

    class ChatBody(Common):
        messages: list[Message] = Field(min_length=1)

    class AdminBody(BaseModel):
        action: Literal["load", "unload"]
        name: str

    app = FastAPI(title="s2ft serve", version="1")

    def error(status: int, message: str, param: str | None = None) -> JSONResponse:
        kind = "invalid_request_error" if status < 500 else "server_error"
        return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": status}}, status)

    @app.exception_handler(RequestError)
    async def _request_error(_: Request, e: RequestError) -> JSONResponse:
        return error(e.status, e.message, e.param)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0]
        if first.get("type") == "json_invalid":
            return error(400, f"malformed JSON body: {first.get('ctx', {}).get('error', first.get('msg'))}")
        param = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return error(422, f"invalid field {param!r}: {first.get('msg')}", param)

    def prepare(body: Common, prompt_ids: list[int]) -> GenRequest:
        adapter = engine.resolve_name(body.model)
        max_tokens = body.max_completion_tokens or body.max_tokens or 16
        if max_tokens > cfg.max_tokens:
            raise RequestError(
                400, f"max_tokens={max_tokens} exceeds this server's limit of {cfg.max_tokens}", "max_tokens"
            )
        if len(prompt_ids) > cfg.max_prompt_tokens:
            raise RequestError(
                400, f"prompt has {len(prompt_ids)} tokens; this server's limit is {cfg.max_prompt_tokens}", "prompt"
            )
        if not prompt_ids:
            raise RequestError(400, "prompt is empty", "prompt")
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stop) > 4:
            raise RequestError(400, "at most 4 stop sequences", "stop")
        return GenRequest(
            prompt_ids=prompt_ids,
            adapter=adapter,
            max_tokens=max_tokens,
            temperature=body.temperature,
            top_p=body.top_p,
            stop=stop,
            seed=body.seed,
            loop=asyncio.get_running_loop(),
            events=asyncio.Queue(),
        )

    async def respond(req: GenRequest, body: Common, chat: bool) -> Any:
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        obj = "chat.completion" if chat else "text_completion"
        engine.submit(req)

        def choice(text: str | None, finish: str | None, first: bool = False) -> dict:
            if not chat:
                return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
            delta: dict[str, str] = {"role": "assistant"} if first else {}
            if text:
                delta["content"] = text
            return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}

        if body.stream:

            async def events():
                head = {"id": rid, "object": obj + (".chunk" if chat else ""), "created": created, "model": body.model}
                first = True
                while True:
                    kind, *rest = await req.events.get()
                    if kind == "text":
                        yield f"data: {json.dumps({**head, 'choices': [choice(rest[0], None, first)]})}\n\n"
                        first = False
                    elif kind == "done":
                        engine.m_requests.labels(body.model, "ok").inc()
                        yield f"data: {json.dumps({**head, 'choices': [choice(None, rest[0], first)]})}\n\n"
                        break
                    else:
                        engine.m_requests.labels(body.model, "error").inc()
                        yield f"data: {json.dumps({'error': {'message': rest[0], 'type': 'server_error'}})}\n\n"
                        break
                yield "data: [DONE]\n\n"

            return StreamingResponse(events(), media_type="text/event-stream")

        text = ""
        while True:
            kind, *rest = await req.events.get()
            if kind == "text":
                text += rest[0]
            elif kind == "done":
                finish, n_prompt, n_gen = rest
                break
            else:
                engine.m_requests.labels(body.model, "error").inc()
                return error(500, rest[0])
        engine.m_requests.labels(body.model, "ok").inc()
        if chat:
            ch = {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": None,
                "finish_reason": finish,
            }
        else:
            ch = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        usage = {"prompt_tokens": n_prompt, "completion_tokens": n_gen, "total_tokens": n_prompt + n_gen}
        return {"id": rid, "object": obj, "created": created, "model": body.model, "choices": [ch], "usage": usage}

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "models": engine.models()}

    @app.get("/v1/models")
    async def list_models() -> dict:
        data = [{"id": m, "object": "model", "created": 0, "owned_by": "s2ft"} for m in engine.models()]
        return {"object": "list", "data": data}

    @app.post("/v1/completions")
    async def completions(body: CompletionBody) -> Any:
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if len(prompts) != 1:
            raise RequestError(400, "send one prompt per request (a list of exactly one string)", "prompt")
        ids = engine.tokenizer(prompts[0], add_special_tokens=True)["input_ids"]
        return await respond(prepare(body, ids), body, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatBody) -> Any:
        if not getattr(engine.tokenizer, "chat_template", None):
            raise RequestError(400, "this model has no chat template; use /v1/completions", "messages")
        msgs = [m.model_dump() for m in body.messages]
        text = engine.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        ids = engine.tokenizer(text, add_special_tokens=False)["input_ids"]
        return await respond(prepare(body, ids), body, chat=True)

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return PlainTextResponse(generate_latest(engine.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/admin/adapters")
    async def admin(body: AdminBody, request: Request) -> dict:
        if not cfg.api_key:
            raise RequestError(403, "admin is disabled: start the server with --api-key to enable it")
        if request.headers.get("authorization") != f"Bearer {cfg.api_key}":
            raise RequestError(401, "missing or wrong API key (Authorization: Bearer KEY)")
        fn = engine.load_adapter if body.action == "load" else engine.unload_adapter
        await asyncio.to_thread(fn, body.name)
        return {"status": "ok", "action": body.action, "name": body.name, "models": engine.models()}

    return BodyLimit(app, cfg.max_body_bytes)


class BodyLimit:
    """ASGI middleware: 413 for request bodies over `limit` bytes (declared or streamed)."""

    class TooLarge(Exception):
        pass

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        from fastapi.responses import JSONResponse

        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_large = JSONResponse(
            {"error": {"message": f"request body exceeds {self.limit} bytes", "type": "invalid_request_error"}}, 413
        )
        declared = dict(scope.get("headers", [])).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await too_large(scope, receive, send)
        seen = 0

        async def limited() -> dict:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise BodyLimit.TooLarge
            return message

        try:
            await self.app(scope, limited, send)
        except BodyLimit.TooLarge:
            await too_large(scope, receive, send)


def serve(cfg: ServeConfig) -> None:
    """Load the model and adapters, then serve until interrupted."""
    import uvicorn

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    engine = Engine(cfg)
    log.info("serving %s on http://%s:%d", engine.models(), cfg.host, cfg.port)
    uvicorn.run(create_app(engine), host=cfg.host, port=cfg.port, log_level="info")
