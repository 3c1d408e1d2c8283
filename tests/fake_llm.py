"""A fake OpenAI-compatible chat server for tests and benchmarks: real HTTP on 127.0.0.1.

    from fake_llm import FakeLLM, Reply

    with FakeLLM(responder=lambda req: "a caption") as llm:       # port 0: the OS picks one
        client = ChatClient(llm.url, "fake")                         # llm.url = http://127.0.0.1:PORT/v1
        llm.push(Reply.error(429, retry_after=1), Reply.hang(5))     # the next two requests misbehave
        ...
        llm.requests                                                 # what the server received

Each POST /v1/chat/completions takes the next scripted Reply from the queue (push), else asks
`responder(request)` (a FakeRequest; return a str, a dict (the JSON body) or a Reply), else
answers `default`. Faults: any status code, a Retry-After header, a delay (a hang when it is
longer than the client's timeout), a malformed body, empty content, arbitrary text.
`latency` delays every reply (the benchmark's 200 ms server); `slots` bounds the requests served
at once (more wait their turn, as on a real server with a fixed batch). GET /v1/models lists one
model.

Several servers: start several (each on its own port, or a fixed `port` to restart one where it
was). A server dies mid-run with stop() or `die_after=N` (it stops itself after N requests): the
requests in flight get their connection closed without a reply, and later ones are refused.
Structured output (response_format): structured=None ignores it, "refuse" answers 400 naming
response_format to any (a server without structured output), "check" answers 400 unless it is a
well-formed json_schema request, "llama-cpp" answers as llama-cpp-python 0.3's server does (500
naming response_format.type unless it is json_object, whose optional "schema" it takes);
FakeRequest.schema is the schema a request carried (in either form).
Image parts (OpenAI's {"type": "image_url", ...} in a message's content list) are recorded:
request.image_urls, request.images() (decoded by Pillow). vision=False answers a request that
has any the way llama-cpp-python's server does for a model without a vision projector (HTTP
500, its chat template meeting a list: IMAGE_REFUSAL below).
"""
from __future__ import annotations

import json
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

# What llama-cpp-python 0.3.36's server answers to image parts when it serves SmolLM2-135M-Instruct
# (no vision projector; its template concatenates the content as a string), seen on a real one.
IMAGE_REFUSAL = 'can only concatenate str (not "list") to str'


@dataclass
class Reply:
    """One scripted answer. text=None with status 200 means `content: null`."""

    text: str | None = "ok"
    status: int = 200
    retry_after: str | float | None = None     # seconds, or an HTTP-date string
    delay: float = 0.0                          # seconds to wait before answering
    raw: bytes | None = None                    # send these bytes as the body instead of JSON
    headers: dict = field(default_factory=dict)

    @classmethod
    def error(cls, status: int, retry_after: str | float | None = None, message: str = "fake error") -> "Reply":
        body = json.dumps({"error": {"message": message, "type": "fake", "code": status}}).encode()
        return cls(text=None, status=status, retry_after=retry_after, raw=body)

    @classmethod
    def hang(cls, seconds: float) -> "Reply":
        return cls(text="too late", delay=seconds)

    @classmethod
    def malformed(cls) -> "Reply":
        return cls(raw=b'{"choices": [{"message": {"content": "cut off')

    @classmethod
    def empty(cls) -> "Reply":
        return cls(text="")


@dataclass
class FakeRequest:
    path: str
    headers: dict
    body: dict | None          # the parsed JSON body (None when it was not JSON)

    @property
    def messages(self) -> list[dict]:
        return (self.body or {}).get("messages", [])

    @property
    def schema(self) -> dict | None:
        """The JSON schema of the request's response_format json_schema, if it sent one."""
        fmt = (self.body or {}).get("response_format") or {}
        if fmt.get("type") == "json_object":
            return fmt.get("schema")
        return (fmt.get("json_schema") or {}).get("schema") if fmt.get("type") == "json_schema" else None

    @property
    def user_text(self) -> str:
        """The last user message's text (what most responders look at; the text parts of a
        content list)."""
        users = [text_of(m.get("content", "")) for m in self.messages if m.get("role") == "user"]
        return users[-1] if users else ""

    @property
    def image_urls(self) -> list[str]:
        """The URLs of every image part in the request's messages, in order."""
        return [p["image_url"]["url"] if isinstance(p.get("image_url"), dict) else p.get("image_url")
                for m in self.messages if isinstance(m.get("content"), list)
                for p in m["content"] if isinstance(p, dict) and p.get("type") == "image_url"]

    def images(self) -> list:
        """The image parts decoded (base64 data URLs) as Pillow images."""
        import base64
        import io

        from PIL import Image
        out = []
        for url in self.image_urls:
            head, _, data = url.partition(",")
            assert head.startswith("data:image/") and head.endswith(";base64"), head
            out.append(Image.open(io.BytesIO(base64.b64decode(data))))
        return out


def text_of(content) -> str:
    """A message's text: the string, or the text parts of a content list joined."""
    if isinstance(content, list):
        return "\n".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    return content


