"""`nexus serve`: an OpenAI-compatible completions server over one model, and its playground.

It owns the HTTP API (`POST /v1/completions`, streamed as server-sent events or not;
`GET /v1/models`; `GET /health`; the playground page at `/`), the checking of requests (a
mistake is a 400 naming the field, in OpenAI's error shape), and the scheduling: one worker
thread decodes every request, because a single decode already keeps the CPU busy and
PyTorch's thread settings belong to the whole process. The worker serves the active requests
in turn, a few characters at a time, so every stream moves; at most `max_active` are decoded at
once and `max_queue` more wait, and a request beyond those gets a 503. A client that leaves
frees its place at once. Generation is `nexus.generation.stream`, the call `nexus sample`
makes, so the same prompt, settings and seed give the same text as there. FastAPI and
uvicorn are an optional extra (`pip install 'nexus[serve]'`), imported only here.
"""

from __future__ import annotations

import asyncio
import ipaddress
import itertools
import json
import secrets
import socket
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from importlib import resources
from typing import TYPE_CHECKING, Any

from nexus.errors import NexusError
from nexus.generation import as_text, stream
from nexus.model import NexusLM
from nexus.sampling import Sampling

try:  # the optional extra `serve`: without it, `run` says how to install it
    import uvicorn
    from fastapi import FastAPI, Request
    from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
except ImportError:
    STACK_PRESENT = False
else:
    STACK_PRESENT = True

if TYPE_CHECKING:
    import argparse

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for the completions API
MAX_STOP_SEQUENCES = 4  # OpenAI's limit
RETRY_AFTER_S = 1
# A turn of the worker gives a job this many text pieces (a character each, mostly): few
# enough that every stream moves smoothly, enough that sending them costs less than making.
PIECES_PER_TURN = 8


@dataclass(frozen=True)
class ServeSettings:
    """What the server is called and how much it takes on (`nexus serve`'s flags)."""

    model_name: str
    max_active: int  # requests decoded in turn
    max_queue: int  # requests waiting for one of those places
    max_prompt_bytes: int
    max_tokens_limit: int  # the largest max_tokens a request may ask for


class BadRequest(Exception):
    """A request the server cannot take: `param` names the field at fault (None: the body)."""

    def __init__(self, param: str | None, message: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class CompletionRequest:
    """A checked `POST /v1/completions` body."""

    prompt: bytes
    max_tokens: int
    sampling: Sampling
    seed: int
    stop: list[bytes]
    stream: bool = False
    echo: bool = False  # the text starts with the prompt
    include_usage: bool = False  # a last streamed chunk carries the usage


_KINDS = {int: "an integer", float: "a number", str: "a string", bool: "a boolean"}


def _take(body: dict[str, Any], name: str, kind: type, default: Any) -> Any:
    """body[name] if it has the JSON type `kind`, `default` if it is missing or null."""
    value = body.get(name)
    if value is None:
        return default
    accepted = (int, float) if kind is float else kind
    if isinstance(value, bool) is not (kind is bool) or not isinstance(value, accepted):
        raise BadRequest(name, f"'{name}' must be {_KINDS[kind]}, not {json.dumps(value)[:40]}")
    return float(value) if kind is float else value


def _utf8(text: str, param: str) -> bytes:
    try:
        return text.encode()
    except UnicodeEncodeError:  # JSON can spell a lone surrogate (\ud800), which no text holds
        raise BadRequest(param, f"'{param}' is not valid Unicode text") from None


def parse_request(body: Any, settings: ServeSettings) -> CompletionRequest:
    """Check a decoded JSON body as OpenAI's API does, plus `top_k` and `seed` (as vLLM)."""
    if not isinstance(body, dict):
        raise BadRequest(None, "the body must be a JSON object")
    _take(body, "model", str, None)  # any name is taken: the server has one model
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise BadRequest("prompt", "'prompt' must be a string (or a list of one string)")
    prompt_bytes = _utf8(prompt, "prompt")
    if len(prompt_bytes) > settings.max_prompt_bytes:
        raise BadRequest(
            "prompt",
            f"the prompt is {len(prompt_bytes)} bytes; this server takes at most "
            f"{settings.max_prompt_bytes}",
        )
    max_tokens = _take(body, "max_tokens", int, DEFAULT_MAX_TOKENS)
    if not 1 <= max_tokens <= settings.max_tokens_limit:
        raise BadRequest(
            "max_tokens",
            f"'max_tokens' must be from 1 to {settings.max_tokens_limit} (bytes), not {max_tokens}",
        )
    top_k = _take(body, "top_k", int, 0)
    try:
        sampling = Sampling(
            temperature=_take(body, "temperature", float, 1.0),
            top_k=0 if top_k == -1 else top_k,  # vLLM's spelling of "off" too
            top_p=_take(body, "top_p", float, 1.0),
        )
    except ValueError as error:  # its message starts with the setting's name
        raise BadRequest(str(error).split()[0], str(error)) from None
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else stop or []
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise BadRequest("stop", "'stop' must be a string or a list of strings")
    if len(stop) > MAX_STOP_SEQUENCES:
        raise BadRequest("stop", f"'stop' takes at most {MAX_STOP_SEQUENCES} sequences")
    if _take(body, "n", int, 1) != 1:
        raise BadRequest("n", "this server makes one completion per request: 'n' must be 1")
    if body.get("logprobs") is not None:
        raise BadRequest("logprobs", "this server does not return logprobs")
    stream_options = body.get("stream_options") or {}
    if not isinstance(stream_options, dict):
        raise BadRequest("stream_options", "'stream_options' must be an object")
    seed = _take(body, "seed", int, None)
    return CompletionRequest(
        prompt=prompt_bytes,
        max_tokens=max_tokens,
        sampling=sampling,
        seed=secrets.randbits(64) if seed is None else seed,
        stop=[_utf8(s, "stop") for s in stop],
        stream=_take(body, "stream", bool, False),
        echo=_take(body, "echo", bool, False),
        include_usage=_take(stream_options, "include_usage", bool, False),
    )


_END = object()  # the last item a job sends when generation ended well


@dataclass(eq=False)
class Job:
    """One request in the engine. The worker thread sends text pieces, then `_END` or the
    exception that stopped it; the reader, on the event loop `loop`, takes all that came at
    once. The worker wakes the loop only for the first piece after a take: waking it costs the
    worker's thread the interpreter lock for a while, too much to pay per byte."""

    request: CompletionRequest
    loop: asyncio.AbstractEventLoop
    completion_tokens: int = 0  # bytes generated so far (the model's tokens are bytes)
    cancelled: bool = False
    pieces: Iterator[str] | None = None  # the worker's, made on its first turn
    _sent: list[Any] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _arrived: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def finish_reason(self) -> str:
        """Meaningful once generation ended: fewer bytes than asked means a stop sequence."""
        return "length" if self.completion_tokens == self.request.max_tokens else "stop"

    def send(self, item: object) -> None:
        with self._lock:
            self._sent.append(item)
            first = len(self._sent) == 1
        if first:
            try:
                self.loop.call_soon_threadsafe(self._arrived.set)
            except RuntimeError:  # the event loop has closed: nobody is left to read
                self.cancelled = True

    async def received(self) -> list[Any]:
        """Everything sent since the last call (waiting for something)."""
        await self._arrived.wait()
        with self._lock:
            self._arrived.clear()
            items, self._sent = self._sent, []
        return items

    def generated(self, model: NexusLM) -> Iterator[bytes]:
        r = self.request
        for chunk in stream(model, r.prompt, r.max_tokens, r.sampling, seed=r.seed, stop=r.stop):
            self.completion_tokens += len(chunk)
            yield chunk


class Engine:
    """The worker thread that decodes every job, and the bounded places jobs hold."""

    def __init__(self, model: NexusLM, max_active: int, max_queue: int) -> None:
        self.model = model
        self.max_active, self.max_queue = max_active, max_queue
        self._changed = threading.Condition()
        self._waiting: deque[Job] = deque()
        self._active: list[Job] = []
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="nexus-serve-decode", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        with self._changed:
            self._closed = True
            self._changed.notify()
        self._thread.join()

    def load(self) -> dict[str, int]:
        with self._changed:
            return {"active": len(self._active), "waiting": len(self._waiting)}

    def submit(self, job: Job) -> bool:
        """Take the job unless every place is held."""
        with self._changed:
            if len(self._active) + len(self._waiting) >= self.max_active + self.max_queue:
                return False
            self._waiting.append(job)
            self._changed.notify()
            return True

    def cancel(self, job: Job) -> None:
        """Stop the job where it is (a no-op once it ended); its place is free at once."""
        with self._changed:
            job.cancelled = True
            if job in self._waiting:
                self._waiting.remove(job)

    def _run(self) -> None:
        while True:
            with self._changed:
                while not (self._waiting or self._active or self._closed):
                    self._changed.wait()
                if self._closed:
                    return
                while self._waiting and len(self._active) < self.max_active:
                    self._active.append(self._waiting.popleft())
                turn = list(self._active)
            for job in turn:
                if not self._advance(job):
                    with self._changed:
                        self._active.remove(job)

    def _advance(self, job: Job) -> bool:
        """Give the job its turn: its next few text pieces. False once it has ended."""
        if job.cancelled:
            return False
        pieces: list[str] = []
        ended: object = None
        try:
            if job.pieces is None:  # the first turn: prefill the prompt
                echoed = job.request.prompt if job.request.echo else b""
                job.pieces = as_text(job.generated(self.model), prefix=echoed)
            for piece in itertools.islice(job.pieces, PIECES_PER_TURN):
                pieces.append(piece)
            if len(pieces) < PIECES_PER_TURN:
                ended = _END
        except Exception as error:  # one request's failure must not stop the server
            ended = error
        if pieces:
            job.send("".join(pieces))
        if ended is not None:
            job.send(ended)
        return ended is None


async def _texts(job: Job) -> AsyncIterator[str]:
    """The job's text as it arrives: each piece is everything that came since the last."""
    while True:
        items = await job.received()
        text = "".join(item for item in items if isinstance(item, str))
        if text:
            yield text
        if items[-1] is _END:
            return
        if isinstance(items[-1], Exception):
            raise items[-1]


def _error_body(message: str, kind: str, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}


def _playground() -> str:
    return resources.files("nexus").joinpath("playground.html").read_text(encoding="utf-8")


def create_app(model: NexusLM, settings: ServeSettings) -> FastAPI:
    """The server's ASGI application; its worker thread runs while the application does."""
    _require_stack()
    engine = Engine(model, settings.max_active, settings.max_queue)
    started = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        try:
            yield
        finally:
            engine.close()

    app = FastAPI(title="Nexus", lifespan=lifespan)

    def error(status: int, message: str, kind: str, param: str | None = None) -> JSONResponse:
        headers = {"Retry-After": str(RETRY_AFTER_S)} if status == 503 else None
        return JSONResponse(_error_body(message, kind, param), status, headers=headers)

    @app.get("/", response_class=HTMLResponse)
    def playground() -> str:
        return _playground()

    @app.get("/health")
    def health() -> dict[str, Any]:
        return {"status": "ok", **engine.load()}

    @app.get("/v1/models")
    def models() -> dict[str, Any]:
        card = {"id": settings.model_name, "object": "model", "created": started}
        return {"object": "list", "data": [{**card, "owned_by": "nexus"}]}

    @app.post("/v1/completions")
    async def completions(http: Request) -> Response:
        try:
            body = json.loads(await http.body())
        except ValueError as bad:  # not JSON, or not UTF-8
            return error(400, f"the body is not valid JSON: {bad}", "invalid_request_error")
        try:
            request = parse_request(body, settings)
        except BadRequest as bad:
            return error(400, str(bad), "invalid_request_error", bad.param)
        job = Job(request, asyncio.get_running_loop())
        if not engine.submit(job):
            busy = f"the server is busy ({settings.max_active + settings.max_queue} requests)"
            return error(503, f"{busy}; try again shortly", "server_error")
        head = {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": settings.model_name,
        }
        if request.stream:
            events = _events(job, engine, head)
            headers = {"Cache-Control": "no-cache"}
            return StreamingResponse(events, media_type="text/event-stream", headers=headers)
        try:
            whole = await _whole(job, engine, http)
        except Exception as failure:
            return error(500, f"generation failed: {failure}", "server_error")
        if whole is None:  # nobody is left to answer
            return Response(status_code=499)
        return JSONResponse({**head, **whole})

    return app


def _usage(job: Job) -> dict[str, int]:
    prompt_tokens = len(job.request.prompt)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": job.completion_tokens,
        "total_tokens": prompt_tokens + job.completion_tokens,
    }