class FakeLLM:
    def __init__(self, responder: Callable[[FakeRequest], object] | None = None,
                 default: str = "ok", latency: float = 0.0, model: str = "fake-model", port: int = 0,
                 slots: int | None = None, die_after: int | None = None, structured: str | None = None,
                 vision: bool = True):
        if structured not in (None, "refuse", "check", "llama-cpp"):
            raise ValueError(f"structured must be None, 'refuse', 'check' or 'llama-cpp', got {structured!r}")
        self.responder, self.default, self.latency, self.model = responder, default, latency, model
        self.port, self.die_after, self.structured = port, die_after, structured
        self._slots = threading.Semaphore(slots) if slots else None
        self.vision = vision
        self.requests: list[FakeRequest] = []
        self._script: deque[Reply] = deque()
        self._lock = threading.Lock()
        self._stop = threading.Event()      # wakes sleeping handlers at shutdown
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- scripting ---------------------------------------------------------------------------
    def push(self, *replies: Reply | str) -> None:
        with self._lock:
            self._script.extend(Reply(text=r) if isinstance(r, str) else r for r in replies)

    @property
    def pending(self) -> int:
        with self._lock:
            return len(self._script)

    def _next_reply(self, request: FakeRequest) -> Reply:
        with self._lock:
            self.requests.append(request)
            if self.die_after is not None and len(self.requests) >= self.die_after:
                threading.Thread(target=self.stop, daemon=True).start()   # dies with this one in flight
            refusal = self._structured_refusal(request)
            if refusal is not None:
                return refusal
            if self._script:
                return self._script.popleft()
        if request.image_urls and not self.vision:
            return Reply.error(500, message=IMAGE_REFUSAL)
        if self.responder is None:
            return Reply(text=self.default)
        out = self.responder(request)
        if isinstance(out, Reply):
            return out
        if isinstance(out, dict):
            return Reply(raw=json.dumps(out).encode())
        return Reply(text=str(out))

    def _structured_refusal(self, request: FakeRequest) -> Reply | None:
        fmt = (request.body or {}).get("response_format")
        if fmt is None or self.structured is None:
            return None
        if self.structured == "refuse":
            return Reply.error(400, message="response_format json_schema is not supported")
        if self.structured == "llama-cpp":
            if isinstance(fmt, dict) and fmt.get("type") == "json_object" and isinstance(fmt.get("schema", {}), dict):
                return None
            return Reply.error(500, message="1 validation error: {'type': 'literal_error', 'loc': ('body', "
                               "'response_format', 'type'), 'msg': \"Input should be 'text' or 'json_object'\"}")
        spec = fmt.get("json_schema") if isinstance(fmt, dict) else None
        well_formed = (fmt.get("type") == "json_schema" and isinstance(spec, dict)
                       and isinstance(spec.get("name"), str) and spec.get("strict") is True
                       and isinstance(spec.get("schema"), dict) and spec["schema"].get("type") == "object")
        return None if well_formed else Reply.error(400, message=f"invalid response_format: {fmt!r}"[:300])

    # -- lifecycle ---------------------------------------------------------------------------
    @property
    def url(self) -> str:
        """http://127.0.0.1:PORT/v1 (still the server's address after it stopped)."""
        assert self.port, "start the server first (use it as a context manager)"
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> "FakeLLM":
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"      # keep-alive, as real servers do
            disable_nagle_algorithm = True     # else headers and body wait ~40 ms for a delayed ACK

            def log_message(self, *args):      # keep test output quiet
                pass

            def _send(self, status: int, body: bytes, headers: dict | None = None) -> None:
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    for k, v in (headers or {}).items():
                        self.send_header(k, str(v))
                    self.end_headers()
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass                       # the client gave up (timeout): nothing to do

            def do_GET(self):
                if self.path.rstrip("/").endswith("/models"):
                    body = {"object": "list", "data": [{"id": fake.model, "object": "model"}]}
                    self._send(200, json.dumps(body).encode())
                else:
                    self._send(404, b'{"error": {"message": "not found"}}')

            def do_POST(self):
                n = int(self.headers.get("Content-Length") or 0)
                data = self.rfile.read(n)
                if fake._stop.is_set():        # stopped: a kept-alive connection dies unanswered
                    self.close_connection = True
                    return
                try:
                    body = json.loads(data)
                except ValueError:
                    body = None
                request = FakeRequest(self.path, dict(self.headers.items()), body)
                if not self.path.rstrip("/").endswith("/chat/completions"):
                    fake._next_reply(request)  # logged all the same
                    self._send(404, b'{"error": {"message": "unknown path"}}')
                    return
                reply = fake._next_reply(request)
                wait = fake.latency + reply.delay
                if fake._slots is not None:
                    fake._slots.acquire()      # a free slot first, then the latency
                try:
                    stopped = wait > 0 and fake._stop.wait(wait)
                finally:
                    if fake._slots is not None:
                        fake._slots.release()
                if stopped or fake._stop.is_set():
                    self.close_connection = True
                    return                     # shutting down (or died): no reply
                headers = dict(reply.headers)
                if reply.retry_after is not None:
                    headers["Retry-After"] = reply.retry_after
                if reply.raw is not None:
                    self._send(reply.status, reply.raw, headers)
                    return
                text = reply.text
                prompt_tokens = sum(len(text_of(m.get("content", "")).split()) for m in request.messages)
                completion_tokens = len(text.split()) if text else 0
                out = {
                    "id": f"fake-{len(fake.requests)}", "object": "chat.completion",
                    "created": int(time.time()), "model": (body or {}).get("model", fake.model),
                    "choices": [{"index": 0, "finish_reason": "stop",
                                 "message": {"role": "assistant", "content": text}}],
                    "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                              "total_tokens": prompt_tokens + completion_tokens},
                }
                self._send(reply.status, json.dumps(out).encode(), headers)

        self._stop.clear()
        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.port = self._server.server_address[1]
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        with self._lock:                       # die_after and the test may both stop it
            server, self._server = self._server, None
        if server is not None:
            self._stop.set()
            server.shutdown()
            server.server_close()

    def __enter__(self) -> "FakeLLM":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