def _choice(text: str, finish_reason: str | None) -> dict[str, Any]:
    return {"text": text, "index": 0, "logprobs": None, "finish_reason": finish_reason}


async def _events(job: Job, engine: Engine, head: dict[str, Any]) -> AsyncIterator[str]:
    """Server-sent events: a chunk per piece of text, a last one with the finish reason (and
    one with the usage, when asked for), then `[DONE]`. If the client leaves, Starlette cancels
    this generator and the job goes with it."""

    def event(payload: object) -> str:
        return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"

    try:
        try:
            async for text in _texts(job):
                yield event({**head, "choices": [_choice(text, None)]})
            yield event({**head, "choices": [_choice("", job.finish_reason)]})
            if job.request.include_usage:
                yield event({**head, "choices": [], "usage": _usage(job)})
        except Exception as failure:  # the status line has gone: say it in the stream
            yield event(_error_body(f"generation failed: {failure}", "server_error"))
        yield event("[DONE]")
    finally:
        engine.cancel(job)


async def _whole(job: Job, engine: Engine, http: Request) -> dict[str, Any] | None:
    """The choices and usage of the whole completion; None, and no more generating, if the
    client leaves first."""

    async def joined() -> str:
        return "".join([text async for text in _texts(job)])

    async def client_left() -> None:
        while (await http.receive())["type"] != "http.disconnect":
            pass

    text, left = asyncio.ensure_future(joined()), asyncio.ensure_future(client_left())
    try:
        await asyncio.wait({text, left}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        engine.cancel(job)
        text.cancel()
        left.cancel()
    if not text.done() or text.cancelled():
        return None
    return {"choices": [_choice(text.result(), job.finish_reason)], "usage": _usage(job)}


def _require_stack() -> None:
    if not STACK_PRESENT:
        raise NexusError("nexus serve needs FastAPI and uvicorn: pip install 'nexus[serve]'")


def _listen(host: str, port: int) -> socket.socket:
    """A socket bound to host:port (port 0: any free one), or a NexusError saying why not."""
    try:
        family, kind, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as error:
        raise NexusError(
            f"cannot listen on {host} port {port}: {error.strerror or error}; "
            "pass another --port (0: any free one) or --host"
        ) from None
    return sock


def run(args: argparse.Namespace) -> int:
    """`nexus serve`: load the checkpoint and serve it until interrupted."""
    from nexus.cli import load_model_for_use

    _require_stack()
    for name in ("max_active", "max_prompt_bytes", "max_tokens_limit"):
        if getattr(args, name) < 1:
            raise NexusError(f"--{name} must be at least 1")
    if args.max_queue < 0:
        raise NexusError("--max_queue must be at least 0")
    sock = _listen(args.host, args.port)
    model, _ = load_model_for_use(args.checkpoint, args.threads)
    settings = ServeSettings(
        model_name=args.model_name or args.checkpoint,
        max_active=args.max_active,
        max_queue=args.max_queue,
        max_prompt_bytes=args.max_prompt_bytes,
        max_tokens_limit=args.max_tokens_limit,
    )
    host, port = sock.getsockname()[:2]
    where = f"http://{f'[{host}]' if ':' in host else host}:{port}"
    if not ipaddress.ip_address(host).is_loopback:
        print(f"nexus: listening on {host}: whoever reaches it may use it (there are no keys)")
    print(f"nexus: the playground is at {where}/, the API at {where}/v1", flush=True)
    app = create_app(model, settings)
    config = uvicorn.Config(app, host=host, port=port, timeout_graceful_shutdown=5)
    # uvicorn raises Ctrl-C again once it has shut down; for a server it is no error.
    with suppress(KeyboardInterrupt):
        uvicorn.Server(config).run(sockets=[sock])
    return 0
