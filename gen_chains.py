#!/usr/bin/env python3
"""gen_chains.py: the data half of learning to rank caption chains.

A caption chain is c0 > c1 > ... > cK: c0 is a correct, detailed caption of a video and each
later caption adds exactly one factual error to the one before, so ck holds k errors and the
chain is totally ordered by construction. The trainer (rank_dpo.py) ranks whole chains.

Subcommands (records are JSONL, see docs/DESIGN.md):
  synth      the embedded dataset: synthetic videos of coloured shapes, gold captions and facts
  benchmarks the embedded world as TempCompass, VidHal, VDC and ARGUS sets (published layouts)
  recaption  short human captions -> one detailed caption (LLM)
  chains     repeated degradation: c0 -> c1 -> ... -> cK (LLM over HTTP, or offline rules)
  inject     the error-injection baseline: K independent one-error negatives of c0
  mcq, ynq   chains -> multiple-choice chains / yes-no chains
  lfmcqa     a description -> a question with five long answer choices, one correct
  reward     LLaVA-Hound-DPO's LM reward: caption as evidence, score sampled answers, rank them
  qa         detailed captions -> question-answer pairs (LLaVA-Hound's instruction data)
  improve    Response Improvement: the teacher's correction of a sampled caption > the sample
  compare    Response Comparison: the teacher's pick of two sampled captions (asked in both orders)
  rlaifv     RLAIF-V: claims per sample, each checked against the reference; ranked by support

Read top to bottom: the one HTTP client and reading JSON out of LLM text; the error types;
the video as image parts (--frames: Frames); checking each LLM degradation step; asking until
a reply parses (ask_until_parsed) and asking in both orders (ask_both_orders), which
eval_judge.py's LLM judge uses too; checking what the teacher writes (text_problems and the
per-step checks); the LM reward; the command runner; then the subcommands and the command line.

A record command is its inputs and, per record, a rules function and an LLM function (plain
module-level functions that return the output record, with "llm_calls" where the method counts
them). run_command does the rest once: the backend (a ChatClient for --backend http; for
--backend rules the toy world of synthetic.py, imported in toy_world() only, so the http path
never loads it), the counters (RunStats), the resumable map (records.map_resumable; one record
at a time for rules) and the summary. The on-policy steps are written once against a teacher:
the LLM (LLMTeacher) or the scene's facts (RulesTeacher).
"""
from __future__ import annotations

import argparse
import base64
import difflib
import email.utils
import io
import json
import logging
import os
import random
import re
import sys
import threading
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Callable

from records import (DataError, OutputLocked, RecordFailed, is_ok, map_resumable, read_jsonl,
                     read_records, write_jsonl)

log = logging.getLogger("gen_chains")

DEFAULT_PROMPT = "Describe this video in detail."


# =============================================================================================
# The HTTP client: one, OpenAI-compatible (vLLM, llama.cpp server, Ollama, OpenAI)
# =============================================================================================

class ChatError(RecordFailed):
    """A chat request that failed for good. str() is the reason; it never contains the key.
    fatal=True means retrying other records cannot help (bad URL, key or model name).
    map_resumable writes a non-fatal one as {"id", "status": "failed", "reason", **details}
    (details: extra fields for the failed record, e.g. a partial chain)."""


@dataclass
class ChatReply:
    text: str
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass
class ChatTry:
    """What one try at one server came to."""
    reply: ChatReply | None = None         # the usable reply, else None
    reason: str = "interrupted"            # why it is not usable
    unhealthy: bool = False                # the server looks down: connection error, timeout, 5xx, 408
    wait: float | None = None              # the server's Retry-After, seconds
    refused_form: bool = False             # the server refused the structured-output form sent


RETRY_STATUS = {408, 409, 429} | set(range(500, 600))
FATAL_STATUS = {401, 403, 404}         # configuration errors: every request would fail alike


def retry_after_seconds(value: str | None, now: float | None = None) -> float | None:
    """Retry-After is either delta-seconds or an HTTP-date (RFC 9110); None if absent or garbled."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def json_schema(name: str, properties: dict, required: list[str] | None = None) -> dict:
    """A reply schema for chat(schema=...): a JSON object with these properties (JSON Schema
    dicts), each required unless `required` names fewer, and no others. `name` is what the
    server sees (letters, digits, _ and -)."""
    unknown = [k for k in (required or []) if k not in properties]
    if unknown:
        raise ValueError(f"json_schema {name!r}: required {unknown} are not among its properties")
    return {"name": name, "schema": {"type": "object", "properties": properties,
                                     "required": list(properties) if required is None else list(required),
                                     "additionalProperties": False}}


def string_list(min_items: int = 1, max_items: int | None = None) -> dict:
    """The JSON Schema of a list of strings, min_items..max_items long."""
    out = {"type": "array", "items": {"type": "string"}, "minItems": min_items}
    if max_items is not None:
        out["maxItems"] = max_items
    return out


# The forms of structured output, tried in this order: OpenAI's (vLLM, llama.cpp's
# llama-server, OpenAI), then llama-cpp-python's server's own (0.3.x refuses the first: its
# response_format.type is "text" or "json_object", the latter with an optional "schema").
STRUCTURED_FORMS = ("json_schema", "json_object+schema")


def response_format(schema: dict, form: str = "json_schema") -> dict:
    """The `response_format` asking for a reply that follows a json_schema(), in one of the
    STRUCTURED_FORMS."""
    if form == "json_schema":
        return {"type": "json_schema", "json_schema": {**schema, "strict": True}}
    if form == "json_object+schema":
        return {"type": "json_object", "schema": schema["schema"]}
    raise ValueError(f"unknown structured-output form {form!r} (one of {', '.join(STRUCTURED_FORMS)})")


# A server that cannot do structured output says so in its error: it names the field.
STRUCTURED_REFUSAL = re.compile(r"response_format|json_schema", re.I)


def parse_base_urls(value) -> list[str]:
    """--base_url: one API root, several separated by commas, or @FILE with one a line (blank
    lines and # comments skipped). A list is taken as it is."""
    if isinstance(value, (list, tuple)):
        urls = [str(u).strip() for u in value]
    elif isinstance(value, str) and value.strip().startswith("@"):
        path = value.strip()[1:]
        try:
            with open(path, encoding="utf-8") as f:
                urls = [ln.split("#", 1)[0].strip() for ln in f]
        except OSError as e:
            raise ValueError(f"--base_url @{path}: cannot read the URL file ({e.strerror})") from None
        urls = [u for u in urls if u]
        if not urls:
            raise ValueError(f"--base_url @{path}: the file lists no URL")
    else:
        urls = [u.strip() for u in str(value or "").split(",")]
        if not any(urls):
            raise ValueError("no --base_url (or OPENAI_BASE_URL) given")
        if not all(urls):
            raise ValueError(f"--base_url {value!r}: an empty entry in the comma-separated list")
    urls = [u.rstrip("/") for u in urls]
    repeated = sorted({u for u in urls if urls.count(u) > 1})
    if repeated:
        raise ValueError(f"--base_url lists {repeated[0]} more than once")
    return urls


class Server:
    """One API root behind a ChatClient and what the client has learnt about it. Guarded by
    the client's lock."""

    def __init__(self, base_url: str):
        self.url = base_url + "/chat/completions"
        self.in_flight = 0
        self.fails_in_row = 0              # connection errors, timeouts and 5xx since the last success
        self.set_aside_until: float | None = None   # monotonic time; None while healthy
        self.probing = False               # the one request let through after the cool-down
        self.form = 0                      # the STRUCTURED_FORMS entry to send; past the end: none
        self.form_accepted = False         # a reply came back with self.form
        self.counts = Counter()            # requests, failures, set_aside, prompt/completion tokens

    def report(self) -> dict:
        c = self.counts
        return {"url": self.url, "requests": c["requests"], "failures": c["failures"],
                "set_aside": c["set_aside"], "tokens": c["prompt_tokens"] + c["completion_tokens"],
                "structured": self.structured_state()}

    def structured_state(self) -> str:
        """The form this server takes ("json_schema", ...), "refused", or "not tried" yet."""
        if self.form >= len(STRUCTURED_FORMS):
            return "refused"
        return STRUCTURED_FORMS[self.form] if self.form_accepted else "not tried"


class RateLimit:
    """At most `per_s` requests a second across every thread: a token bucket of one token
    (each request takes the next free slot, 1/per_s after the one before), so no burst
    exceeds the rate either."""

    def __init__(self, per_s: float):
        if not per_s > 0:
            raise ValueError(f"--max_requests_per_s must be positive, got {per_s}")
        self.interval = 1.0 / per_s
        self._next = 0.0
        self._lock = threading.Lock()

    def wait(self) -> None:
        with self._lock:
            now = time.monotonic()
            slot = max(now, self._next)
            self._next = slot + self.interval
        if slot > now:
            time.sleep(slot - now)


class ChatClient:
    """POST {base_url}/chat/completions with bounded retries, over one server or several.

    Several servers (base_url "URL1,URL2" or "@FILE"): each request goes to the healthy server
    with the fewest requests in flight. A server whose requests fail `set_aside_after` times in
    a row (connection errors, timeouts, 5xx) is set aside for `cooldown` seconds; then one
    request probes it, and a success brings it back. A failed request is retried at once on
    another server when one is left, so a dead server's records are finished by the others;
    only when every server has failed it does the client wait. With one server (or every
    server set aside) requests go where they can, as with one server.

    Retries connection errors, timeouts, 408/409/429/5xx, malformed bodies and empty content,
    waiting the server's Retry-After when it gives one, else exponential backoff with jitter.
    After max_tries the request fails with a ChatError naming the last reason; 401/403/404 are
    fatal at once (a wrong URL, key or model). Thread-safe: each worker thread gets its own
    keep-alive session.

    chat(messages, schema=json_schema(...)) asks for structured output where the server offers
    it: structured "auto" sends response_format json_schema; a server that refuses it (an error
    naming response_format or json_schema) is noted once and tried with llama-cpp-python's form
    (json_object with the schema), and a server that refuses that too is asked without a schema
    from then on (the prompt and the parser carry the format). "on" makes refusing both forms
    fatal; "off" never sends a schema.
    """

    def __init__(self, base_url, model: str, api_key: str | None = None, timeout: float = 60.0,
                 max_tries: int = 5, backoff: float = 1.0, max_wait: float = 60.0,
                 default_params: dict | None = None, structured: str = "auto", set_aside_after: int = 3,
                 cooldown: float = 30.0, max_requests_per_s: float | None = None):
        if structured not in ("auto", "on", "off"):
            raise ValueError(f"structured must be auto, on or off, got {structured!r}")
        self.servers = [Server(u) for u in parse_base_urls(base_url)]
        self.model, self.timeout, self.max_tries = model, float(timeout), max(1, int(max_tries))
        self.backoff, self.max_wait = float(backoff), float(max_wait)
        self.default_params = dict(default_params or {})
        self.structured, self.set_aside_after = structured, max(1, int(set_aside_after))
        self.cooldown = float(cooldown)
        self._rate = RateLimit(max_requests_per_s) if max_requests_per_s else None
        self._api_key = api_key or None
        self._local = threading.local()
        self._lock = threading.Lock()
        self._started: float | None = None  # the first request: the tokens/s clock
        self.usage = Counter()             # requests, retries, prompt_tokens, completion_tokens, structured

    @property
    def url(self) -> str:
        return ", ".join(s.url for s in self.servers)

    def __repr__(self) -> str:             # never shows the key
        return f"ChatClient(url={self.url!r}, model={self.model!r}, timeout={self.timeout})"

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "ChatClient":
        params = {}
        if getattr(args, "temperature", None) is not None:
            params["temperature"] = args.temperature
        try:
            return cls(args.base_url, args.model, api_key=args.api_key, timeout=args.timeout,
                       max_tries=args.max_tries, backoff=getattr(args, "backoff", 1.0), default_params=params,
                       structured=getattr(args, "structured", "auto"),
                       set_aside_after=getattr(args, "set_aside_after", 3),
                       cooldown=getattr(args, "server_cooldown", 30.0),
                       max_requests_per_s=getattr(args, "max_requests_per_s", None))
        except ValueError as e:
            raise SystemExit(f"{getattr(args, 'command', 'gen_chains')}: {e}") from None

    def _session(self):
        import requests
        if not hasattr(self._local, "session"):
            self._local.session = requests.Session()
        return self._local.session

    def _scrub(self, text: str) -> str:
        if self._api_key and len(self._api_key) >= 4:
            text = text.replace(self._api_key, "[api key redacted]")
        return text

    def _count(self, **inc: int) -> None:
        with self._lock:
            self.usage.update(inc)

    # -- which server ----------------------------------------------------------------------
    def _pick(self, avoid: set) -> tuple[Server, bool]:
        """The server for the next try (its in-flight count taken) and whether the try is its
        probe: a set-aside server whose cool-down is over (the one probe), else the healthy one
        with the fewest in flight (then the fewest sent), else, every server set aside, the one
        back soonest."""
        now = time.monotonic()
        with self._lock:
            pool = [s for s in self.servers if s not in avoid] or self.servers
            due = [s for s in pool if s.set_aside_until is not None and s.set_aside_until <= now
                   and not s.probing]
            healthy = [s for s in pool if s.set_aside_until is None]
            probe = bool(due)
            if probe:
                server = due[0]
                server.probing = True
            elif healthy:
                server = min(healthy, key=lambda s: (s.in_flight, s.counts["requests"]))
            else:
                server = min(pool, key=lambda s: (s.set_aside_until, s.in_flight))
            server.in_flight += 1
            server.counts["requests"] += 1
            if self._started is None:
                self._started = now
            return server, probe

    def _done(self, server: Server, probe: bool, form: int | None, outcome: ChatTry) -> None:
        """Book one finished try: a success counts its tokens (and the structured-output form it
        took) and clears the server's record, bringing a set-aside server back; an unhealthy
        failure counts toward setting it aside."""
        with self._lock:
            server.in_flight -= 1
            if probe:
                server.probing = False
            reply = outcome.reply
            if reply is not None:
                tokens = {"prompt_tokens": reply.prompt_tokens, "completion_tokens": reply.completion_tokens}
                server.counts.update(tokens)
                self.usage.update(tokens)
                if form is not None and server.form == form:
                    server.form_accepted = True
                if server.set_aside_until is not None:
                    log.warning("%s answers again: back in use", server.url)
                server.fails_in_row, server.set_aside_until = 0, None
                return
            server.counts["failures"] += 1
            if not outcome.unhealthy:
                return
            server.fails_in_row += 1
            if probe or server.set_aside_until is not None:
                server.set_aside_until = time.monotonic() + self.cooldown    # still down: wait again
            elif server.fails_in_row >= self.set_aside_after and len(self.servers) > 1:
                server.set_aside_until = time.monotonic() + self.cooldown
                server.counts["set_aside"] += 1
                log.warning("%s failed %d times in a row: set aside for %gs", server.url,
                            server.fails_in_row, self.cooldown)

    def _healthy_left(self, avoid: set) -> bool:
        with self._lock:
            return any(s.set_aside_until is None and s not in avoid for s in self.servers)

    def _refuses_schema(self, server: Server, form: int, resp) -> bool:
        """Whether this error is the server refusing structured-output form `form`; then the
        server moves on to the next form, noted once per server and form."""
        if resp.status_code in FATAL_STATUS or not STRUCTURED_REFUSAL.search(resp.text or ""):
            return False
        with self._lock:
            first = server.form == form        # concurrent refusals of the same form: one note
            if first:
                server.form, server.form_accepted = form + 1, False
                server.counts["structured_refused"] += 1
        none_left = form + 1 >= len(STRUCTURED_FORMS)
        if none_left and self.structured == "on":
            raise ChatError(f"{server.url} refuses structured output (HTTP {resp.status_code}: "
                            f"{self._scrub(_error_message(resp))}); use --structured auto or off", fatal=True)
        if first:
            then = ("the prompt and the parser carry the reply format there from now on" if none_left
                    else f"trying response_format {STRUCTURED_FORMS[form + 1]}")
            log.warning("%s refuses response_format %s (HTTP %d): %s", server.url, STRUCTURED_FORMS[form],
                        resp.status_code, then)
        return True

    # -- one request -----------------------------------------------------------------------
    def chat(self, messages: list[dict], schema: dict | None = None, **params) -> ChatReply:
        """The reply to `messages`. schema: a json_schema() the reply must follow, sent as
        response_format where the server takes it (see the class)."""
        payload = {"model": self.model, "messages": messages, **self.default_params, **params}
        headers = {"Content-Type": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        structured = schema is not None and self.structured != "off" and "response_format" not in payload
        reason, attempt, avoid = "no attempt made", 0, set()
        while attempt < self.max_tries:
            attempt += 1
            if self._rate is not None:
                self._rate.wait()
            server, probe = self._pick(avoid)
            form = server.form if structured and server.form < len(STRUCTURED_FORMS) else None
            body = payload if form is None else \
                {**payload, "response_format": response_format(schema, STRUCTURED_FORMS[form])}
            self._count(requests=1, retries=int(attempt > 1), structured=int(form is not None))
            outcome = ChatTry()
            try:
                outcome = self._try(server, body, headers, form)
            finally:
                self._done(server, probe, form, outcome)
            if outcome.reply is not None:
                return outcome.reply
            if outcome.refused_form:
                attempt -= 1                      # not the request's fault: ask again in the next form
                continue
            reason = outcome.reason
            if attempt == self.max_tries:
                break
            avoid.add(server)
            if self._healthy_left(avoid):
                log.info("request failed on %s (%s); retry %d/%d on another server", server.url, reason,
                         attempt + 1, self.max_tries)
                continue
            avoid.clear()
            wait = outcome.wait
            if wait is None:
                # Exponential backoff with "equal jitter": half fixed, half random, so that many
                # workers hit by the same outage do not come back in lockstep.
                step = min(self.max_wait, self.backoff * 2 ** (attempt - 1))
                wait = step / 2 + random.uniform(0, step / 2)
            wait = min(wait, self.max_wait)
            log.info("request failed (%s); retry %d/%d in %.2fs", reason, attempt + 1, self.max_tries, wait)
            time.sleep(wait)
        raise ChatError(f"gave up after {self.max_tries} tries: {reason}")

    def _try(self, server: Server, body: dict, headers: dict, form: int | None) -> ChatTry:
        """One POST to one server. Raises ChatError where retrying cannot help: 401/403/404
        (fatal: every request would fail alike) and other non-retryable 4xx (this request)."""
        import requests
        try:
            resp = self._session().post(server.url, json=body, headers=headers, timeout=self.timeout)
        except requests.Timeout:
            return ChatTry(reason=f"timed out after {self.timeout:g}s", unhealthy=True)
        except requests.RequestException as e:
            cause = re.search(r"\[Errno -?\d+\][^'\")]*", str(e))     # e.g. "[Errno 111] Connection refused"
            detail = f" ({cause.group(0).strip()})" if cause else ""
            return ChatTry(reason=f"connection error: {type(e).__name__}{detail}", unhealthy=True)
        if resp.status_code == 200:
            reply, reason = self._parse(resp)
            return ChatTry(reply, reason)
        if form is not None and self._refuses_schema(server, form, resp):
            return ChatTry(reason="refused response_format", refused_form=True)
        reason = f"HTTP {resp.status_code}: {self._scrub(_error_message(resp))}"
        if resp.status_code in FATAL_STATUS:
            raise ChatError(f"{reason} from {server.url} (check --base_url, --model and --api_key)", fatal=True)
        if refuses_images(resp.status_code, reason, body["messages"]):
            raise ChatError(f"the server at {server.url} does not accept images ({reason}); "
                            "drop --frames or serve a vision model", fatal=True)
        if resp.status_code not in RETRY_STATUS:
            raise ChatError(reason)               # e.g. 400: this request is bad, not the server
        return ChatTry(reason=reason, unhealthy=resp.status_code >= 500 or resp.status_code == 408,
                       wait=retry_after_seconds(resp.headers.get("Retry-After")))

    def _parse(self, resp) -> tuple[ChatReply | None, str]:
        """The reply text and token usage, or None and why the body is unusable (then retried)."""
        try:
            body = resp.json()
            message = body["choices"][0]["message"]
        except (ValueError, KeyError, IndexError, TypeError):
            return None, "malformed response body"
        text = message.get("content") if isinstance(message, dict) else None
        if not isinstance(text, str) or not text.strip():
            return None, "empty content"
        usage = body.get("usage") or {}
        return ChatReply(self._scrub(text), int(usage.get("prompt_tokens") or 0),
                         int(usage.get("completion_tokens") or 0)), ""

    # -- what it cost ----------------------------------------------------------------------
    @property
    def tokens(self) -> int:
        return self.usage["prompt_tokens"] + self.usage["completion_tokens"]

    def progress(self) -> dict:
        """Live figures for the progress bar: tokens per second since the first request."""
        with self._lock:
            started = self._started
        seconds = time.monotonic() - started if started is not None else 0.0
        return {"tok/s": f"{self.tokens / seconds:.0f}" if seconds > 0 else "0"}

    def report(self, run: dict | None = None) -> dict:
        """The client's part of a run's summary: tokens, requests and each server's counts; given
        the run's map_resumable summary, also the tokens per record written and per kept one
        (status ok): the data's price."""
        with self._lock:
            servers = [s.report() for s in self.servers]
        u = self.usage
        tokens = {"prompt": u["prompt_tokens"], "completion": u["completion_tokens"]}
        if run is not None:
            written = run.get("done", 0) + run.get("failed", 0)
            tokens.update(per_record=round(self.tokens / written, 1) if written else None,
                          per_kept=round(self.tokens / run["kept"], 1) if run.get("kept") else None)
        return {"tokens": tokens,
                "requests": {"sent": u["requests"], "retries": u["retries"], "with_schema": u["structured"]},
                "structured": {"mode": self.structured,
                               "refused_by": [s["url"] for s in servers if s["structured"] == "refused"],
                               "refusals": sum(s.counts["structured_refused"] for s in self.servers)},
                "servers": servers}


# What servers say to image parts when they serve a text-only model: vLLM ("... is not a
# multimodal model"), llama.cpp's server ("image input is not supported ... mmproj"), OpenAI
# ("image_url is only supported by certain models") and llama-cpp-python without a vision
# projector, whose chat template meets a list where it expects a string: an HTTP 500 "can only
# concatenate str (not "list") to str", which would otherwise be retried like an outage.
IMAGE_REFUSAL = re.compile(r"image|vision|multi-?modal|mmproj|clip model|\bstr\b.{0,30}\blist\b", re.I)


def refuses_images(status: int, reason: str, messages: list[dict]) -> bool:
    """True when an error answers a request with image parts by naming images (or the content
    list they came in): every request with frames would fail alike, so no retry can help."""
    if status in (408, 429) or not IMAGE_REFUSAL.search(reason):
        return False
    return any(isinstance(m.get("content"), list) and
               any(isinstance(p, dict) and p.get("type") == "image_url" for p in m["content"])
               for m in messages)


def _error_message(resp) -> str:
    try:
        err = resp.json().get("error")
        msg = err.get("message") if isinstance(err, dict) else err
        if msg:
            return str(msg)[:200]
    except (ValueError, AttributeError):
        pass
    return (resp.text or resp.reason or "").strip()[:200]


def add_client_args(parser: argparse.ArgumentParser) -> None:
    """The client's flags; URL and key default to OPENAI_BASE_URL / OPENAI_API_KEY."""
    g = parser.add_argument_group("LLM server (OpenAI-compatible)")
    g.add_argument("--base_url", default=os.environ.get("OPENAI_BASE_URL", "http://127.0.0.1:8000/v1"),
                   help="API root, e.g. http://127.0.0.1:8000/v1; several servers: comma-separated "
                        "(URL1,URL2) or @FILE with one URL a line; each request goes to the least "
                        "loaded healthy one (default: $OPENAI_BASE_URL or that)")
    g.add_argument("--model", default=os.environ.get("OPENAI_MODEL", "default"),
                   help="model name the server knows (default: $OPENAI_MODEL or 'default')")
    g.add_argument("--api_key", default=os.environ.get("OPENAI_API_KEY"),
                   help="bearer token (default: $OPENAI_API_KEY); never logged or written")
    g.add_argument("--concurrency", type=int, default=8, help="requests in flight (worker threads)")
    g.add_argument("--timeout", type=float, default=60.0, help="seconds per request")
    g.add_argument("--max_tries", type=int, default=5, help="tries per request before the record fails")
    g.add_argument("--backoff", type=float, default=1.0, help="first retry wait in seconds (doubles)")
    g.add_argument("--temperature", type=float, default=None, help="sampling temperature (server default)")
    g.add_argument("--structured", choices=("auto", "on", "off"), default="auto",
                   help="send each JSON step's schema as response_format json_schema: auto tries and "
                        "falls back to prompt + parser on a server that refuses it; on: a refusal is fatal")
    g.add_argument("--max_requests_per_s", type=float, default=None,
                   help="at most this many requests a second over all threads and servers (default: no limit)")
    g.add_argument("--set_aside_after", type=int, default=3,
                   help="several servers: set a server aside after this many failures in a row")
    g.add_argument("--server_cooldown", type=float, default=30.0,
                   help="seconds a set-aside server rests before one request probes it again")


# =============================================================================================
# What an LLM returns: JSON out of prose, a caption out of its wrappers
# =============================================================================================

def parse_json_object(text: str) -> dict | None:
    """The first JSON object in messy LLM text (code fences, prose before and after, trailing
    commas, single quotes); None when there is none."""
    if not text:
        return None
    candidates = [text.strip()]
    candidates += re.findall(r"```(?:json|JSON)?\s*(.*?)```", text, flags=re.S)
    candidates += _brace_spans(text)
    for cand in candidates:
        for attempt in (cand, re.sub(r",\s*([}\]])", r"\1", cand)):
            try:
                obj = json.loads(attempt)
            except ValueError:
                continue
            if isinstance(obj, dict):
                return obj
    for cand in _brace_spans(text):          # last resort: Python-style quotes
        fixed = re.sub(r"(?<![\w])'|'(?![\w])", '"', cand)
        try:
            obj = json.loads(re.sub(r",\s*([}\]])", r"\1", fixed))
        except ValueError:
            continue
        if isinstance(obj, dict):
            return obj
    return None


def _brace_spans(text: str) -> list[str]:
    """Balanced {...} spans, outermost first, skipping braces inside strings."""
    spans, depth, start, in_str, esc, quote = [], 0, None, False, False, ""
    for i, ch in enumerate(text):
        if in_str:
            if esc:
                esc = False
            elif ch == "\\":
                esc = True
            elif ch == quote:
                in_str = False
        elif ch in "\"":
            in_str, quote = True, ch
        elif ch == "{":
            if depth == 0:
                start = i
            depth += 1
        elif ch == "}" and depth:
            depth -= 1
            if depth == 0:
                spans.append(text[start:i + 1])
    return spans


LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def format_mcq(question: str, options: list[str]) -> str:
    """A multiple-choice prompt: the question, lettered options, and how to answer.
    Shared by mcq chains (training) and LF-MCQA (evaluation) so both see the same format."""
    if not 2 <= len(options) <= len(LETTERS):
        raise ValueError(f"need 2..{len(LETTERS)} options, got {len(options)}")
    lines = [question.strip()]
    lines += [f"{LETTERS[i]}. {' '.join(str(o).split())}" for i, o in enumerate(options)]
    lines.append("Answer with the option's letter.")
    return "\n".join(lines)


# =============================================================================================
# Error types: what one degradation step may change, and when it applies to a caption
# =============================================================================================
# Applicability uses keyword lists plus two crude part-of-speech rules (no NLP dependency):
# a "noun" is a word right after a determiner or number (skipping known adjectives), and an
# "action" is a known verb in any inflection or an -ing word. Sampling is uniform over the
# types that apply, so a caption with no people never gets a person error.

def _words(text: str) -> list[str]:
    return re.findall(r"[a-z]+(?:-[a-z]+)*|\d+", text.lower())


def _inflect(stems: str) -> set[str]:
    out = set()
    for s in stems.split():
        out |= {s, s + "s", s + "es", s + "ed", s + "d", s + "ing", s[:-1] + "ing" if s.endswith("e") else s}
    return out


COLOR_WORDS = set("red green blue yellow white black gray grey orange purple pink brown violet "
                  "golden silver beige teal cyan magenta navy maroon dark-blue light-blue".split())
NUMBER_WORDS = set("one two three four five six seven eight nine ten eleven twelve dozen "
                   "several few many multiple couple pair single both".split())
DETERMINERS = set("a an the this that these those his her their its some another each every".split()) | NUMBER_WORDS
ADJECTIVES = set("small large big tiny huge little tall short long wide narrow round square flat thin "
                 "thick wooden metal metallic plastic glass paper shiny dull bright dark light old new "
                 "young soft hard heavy empty full open closed".split()) | COLOR_WORDS
SIZE_MATERIAL = set("small large big tiny huge little tall short long wide narrow round flat thin thick "
                    "wooden metal metallic plastic glass paper shiny dull bright soft hard heavy".split())
ACTION_VERBS = _inflect("move walk run jump sit stand hold pick put open close throw catch eat drink "
                        "talk speak play dance ride drive climb push pull carry cut cook write read look "
                        "turn wave fall roll slide fly swim appear disappear enter leave exit spin bounce "
                        "shake hit kick pour wash point smile laugh cry sing grab place lift drop")
MOTION_VERBS = _inflect("move walk run slide fly swim drive ride roll go head travel drift turn climb fall "
                        "jump bounce spin come")
DIRECTION_WORDS = set("left right up down upward upwards downward downwards toward towards away forward "
                      "forwards backward backwards across into out around leftward rightward".split())
SPATIAL_WORDS = set("left right above below behind front beside next near top bottom center centre middle "
                    "under over between inside outside corner side far".split())
TEMPORAL_WORDS = set("then after before first finally later while next eventually afterwards afterward "
                     "meanwhile once until when begins starts ends last".split())
SCENE_WORDS = set("background room kitchen street park outdoor outdoors indoor indoors field beach office "
                  "stage road forest sky water city house building floor wall garden yard studio "
                  "restaurant shop store classroom gym court lake river mountain snow desert".split())
PERSON_WORDS = set("man woman person people boy girl child children kid kids men women lady guy player "
                   "he she baby teenager adult worker chef".split())
CAMERA_WORDS = set("camera zoom zooms zooming pan pans panning shot close-up closeup view angle footage "
                   "filmed recording frame tracking handheld".split())
NOT_NOUNS = DETERMINERS | ADJECTIVES | set("and or of to in on at with is are was were be".split())


def _nouns(words: list[str]) -> list[str]:
    nouns = []
    for i, w in enumerate(words):
        if w in DETERMINERS or w.isdigit():
            j = i + 1
            while j < len(words) and words[j] in ADJECTIVES:
                j += 1
            if j < len(words) and words[j] not in NOT_NOUNS and not words[j].isdigit():
                nouns.append(words[j])
    return nouns


def _has_motion_direction(words: list[str]) -> bool:
    return any(w in MOTION_VERBS and any(x in DIRECTION_WORDS for x in words[i + 1:i + 4])
               for i, w in enumerate(words))


def _actions(words: list[str]) -> list[str]:
    return [w for w in words if w in ACTION_VERBS or (w.endswith("ing") and len(w) > 5 and w not in
            {"something", "anything", "nothing", "everything", "during", "morning", "evening",
             "building", "ceiling", "clothing", "painting", "wedding", "string", "ring"})]


@dataclass(frozen=True)
class ErrorType:
    name: str
    instruction: str                       # what the LLM is asked to change
    applies: Callable[[list[str]], bool]   # on the caption's lowercase words


ERROR_TYPES = {t.name: t for t in [
    ErrorType("object", "replace one object or thing with a different object that could plausibly be there",
              lambda w: bool(set(_nouns(w)) - PERSON_WORDS - SCENE_WORDS)),
    ErrorType("color", "change the colour of one thing to another colour",
              lambda w: bool(COLOR_WORDS & set(w))),
    ErrorType("attribute", "change one attribute of an object: its size, shape, material or texture",
              lambda w: bool(SIZE_MATERIAL & set(w))),
    ErrorType("action", "change one action to a different action",
              lambda w: bool(_actions(w))),
    ErrorType("count", "change how many there are of one kind of thing",
              lambda w: bool((NUMBER_WORDS | {"a", "an"}) & set(w)) or any(x.isdigit() for x in w)),
    ErrorType("spatial", "change one position or spatial relation (left/right, above/below, in front/behind)",
              lambda w: bool(SPATIAL_WORDS & set(w))),
    ErrorType("temporal", "swap the order in which two events happen",
              lambda w: bool(TEMPORAL_WORDS & set(w)) and len(_actions(w)) >= 2),
    ErrorType("direction", "change the direction of one motion (for example left to right, up to down)",
              _has_motion_direction),
    ErrorType("scene", "change the scene, location or background",
              lambda w: bool(SCENE_WORDS & set(w))),
    ErrorType("person", "change one attribute of a person: clothing, hair, age or gender",
              lambda w: bool(PERSON_WORDS & set(w))),
    ErrorType("camera", "change the camera motion, angle or kind of shot",
              lambda w: bool(CAMERA_WORDS & set(w))),
]}


def applicable_error_types(caption: str, allowed: set[str] | None = None) -> list[str]:
    """The error types that apply to the caption (among `allowed`, when given)."""
    words = _words(caption)
    return [name for name, t in ERROR_TYPES.items() if (allowed is None or name in allowed) and t.applies(words)]


def parse_error_types(text: str | None) -> set[str] | None:
    """--error_types "object,action" -> {"object", "action"}; None (any type) when not given."""
    if text is None:
        return None
    names = {t.strip().lower() for t in text.split(",") if t.strip()}
    unknown = sorted(names - set(ERROR_TYPES))
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown error type {unknown[0] if unknown else text!r} "
                                         f"(known: {', '.join(ERROR_TYPES)})")
    return names


# =============================================================================================
# The teacher sees the video: --frames N sends N of its frames with the text
# =============================================================================================
# The frames are the trainer's own (rank_dpo.load_clip with VideoSampling(N): the reader and
# the sampling a model trains on), each shrunk to fit --frame_size and sent as a JPEG data URL
# in the user message, OpenAI's format (vLLM, llama.cpp with a vision projector, Ollama and
# OpenAI read it). rank_dpo, and torch with it, is imported only when frames are asked for.

FRAME_NOTE = ("The {n} images above are frames of the video, evenly spaced in time and in order; "
              "what they show is evidence too.")


def frame_image(frame, cap: int):
    """A uint8 [H, W, 3] frame as a Pillow image whose longest side is at most `cap` pixels
    (aspect kept; a smaller frame is sent as it is)."""
    from PIL import Image
    img = Image.fromarray(frame)
    scale = cap / max(img.size)
    if scale < 1:
        img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))),
                         Image.Resampling.BICUBIC)
    return img


def image_part(img) -> dict:
    """An OpenAI image content part: the image as a base64 JPEG data URL."""
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    url = "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
    return {"type": "image_url", "image_url": {"url": url}}


def frame_parts(video: str, n: int, cap: int) -> list[dict]:
    """n frames of the video at `video`, evenly spaced as the trainer samples them, as image parts."""
    from rank_dpo import VideoSampling, load_clip
    return [image_part(frame_image(f, cap)) for f in load_clip(video, VideoSampling(n)).frames]


def with_frames(messages: list[dict], parts: list[dict]) -> list[dict]:
    """The messages with `parts` first in the last (user) message's content and a line saying
    what they are; unchanged without parts."""
    if not parts:
        return messages
    *head, user = messages
    text = f"{user['content']}\n\n{FRAME_NOTE.format(n=len(parts))}"
    return [*head, {**user, "content": [*parts, {"type": "text", "text": text}]}]


def text_only(messages: list[dict]) -> list[dict]:
    """What a step sends when it looks at no video."""
    return messages


class Frames:
    """One run's --frames N / --frame_size / --video_root: each record's video as image parts in
    its requests (none when N is 0: text only, the default), and the size of what is sent (the
    JSON of a question's first request), printed once and averaged in the summary."""

    def __init__(self, n: int = 0, cap: int = 448, video_root: str | None = None):
        if n < 0 or cap < 1:
            raise SystemExit(f"--frames must be 0 or more and --frame_size at least 1 (got {n}, {cap})")
        self.n, self.cap, self.video_root = n, cap, video_root
        self.videos: dict[str, str] = {}      # record id -> resolved video path
        self._cache: OrderedDict[str, list[dict]] = OrderedDict()
        self._lock = threading.Lock()
        self._sent = Counter()

    @classmethod
    def from_args(cls, args) -> "Frames":
        return cls(getattr(args, "frames", 0) or 0, getattr(args, "frame_size", 448),
                   getattr(args, "video_root", None))

    def find_videos(self, path: str, found: list[tuple[int, dict]]) -> None:
        """Resolve every record's video up front (rank_dpo.resolve_video: against --video_root,
        default the folder of `path`), so a missing one stops the run before any request."""
        if not self.n:
            return
        from rank_dpo import MissingDependency, require, resolve_video
        try:
            require("PIL", "pillow", f"--frames {self.n} (frames are sent as JPEG)")
        except MissingDependency as e:
            raise SystemExit(str(e)) from None
        for line, rec in found:
            video = resolve_video(path, line, rec, self.video_root)
            if video is None:
                raise DataError(path, line, f"--frames {self.n} needs the record's video", "video")
            self.videos[rec["id"]] = video

    def parts(self, rid: str | None) -> list[dict]:
        """Record rid's frames as image parts; none without --frames or for rid None (a
        question about text alone)."""
        if not self.n or rid is None:
            return []
        with self._lock:
            if rid in self._cache:             # a record's steps and re-asks reuse its frames
                self._cache.move_to_end(rid)
                return self._cache[rid]
        parts = frame_parts(self.videos[rid], self.n, self.cap)
        with self._lock:
            self._cache[rid] = parts
            while len(self._cache) > 64:
                self._cache.popitem(last=False)
        return parts

    def attach(self, messages: list[dict], rid: str | None) -> list[dict]:
        """The messages with record rid's frames (text only without --frames or for rid None),
        measured."""
        messages = with_frames(messages, self.parts(rid))
        size = len(json.dumps(messages).encode())
        with self._lock:
            first = not self._sent["requests"]
            self._sent.update(requests=1, bytes=size)
        if first:
            print(f"request size: {size} bytes of JSON messages ({self.n} frames of at most "
                  f"{self.cap} px)" if self.n else f"request size: {size} bytes of JSON messages",
                  file=sys.stderr)
        return messages

    def look(self, rid: str) -> Callable[[list[dict]], list[dict]]:
        """attach() for one record: what a step calls on the messages it builds."""
        return partial(self.attach, rid=rid)

    def summary(self) -> dict:
        with self._lock:
            n, total = self._sent["requests"], self._sent["bytes"]
        return {"request_bytes": {"mean": round(total / n), "questions": n, "frames": self.n}} if n else {}


def add_frame_args(parser: argparse.ArgumentParser, what: str) -> None:
    """--frames / --frame_size / --video_root: the teacher sees the video (eval_judge.py's judge too)."""
    g = parser.add_argument_group("the video, seen by the LLM")
    g.add_argument("--frames", type=int, default=0, metavar="N",
                   help=f"send N frames of each record's video with {what} (default 0: text only; "
                        "needs a server with a vision model)")
    g.add_argument("--frame_size", type=int, default=448, metavar="PX",
                   help="longest side of a sent frame in pixels (larger frames are shrunk)")
    g.add_argument("--video_root", default=None,
                   help="where the records' video paths start (default: the data file's folder)")


# =============================================================================================
# Checking one LLM degradation step
# =============================================================================================
# A small LLM wraps its answer ("Sure! Here is the modified caption:", quotes, markdown, a
# trailing explanation), returns the caption unchanged, truncates it, rewrites all of it, or
# undoes an earlier error. clean_reply() unwraps; check_step() accepts or names the reason.

PREAMBLE = re.compile(r"^\s*(?:(?:sure|certainly|of course|okay|ok|absolutely|alright|great)\s*[!,.:]"
                      r"|here(?:'s| is| are)\b|below is\b|i(?: have|'ve) (?:introduced|changed|modified|edited)\b)",
                      re.I)
LABEL = re.compile(r"^\s*(?:[*_#>\-\s]*)(?:the\s+)?(?:modified|edited|new|updated|corrupted|revised|final|"
                   r"altered|changed|output|resulting)?\s*(?:caption|description|answer|text|version)"
                   r"\s*(?:\([^)]*\))?\s*[*_]*\s*:\s*[*_]*", re.I)
TRAILER = re.compile(r"^\s*[*_(\[]*\s*(?:explanation|note|notes|changes?|change made|error(?: introduced)?"
                     r"|i (?:changed|replaced|swapped|modified|introduced)|the error|in this (?:version|caption)"
                     r"|this (?:introduces|changes))\b", re.I)
REFUSAL = re.compile(r"\b(?:cannot|can't|can ?not|unable to|not possible|impossible|no (?:suitable|applicable)"
                     r"|does(?: not|n't) (?:contain|mention|have|include)|there (?:is|are) no)\b", re.I)
QUOTES = "\"'`“”‘’«»"


def clean_reply(text: str) -> tuple[str, dict]:
    """The caption inside an LLM reply, and the reply's JSON fields if it sent JSON.
    A JSON reply {"cannot_apply": true} gives ("", {...}); callers check that first."""
    obj = parse_json_object(text) or {}
    if isinstance(obj.get("caption"), str):
        text = obj["caption"]
    elif obj:
        return "", obj
    text = re.sub(r"```[a-zA-Z]*", "\n", text)            # code fences: keep what is inside
    lines = [ln.strip() for ln in text.strip().splitlines()]
    while lines and (not lines[0] or PREAMBLE.match(lines[0]) or
                     (lines[0].endswith(":") and len(lines[0].split()) <= 12)):
        head, colon, rest = lines[0].partition(":")        # "Sure! Here it is: <caption>" on one line
        if PREAMBLE.match(lines[0]) and colon and len(rest.split()) > 3:
            lines[0] = rest.strip()
            break
        lines.pop(0)                                       # "Sure! Here is the caption:"
    body = []
    for ln in lines:
        if TRAILER.match(ln) or (not ln and body):         # an explanation, or the paragraph ended
            break
        body.append(ln)
    out = " ".join(body)
    out = LABEL.sub("", out, count=1)
    out = re.sub(r"\s*[(\[](?:changed|replaced|swapped|error|note|modified)[^)\]]*[)\]]\s*$", "", out, flags=re.I)
    out = re.sub(r"(\*\*|__|\*|_)(.+?)\1", r"\2", out)    # **bold**, _italic_
    out = out.strip().strip(QUOTES).strip()
    if len(out) >= 2 and out[-1] in QUOTES:                # "the caption." -> the caption.
        out = out[:-1].strip()
    return " ".join(out.split()), obj


def _tokens(text: str) -> list[str]:
    return re.findall(r"\w+(?:[-']\w+)*", text.lower())


def word_edit_distance(a: list[str], b: list[str]) -> int:
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        cur = [i]
        for j, y in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y)))
        prev = cur
    return prev[-1]


def word_diff(old: str, new: str) -> tuple[str, list[str]]:
    """'old words -> new words; ...' for the changed spans, and the words the new text added."""
    a, b = old.split(), new.split()
    parts, added = [], []
    key = lambda w: re.sub(r"[^\w'-]", "", w.lower())    # align words, not punctuation
    sm = difflib.SequenceMatcher(a=[key(w) for w in a], b=[key(w) for w in b], autojunk=False)
    for op, i1, i2, j1, j2 in sm.get_opcodes():
        if op != "equal":
            parts.append(f"{' '.join(a[i1:i2]) or '(nothing)'} -> {' '.join(b[j1:j2]) or '(nothing)'}")
            added += _tokens(" ".join(b[j1:j2]))
    return "; ".join(parts), added


@dataclass
class StepLimits:
    max_edit_frac: float = 0.25            # word edits allowed, as a fraction of the caption
    min_edit: int = 4                      # ... but never fewer than this
    max_length_change: float = 0.2         # word count may change by this fraction
    min_length_change: int = 3             # ... or by this many words


def check_step(prev: str, new: str, earlier_added: list[list[str]], limits: StepLimits) -> str | None:
    """None if `new` is an acceptable one-error edit of `prev`, else the rejection reason."""
    a, b = _tokens(prev), _tokens(new)
    if not b:
        return "empty"
    if a == b:
        return "unchanged"
    slack = max(limits.min_length_change, round(limits.max_length_change * len(a)))
    if len(b) < len(a) - slack:
        return "too_short"
    if len(b) > len(a) + slack:
        return "too_long"
    if word_edit_distance(a, b) > max(limits.min_edit, round(limits.max_edit_frac * len(a))):
        return "too_different"
    present = set(b)
    if any(w not in present for added in earlier_added for w in added):
        return "lost_earlier_error"
    return None


class RunStats:
    """Thread-safe counters for the end-of-run summary."""

    def __init__(self):
        self._lock = threading.Lock()
        self.counts: dict[str, Counter] = {}

    def add(self, group: str, key: str, n: int = 1) -> None:
        with self._lock:
            self.counts.setdefault(group, Counter())[key] += n

    def as_dict(self) -> dict:
        with self._lock:
            return {g: dict(sorted(c.items())) for g, c in self.counts.items()}


class StepFailed(ChatError):
    """Every try at one step was rejected; the record is written as failed with what was built."""


TYPE_ALIASES = {"colour": "color", "position": "spatial", "location": "scene", "place": "scene",
                "order": "temporal", "time": "temporal", "number": "count", "quantity": "count",
                "size": "attribute", "motion": "direction", "human": "person", "people": "person"}


def _known_type(name) -> str:
    name = str(name or "").lower()
    for key in list(ERROR_TYPES) + list(TYPE_ALIASES):
        if key in name:
            return TYPE_ALIASES.get(key, key)
    return "other"


def chat_messages(system: str, user: str) -> list[dict]:
    """One request's messages: the system prompt, then the user's."""
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


def degrade_messages(caption: str, etype: str | None, earlier: list[str]) -> list[dict]:
    """The prompt for one step: add one error of `etype` (or of the LLM's choice when None)."""
    if etype is None:
        what = ("Introduce exactly one factual error of a kind you choose (an object, colour, attribute, "
                "action, count, position, order of events, direction of motion, place, person or camera "
                "detail).")
        fmt = '{"caption": "<the edited caption>", "type": "<the kind of error>"}'
    else:
        what = f"Introduce exactly one error of this kind: {ERROR_TYPES[etype].instruction}."
        fmt = '{"caption": "<the edited caption>"}'
    keep = ("Keep the wording, the sentence structure and the length; change only the few words needed, "
            "and keep the caption fluent.")
    if earlier:
        keep += (" The caption already contains these deliberate errors; keep each of them exactly as it is: "
                 + "; ".join(earlier) + ".")
    user = (f"Caption:\n{caption}\n\n{what} {keep}\nReply with JSON only: {fmt}\n"
            'If this kind of error cannot be introduced into this caption, reply {"cannot_apply": true}.')
    return chat_messages("You write hard negative captions for training video-language "
                         "models: you edit a caption so that it becomes wrong about exactly one fact.", user)


def degrade_schema(choose_type: bool) -> dict:
    """What llm_step reads from a reply: the edited caption, the "cannot apply" flag and, when
    the LLM chooses the error (unconditioned), its kind."""
    fields = {"caption": {"type": "string"}, "cannot_apply": {"type": "boolean"}}
    if choose_type:
        fields["type"] = {"type": "string"}
    return json_schema("degraded_caption", fields)


def llm_step(client: ChatClient, prev: str, etype: str | None, earlier: list[dict],
             limits: StepLimits, stats: RunStats, tries: int, rng: random.Random,
             applicable: list[str], look: Callable[[list[dict]], list[dict]] = text_only) -> tuple[str, dict]:
    """One accepted degradation of `prev` by the LLM: (caption, {"type", "detail"}).

    A rejected reply is asked again; "cannot apply" removes that type and samples another one
    among the applicable types. Raises StepFailed when every try is rejected. look(messages):
    what is sent (Frames.look: the record's frames with the text)."""
    added_before = [e["_added"] for e in earlier]
    notes = [e["detail"] for e in earlier]
    reasons = []
    for _ in range(tries):
        reply = client.chat(look(degrade_messages(prev, etype, notes)), schema=degrade_schema(etype is None),
                            max_tokens=max(64, 3 * len(prev.split()) + 48))
        caption, obj = clean_reply(reply.text)
        refused = bool(obj.get("cannot_apply")) or (
            REFUSAL.search(caption) is not None and
            len(set(_tokens(caption)) & set(_tokens(prev))) < 0.5 * len(set(_tokens(prev))))
        reason = "cannot_apply" if refused else check_step(prev, caption, added_before, limits)
        if reason is None:
            detail, added = word_diff(prev, caption)
            chosen = etype if etype is not None else _known_type(obj.get("type"))
            stats.add("steps_by_type", chosen)
            return caption, {"type": chosen, "detail": detail, "_added": added}
        reasons.append(reason)
        stats.add("rejected", reason)
        if reason == "cannot_apply" and etype is not None:
            applicable = [t for t in applicable if t != etype]
            if not applicable:
                break
            etype = rng.choice(applicable)
    raise StepFailed(f"every try rejected ({', '.join(reasons)})")


def http_chain(record: dict, client: ChatClient, length: int, seed: int, unconditioned: bool,
               limits: StepLimits, stats: RunStats, tries: int, allowed: set[str] | None = None,
               look: Callable[[list[dict]], list[dict]] = text_only) -> tuple[list[str], list[dict | None]]:
    """c0..cK by repeated LLM degradation; each step keeps every earlier error. `allowed`: the
    error types a step may use (--error_types; None: any); look: as in llm_step."""
    rng = random.Random(f"{seed}:{record['id']}")
    chain, errors = [record["caption"]], [None]
    for k in range(1, length + 1):
        types = applicable_error_types(chain[-1], allowed)
        if not types and not unconditioned:
            what = f"of the types {', '.join(sorted(allowed))} " if allowed else ""
            raise StepFailed(f"step {k}: no error type {what}applies to the caption",
                             details={"partial_chain": chain, "partial_errors": _public_errors(errors)})
        etype = None if unconditioned else rng.choice(types)
        try:
            caption, err = llm_step(client, chain[-1], etype, errors[1:], limits, stats, tries, rng, types,
                                    look)
        except StepFailed as e:
            raise StepFailed(f"step {k}: {e}", details={"partial_chain": chain,
                             "partial_errors": _public_errors(errors)}) from None
        chain.append(caption)
        errors.append(err)
    return chain, _public_errors(errors)


def _public_errors(errors: list[dict | None]) -> list[dict | None]:
    return [None if e is None else {k: v for k, v in e.items() if not k.startswith("_")} for e in errors]


# =============================================================================================
# Asking until a reply parses, and asking in both orders (eval_judge.py's judge uses both)
# =============================================================================================

@dataclass
class Asked:
    """One question put to an LLM (or answered by rules) and what came of it."""
    value: object = None                   # what the parser made of the usable reply
    tries: int = 1                         # requests sent, the usable one included (the data cost)
    reply: str = ""                        # the last reply
    problems: list[str] = field(default_factory=list)   # the last reply's; empty when it was usable
    rejected: list[str] = field(default_factory=list)   # each unusable reply's problems, in order

    @property
    def ok(self) -> bool:
        return not self.problems


JSON_REASK = "Reply again with only the JSON object I asked for."
# How a short problem name reads in a re-ask; any other problem is said as it is.
PROBLEM_TEXT = {"unreadable": "I could not read the answer I asked for in it",
                "refused": "it declines the task", "empty": "it is empty",
                "too_short": "it is shorter than the longest of the short captions"}


def ask_until_parsed(client: ChatClient, messages: list[dict], parse: Callable[[str], tuple],
                     reask: str, tries: int, stats: RunStats | None = None, **params) -> Asked:
    """Ask until parse(reply) -> (value, problems) names no problem, `tries` requests at most.

    After an unusable reply the conversation is kept and goes on with what was wrong and
    `reask` (what to send again), so the model sees its own reply and the problem: re-sending
    the same prompt only helps a sampling model, and a judge at temperature 0 would repeat
    itself. Each problem is counted under stats["rejected"]. When every try fails, the result
    is not ok (the caller records the failure); a ChatError (the request itself failed for
    good) propagates. params go to client.chat, schema= among them (structured output; the
    parser still checks every reply)."""
    messages, rejected = list(messages), []
    reply, problems = "", ["not asked (no tries)"]
    for attempt in range(1, tries + 1):
        reply = client.chat(messages, **params).text
        value, problems = parse(reply)
        if not problems:
            return Asked(value, attempt, reply, [], rejected)
        rejected.append("; ".join(problems))
        if stats is not None:
            for problem in problems:
                stats.add("rejected", problem_kind(problem))
        said = "; ".join(PROBLEM_TEXT.get(p, p) for p in problems)
        messages += [{"role": "assistant", "content": reply},
                     {"role": "user", "content": f"I could not use your reply: {said}. {reask}"}]
    return Asked(None, max(0, tries), reply, problems, rejected)


def problem_kind(problem: str) -> str:
    """A problem as counted in the summary: without its numbers and quoted words, so "option 2
    lacks the error of caption 1 ('blue')" counts as "option N lacks the error of caption N"."""
    return " ".join(re.sub(r"\d+", "N", re.sub(r"\s*\([^)]*\)", "", problem)).split())


def read_reply(parse: Callable[[str], object], text: str) -> tuple[object, list[str]]:
    """parse(text) for ask_until_parsed, from a parser that gives None for an unusable reply:
    the problem is "refused" (no JSON and a refusal) or "unreadable"."""
    value = parse(text)
    if value is not None:
        return value, []
    return None, ["refused" if parse_json_object(text) is None and REFUSAL.search(text) else "unreadable"]


def ask_or_fail(client: ChatClient, messages: list[dict], parse: Callable[[str], tuple], reask: str,
                tries: int, stats: RunStats, **params) -> Asked:
    """ask_until_parsed for one data step: the usable reply, else StepFailed naming every
    rejected reply (the record is written as failed with them and the last reply, "reply")."""
    asked = ask_until_parsed(client, messages, parse, reask, tries, stats, **params)
    if not asked.ok:
        raise StepFailed(f"every try rejected ({', '.join(asked.rejected)})", details={"reply": asked.reply})
    return asked


@dataclass
class Comparison:
    """a against b, asked in both orders (ask_both_orders)."""
    verdicts: list                         # each order's verdict as given: "1", "2" or "tie"
    a_view: list[str]                      # the same from a's side: "a", "b" or "tie"
    result: str                            # a's result: "win", "loss" or "tie"
    tries: int                             # requests both orders took
    failed: Asked | None = None            # the ask that got no usable verdict (then no result)


def ask_both_orders(pick: Callable[[str, str], Asked], a: str, b: str) -> Comparison:
    """Compare a and b with pick(first, second) -> Asked of "1", "2" or "tie", asked twice
    with the positions swapped.

    Judges favour a position (often the first); a wins only if it wins in both orders, loses
    only if it loses in both, and everything else is a tie (combine_orders): a pure position
    bias cancels instead of being averaged into the result. When an order gets no usable
    verdict the other is not asked and `failed` holds that ask."""
    asks = []
    for first, second in ((a, b), (b, a)):
        asks.append(pick(first, second))
        if not asks[-1].ok:
            return Comparison([x.value for x in asks[:-1]], [], "", sum(x.tries for x in asks), asks[-1])
    verdicts = [x.value for x in asks]
    # Each verdict from a's point of view: in the swapped order, "2" means a.
    a_view = [{"1": "a", "2": "b"}.get(verdicts[0], "tie"), {"1": "b", "2": "a"}.get(verdicts[1], "tie")]
    return Comparison(verdicts, a_view, combine_orders(*a_view), sum(x.tries for x in asks))


def combine_orders(first: str, second: str) -> str:
    """"a"/"b"/"tie" from each order -> "win"/"loss"/"tie" for a (win needs both orders)."""
    if first == second == "a":
        return "win"
    if first == second == "b":
        return "loss"
    return "tie"


# =============================================================================================
# Checking what the teacher writes (recaption and the on-policy steps)
# =============================================================================================
# A degradation step is checked against the caption it edits (check_step). Everything else the
# teacher writes is checked here before it becomes data: a caption or an answer must be plain
# text (a small model answers with the JSON template, a link or a heading), must not give the
# instructions back (the placeholder "<the corrected caption>", "Reply with JSON") or talk to
# the user ("I'm sorry for any confusion"), must be about what it was written from (a clean
# list of tips is not a corrected caption) and have a length that fits what it stands for. A
# problem is said back in the re-ask and counted under "rejected" by its name
# (ask_until_parsed, problem_kind); the part in parentheses is detail.

MARKUP = re.compile(r"[{}\[\]`]|<\s*/?\s*[a-z][^<>]*>|https?://|\bwww\.|(?:^|\s)#{1,6}\s"  # JSON, code, HTML,
                    r"|^\s*(?:\d{1,2}[.)]|[-*•])\s"                      # links, headings; a list;
                    r"|\b\w+\s*=\s*[fbr]?[\"']", re.I)                   # code: new_text = f"..."
PLACEHOLDER = re.compile(r"<[^<>]*\s[^<>]*>")           # <the corrected caption>
TEMPLATE_REMNANT = re.compile(r"\bjson\b|\breply (?:with|again|only)\b|\bplaceholder\b|\b(?:your|the) "
                              r"(?:answer|caption|question|text|description) (?:here|goes)\b", re.I)
# Words that state no fact: left out when a text's words are traced to what it was written from.
GLUE_WORDS = set("the a an is are was were be it its they there this that these those of and to "
                 "in on at with which who has have had does do".split())
ECHO_WORDS = 6                             # this many words in a row from the instructions: an echo
# The model talking to the user ("I'm sorry for any confusion", "please"): a caption speaks of the video.
CHAT_TALK = re.compile(r"\b(?:I|I'm|I'll|I've|I'd)\b|\b(?i:you're|you'll|you've|you'd|please|sorry|thanks|thank you)\b")


def instruction_words(messages: list[dict], *data: str) -> list[str]:
    """The words of a request's own text (system and user prompts) without the data put into
    it (captions, references): what a reply must not give back."""
    text = "\n".join(m["content"] for m in messages if isinstance(m.get("content"), str))
    for d in sorted(data, key=len, reverse=True):
        text = text.replace(d, "\n")
    return _tokens(text)


def echoed_run(words: list[str], instruction: list[str]) -> int:
    """The longest run of words the reply shares, in order, with the instructions."""
    sm = difflib.SequenceMatcher(a=words, b=instruction, autojunk=False)
    return sm.find_longest_match(0, len(words), 0, len(instruction)).size


def text_problems(text: str, instruction: list[str], min_words: int, max_words: int,
                  sources: tuple[str, ...] = (), floor: float = 0.0) -> list[str]:
    """What makes a teacher-written caption or answer unusable; [] when nothing does. sources,
    floor: the texts it is written from (a reference, a sample, short captions) and the least
    share of its words (glue words aside) that must come from them: a reply about something
    else (a list of tips, an apology) is off topic, however clean."""
    words = _tokens(text)
    if not words:
        return ["empty"]
    problems = []
    if MARKUP.search(text):
        problems.append("markup (JSON braces or brackets, code, a link, HTML, a heading or a list)")
    if PLACEHOLDER.search(text) or TEMPLATE_REMNANT.search(text):
        problems.append("template remnant (a placeholder or the reply format instead of content)")
    run = echoed_run(words, instruction)
    if run >= ECHO_WORDS:
        problems.append(f"prompt echo ({run} words in a row of my instructions)")
    if CHAT_TALK.search(text):
        problems.append("chat talk (it speaks to me instead of describing the video)")
    content = [w for w in words if w not in GLUE_WORDS]
    known = {w for s in sources for w in _tokens(s)}
    share = sum(w in known for w in content) / max(1, len(content))
    if sources and content and share < floor:
        problems.append(f"off_topic (only {share:.0%} of its words are in what it was written from)")
    if len(words) < min_words:
        problems.append(f"too_short (fewer than {min_words} words)")
    elif len(words) > max_words:
        problems.append(f"too_long (more than {max_words} words)")
    return problems


def length_bounds(*texts: str, low: float = 0.5, high: float = 2.0, slack: int = 10) -> tuple[int, int]:
    """Word bounds for a text that stands in for `texts` (a reference, a sample): at least
    `low` times the shortest (3 words at least), at most `high` times the longest plus `slack`."""
    sizes = [len(_tokens(t)) for t in texts]
    return max(3, int(low * min(sizes))), int(high * max(sizes)) + slack


def checked_reply(parse: Callable[[str], object], check: Callable[[object], list[str]],
                  text: str) -> tuple[object, list[str]]:
    """parse(text) for ask_until_parsed as read_reply reads it, then check(value): the value,
    or None and the problems of the one or the other."""
    value, problems = read_reply(parse, text)
    if not problems:
        problems = check(value)
    return (None, problems) if problems else (value, [])


GROUNDED = 0.5     # improve, qa answers: at least half their words from the reference (and sample)
RECAPTION_GROUNDED = 0.25   # recaption adds detail (and, with frames, what the video shows)


def check_correction(ref: str, sample: str, instruction: list[str], bounds: tuple[int, int],
                     value) -> list[str]:
    """improve: a corrected caption, or ALREADY_CORRECT (the teacher finds nothing to fix)."""
    if value is ALREADY_CORRECT:
        return []
    problems = text_problems(value, instruction, *bounds, (ref, sample), GROUNDED)
    if _tokens(value) == _tokens(sample):
        problems.append('unchanged (a caption that needs no fix is answered {"already_correct": true})')
    return problems


QUESTION_START = re.compile(r"^(?:what|which|who|whom|whose|where|when|why|how|in what|on what|"
                            r"is|are|was|were|does|do|did|has|have|had|can|could|will|would)\b", re.I)


def check_qa(caption: str, instruction: list[str], items: list[dict]) -> list[str]:
    """qa: each question a plain question about the video, each answer a plain sentence from
    the caption that is not the question given back."""
    problems = []
    for i, it in enumerate(items, 1):
        q, a = it["question"], it["answer"]
        if not (QUESTION_START.match(q) and q.endswith("?") and len(_tokens(q)) >= 2) or MARKUP.search(q):
            problems.append(f"question {i} is not a plain question (it starts like What/Which/How/Is "
                            "and ends with '?')")
        for p in text_problems(a, instruction, 1, 80, (caption, q), GROUNDED):
            problems.append(f"answer {i}: {p}")
        if _tokens(a) == _tokens(q):
            problems.append(f"answer {i} repeats its question")
    return problems


def check_claims(caption: str, claims: list[str]) -> list[str]:
    """rlaifv: each claim a statement taken from the caption it was split from: plain text,
    and its words (bar glue words such as 'the' or 'is') the caption's own."""
    said, problems = set(_tokens(caption)), []
    for i, claim in enumerate(claims, 1):
        if MARKUP.search(claim) or PLACEHOLDER.search(claim) or TEMPLATE_REMNANT.search(claim):
            problems.append(f"claim {i} is not plain text")
            continue
        new = [w for w in _tokens(claim) if w not in said and w not in GLUE_WORDS]
        if not _tokens(claim) or new:
            problems.append(f"claim {i} is not from the caption ({', '.join(new[:5]) or 'empty'})")
    if len({tuple(_tokens(c)) for c in claims}) < len(claims):
        problems.append("repeated claims")
    return problems


# =============================================================================================
# The LM reward of LLaVA-Hound-DPO: a detailed caption stands in for the video
# =============================================================================================

def reward_messages(caption: str, question: str, answer: str) -> list[dict]:
    user = (f"Video description (your only evidence about the video):\n{caption}\n\n"
            f"Question: {question}\nAnswer to judge: {answer}\n\n"
            "Is the answer correct according to the description? Reply with JSON only: "
            '{"verdict": "yes" or "no", "score": <integer 0-5: 5 = correct and complete, '
            '0 = wrong or unsupported by the description>, "explanation": "<one sentence>"}')
    return chat_messages("You grade answers to questions about a video you cannot see. "
                         "A detailed description of the video is the evidence; judge only by it.", user)


REWARD_SCHEMA = json_schema("answer_reward", {"verdict": {"type": "string", "enum": ["yes", "no"]},
                                              "score": {"type": "integer", "minimum": 0, "maximum": 5},
                                              "explanation": {"type": "string"}})


def parse_reward(text: str) -> dict | None:
    """{"verdict", "score", "explanation"} from a judge reply, or None if it cannot be read."""
    obj = parse_json_object(text) or {}
    verdict, score = obj.get("verdict", obj.get("correct")), obj.get("score", obj.get("rating"))
    if score is None:                      # prose: "Score: 4"
        m = re.search(r"\bscore\b\D{0,12}(\d+)", text or "", re.I)
        score = m.group(1) if m else None
    try:
        score = int(float(score))
    except (TypeError, ValueError):
        return None
    if isinstance(verdict, bool):
        verdict = "yes" if verdict else "no"
    verdict = str(verdict or "").strip().lower()
    if verdict not in ("yes", "no"):
        m = re.search(r"\bverdict\b\W{0,6}(yes|no)\b", text or "", re.I)
        verdict = m.group(1).lower() if m else ("yes" if score >= 3 else "no")
    return {"verdict": verdict, "score": score, "explanation": str(obj.get("explanation", "")).strip()}


def check_reward(reward: dict) -> list[str]:
    if not 0 <= reward["score"] <= 5:
        return [f"score out of range ({reward['score']}; it is 0 to 5)"]
    # The prompt defines 5 as correct and 0 as wrong: a verdict that says the opposite is a guess.
    if (reward.get("verdict"), reward["score"]) in (("no", 5), ("yes", 0)):
        return [f"verdict contradicts score ({reward['verdict']!r} with {reward['score']}; 5 = correct, 0 = wrong)"]
    return []


def score_answer(client: ChatClient, caption: str, question: str, answer: str, tries: int = 3,
                 stats: RunStats | None = None) -> dict:
    """LM reward: {"verdict": "yes"|"no", "score": 0..5, "explanation"}. An unreadable reply or
    a score out of range is asked again (ask_until_parsed, counted in `stats`); after `tries` a
    ChatError (the record is written as failed)."""
    asked = ask_until_parsed(client, reward_messages(caption, question, answer),
                             partial(checked_reply, parse_reward, check_reward), JSON_REASK, tries, stats,
                             schema=REWARD_SCHEMA,
                             max_tokens=200)
    if not asked.ok:
        raise ChatError(f"unreadable reward reply after {tries} tries ({', '.join(asked.rejected)}): "
                        f"{' '.join(asked.reply.split())[:80]!r}")
    return asked.value


def rank_answers(answers: list[str], scored: list[dict], pairs: bool) -> list[int]:
    """Answer indices best first: by score, a 'yes' verdict breaking ties, one answer per
    distinct score so the chain is strictly ordered (pairs: just the best and the worst)."""
    order = sorted(range(len(answers)), key=lambda i: (-scored[i]["score"], scored[i]["verdict"] != "yes", i))
    keyed, seen = [], set()
    for i in order:
        key = (scored[i]["score"], scored[i]["verdict"])
        if key not in seen:
            seen.add(key)
            keyed.append(i)
    if pairs and len(keyed) >= 2:
        keyed = [keyed[0], keyed[-1]]
    return keyed


# =============================================================================================
# A command: its inputs, a rules function and an LLM function per record; one runner
# =============================================================================================

def toy_world():
    """The embedded toy world (synthetic.py: synthetic videos, their facts, the rules backends).
    Imported here and nowhere else, so the http path never loads it."""
    import synthetic
    return synthetic


def run_command(name: str, args, records: list[dict], *, rules: Callable | None = None,
                llm: Callable | None = None, taught: Callable | None = None,
                offline: Callable | None = None, left_out: int | None = None,
                then: Callable[[], dict] | None = None, frames: "Frames | None" = None) -> dict:
    """Every record of a command through its backend, resumably, then the summary.

    The per-record functions return the output record (or raise a RecordFailed: the record is
    written as failed with the reason):
      rules(rec, world, stats)    --backend rules: the toy world (toy_world()), one record at a time
      llm(rec, client, stats)     --backend http (the default): a ChatClient from the command
                                  line, --concurrency records at once
      taught(rec, teacher, stats) either backend: the teacher is the scene's facts (RulesTeacher)
                                  or the LLM (LLMTeacher)
      offline(rec)                no backend (mcq, ynq)
    then() runs after the records; what it returns joins the summary, as does the size of the
    requests when `frames` (the run's Frames, which LLMTeacher looks through) is given."""
    if taught is not None:
        rules = lambda rec, world, stats: taught(rec, RulesTeacher(world), stats)
        llm = lambda rec, client, stats: taught(rec, LLMTeacher(client, args.step_tries, stats, frames), stats)
    stats, client, concurrency = RunStats(), None, 1
    if offline is not None:
        one = offline
    elif getattr(args, "backend", "http") == "rules":
        world = toy_world()
        one = lambda rec: rules(rec, world, stats)
    else:
        client, concurrency = ChatClient.from_args(args), args.concurrency
        one = lambda rec: llm(rec, client, stats)
    desc = f"{name} ({args.backend})" if hasattr(args, "backend") else name
    run = map_resumable(records, one, args.out, concurrency, desc, args.retry_failed,
                        postfix=client.progress if client is not None else None)
    if then is not None:
        run = {**run, **then()}
    if frames is not None:
        run = {**run, **frames.summary()}
    return _finish(name, run, stats, client, left_out)


def _finish(name: str, run: dict, stats: RunStats | None = None, client: ChatClient | None = None,
            left_out: int | None = None) -> dict:
    summary = {"command": name, **run}
    if left_out is not None:
        summary["failed_inputs_left_out"] = left_out
    if stats is not None:
        summary.update(stats.as_dict())
    if client is not None:
        summary.update(client.report(run))
    print("summary: " + json.dumps(summary), file=sys.stderr)
    return summary


def _base_record(rec: dict) -> dict:
    out = {"id": rec["id"]}
    if rec.get("video") is not None:
        out["video"] = rec["video"]
    return out


def _record_rng(seed: int, rec: dict) -> random.Random:
    """A record's own random stream: the same output for it whatever else the run holds."""
    return random.Random(f"{seed}:{rec['id']}")


# =============================================================================================
# Subcommands
# =============================================================================================

def cmd_synth(args) -> dict:
    """The embedded data set (synthetic.py): videos, gold captions and facts ->
    DIR/train.jsonl, DIR/test.jsonl, DIR/videos/. Deterministic by seed; re-run after a kill."""
    if args.n < 1:
        raise SystemExit("synth: --n must be at least 1")
    train, test = toy_world().write_dataset(args.out, args.n, args.seed, args.test_frac, args.frames,
                                            args.size)
    return _finish("synth", {"train": train, "test": test, "out": args.out})


def cmd_benchmarks(args) -> dict:
    """The embedded world as TempCompass, VidHal, VDC and ARGUS sets in their published layouts
    (synthetic.write_benchmarks), with H.264 clips: eval_judge.py's benchmark commands offline,
    scored by the tiny model and --judge rules. Deterministic by seed; re-run after a kill."""
    if args.n < 1:
        raise SystemExit("benchmarks: --n must be at least 1")
    counts = toy_world().write_benchmarks(args.out, args.n, args.seed, args.frames, args.size)
    return _finish("benchmarks", {**counts, "out": args.out})


def run_frames(args, path: str, found: list[tuple[int, dict]]) -> Frames:
    """The run's Frames (--frames), every record's video found up front."""
    frames = Frames.from_args(args)
    if frames.n and getattr(args, "backend", "http") != "http":
        raise SystemExit(f"{args.command}: --frames is for --backend http (the LLM looks at the video; "
                         "the rules read the stored facts)")
    frames.find_videos(path, found)
    return frames


def recaption_messages(captions: list[str]) -> list[dict]:
    listed = "\n".join(f"- {c}" for c in captions)
    user = (f"Short captions written by different people for the same video:\n{listed}\n\n"
            "Write one detailed caption of the video that states every fact these captions give "
            "(objects, colours, counts, actions, positions, directions, the order of events, the scene), "
            "without inventing anything they do not support. Reply with the caption only.")
    return chat_messages("You write detailed, accurate video captions.", user)


def source_captions(rec: dict) -> list[str] | None:
    """The short captions of a recaption input ("captions", or one "caption"), None if unusable."""
    srcs = rec.get("captions", rec.get("caption"))
    srcs = [srcs] if isinstance(srcs, str) else srcs
    if not isinstance(srcs, list) or not srcs or not all(isinstance(s, str) and s.strip() for s in srcs):
        return None
    return srcs


# A structured reply is {"caption": ...}; clean_reply reads the caption out of it.
CAPTION_SCHEMA = json_schema("caption", {"caption": {"type": "string"}})


def parse_recaption(min_words: int, instruction: list[str], max_words: int, sources: list[str],
                    text: str) -> tuple[str | None, list[str]]:
    """The detailed caption in a reply, or why it is unusable: empty, refused, too_short (fewer
    words than the longest short caption), or a problem of text_problems (markup, a template
    remnant, a prompt echo, chat talk, off topic: under a quarter of its words from the short
    captions, or longer than max_words)."""
    caption, _ = clean_reply(text)
    words = _tokens(caption)
    refused = re.match(r"(?:i|sorry|unfortunately|as an)\b", caption, re.I) and REFUSAL.search(caption)
    reason = "empty" if not words else "refused" if refused else "too_short" if len(words) < min_words else None
    if reason is not None:
        return None, [reason]
    problems = text_problems(caption, instruction, 1, max_words, tuple(sources), RECAPTION_GROUNDED)
    return (caption, []) if not problems else (None, problems)


def cmd_recaption(args) -> dict:
    records = []
    found, left_out = read_records(args.inp, {})
    for line, rec in found:
        if source_captions(rec) is None:
            raise DataError(args.inp, line, "expected 'captions' (a list of strings) or 'caption' (a string)",
                            "captions")
        records.append(rec)
    frames = run_frames(args, args.inp, found)
    return run_command("recaption", args, records, llm=partial(recaption_by_llm, args.step_tries, frames),
                       left_out=left_out, frames=frames)


def recaption_by_llm(tries: int, frames: Frames, rec: dict, client: ChatClient, stats: RunStats) -> dict:
    """One detailed caption of the record's short captions (and, with --frames, of its video):
    at least as long as the longest short caption, at most twice all of them and 60 words more."""
    srcs = source_captions(rec)
    longest = max(len(_tokens(s)) for s in srcs)
    messages = recaption_messages(srcs)
    parse = partial(parse_recaption, longest, instruction_words(messages, *srcs),
                    2 * sum(len(_tokens(s)) for s in srcs) + 60, srcs)
    asked = ask_or_fail(client, frames.attach(messages, rec["id"]), parse,
                        "Reply again with the caption only.", tries, stats, schema=CAPTION_SCHEMA)
    return {**_base_record(rec), "caption": asked.value, "source_captions": srcs, "status": "ok"}


def _chain_inputs(args) -> tuple[list[dict], int, Frames]:
    require = {"caption": str}
    if args.backend == "rules":
        require["facts"] = dict        # the rule backend edits the stored facts (records from synth)
    found, left_out = read_records(args.inp, require)
    if args.backend == "rules":
        _rules_error_types(args, toy_world())     # a type the rules cannot make stops the run here
    return [rec for _, rec in found], left_out, run_frames(args, args.inp, found)


def _rules_error_types(args, world) -> set[str] | None:
    """--error_types for the rules degrader, which knows only the synthetic world's fact types."""
    if args.error_types is None:
        return None
    usable = args.error_types & set(world.RULES_ERROR_TYPES)
    if not usable:
        raise SystemExit(f"{args.command} --backend rules: the synthetic world has no "
                         f"{', '.join(sorted(args.error_types))} facts to change (its types: "
                         f"{', '.join(world.RULES_ERROR_TYPES)})")
    return usable


def _limits(args) -> StepLimits:
    return StepLimits(max_edit_frac=args.max_edit_frac, max_length_change=args.max_length_change)


def _chain_record(args, rec: dict, chain: list[str], errors: list, **extra) -> dict:
    return {**_base_record(rec), "prompt": rec.get("prompt", args.prompt), "chain": chain, "errors": errors,
            **extra, "status": "ok"}


def cmd_chains(args) -> dict:
    """c0 > c1 > ... > cK per record: --backend rules (offline, from facts) or http (an LLM)."""
    records, left_out, frames = _chain_inputs(args)
    if args.unconditioned and args.error_types and args.backend == "http":
        raise SystemExit("chains: --unconditioned lets the LLM choose the error, --error_types "
                         "restricts it; give one of them")
    return run_command("chains", args, records, rules=partial(chain_by_rules, args),
                       llm=partial(chain_by_llm, args, frames), left_out=left_out, frames=frames)


def chain_by_rules(args, rec: dict, world, stats: RunStats) -> dict:
    try:
        chain, errors = world.rules_chain(rec, args.length, args.seed, args.unconditioned,
                                          _rules_error_types(args, world))
    except ValueError as e:
        raise StepFailed(str(e)) from None
    for e in errors[1:]:
        stats.add("steps_by_type", e["type"])
    return _chain_record(args, rec, chain, errors)


def chain_by_llm(args, frames: Frames, rec: dict, client: ChatClient, stats: RunStats) -> dict:
    chain, errors = http_chain(rec, client, args.length, args.seed, args.unconditioned, _limits(args),
                               stats, args.step_tries, args.error_types, frames.look(rec["id"]))
    return _chain_record(args, rec, chain, errors)


def cmd_inject(args) -> dict:
    """The error-injection baseline: K independent one-error negatives of the gold caption.
    Written as a chain record whose negatives are NOT ordered among themselves
    ("ranking": "best_only"): train it with an objective that only uses the best
    (--objective mpo or dpo), not with rank."""
    records, left_out, frames = _chain_inputs(args)
    return run_command("inject", args, records, rules=partial(inject_by_rules, args),
                       llm=partial(inject_by_llm, args, frames), left_out=left_out, frames=frames)


def inject_by_rules(args, rec: dict, world, stats: RunStats) -> dict:
    made = world.inject_negatives(rec, args.length, _record_rng(args.seed, rec), _rules_error_types(args, world))
    if made is None:
        raise StepFailed(f"too few distinct one-fact changes for --length {args.length}")
    negatives, errors = made
    return _inject_record(args, rec, negatives, errors, stats)


def inject_by_llm(args, frames: Frames, rec: dict, client: ChatClient, stats: RunStats) -> dict:
    """K negatives, each one LLM step from the gold caption; an error type is not used twice
    while unused ones apply, and a negative equal to an earlier one is asked again."""
    rng, gold, limits = _record_rng(args.seed, rec), rec["caption"], _limits(args)
    negatives, errors = [], []
    types = applicable_error_types(gold, args.error_types)
    if not types:
        what = f"of the types {', '.join(sorted(args.error_types))} " if args.error_types else ""
        raise StepFailed(f"no error type {what}applies to the caption")
    for k in range(args.length):
        pool = [t for t in types if t not in {e["type"] for e in errors}] or types
        for _ in range(args.step_tries):
            try:
                caption, err = llm_step(client, gold, rng.choice(pool), [], limits, stats,
                                        args.step_tries, rng, types, frames.look(rec["id"]))
            except StepFailed as e:
                raise StepFailed(f"negative {k + 1}: {e}", details={"partial_chain": [gold, *negatives]})
            if caption not in negatives:
                break
            stats.add("rejected", "duplicate")
        else:
            raise StepFailed(f"negative {k + 1}: only duplicates of earlier negatives")
        negatives.append(caption)
        errors.append(err)
    return _inject_record(args, rec, negatives, errors, stats)


def _inject_record(args, rec: dict, negatives: list[str], errors: list[dict], stats: RunStats) -> dict:
    for e in errors:
        stats.add("steps_by_type", e["type"])
    return _chain_record(args, rec, [rec["caption"], *negatives], _public_errors([None, *errors]),
                         ranking="best_only")


def _read_chains(path: str, ordered: bool = False) -> tuple[list[dict], int]:
    """Chain records from `chains`/`inject`; failed records are counted, not converted.
    ordered: every caption must hold the errors of the ones before it (not `inject` output)."""
    records = []
    found, failed = read_records(path, {})
    for line, rec in found:
        if ordered and rec.get("ranking") == "best_only":
            raise DataError(path, line, "an error-injection record: its negatives are independent, not "
                            "a chain whose errors accumulate, so they cannot be stated in order; "
                            "use `chains` output", "ranking")
        chain = rec.get("chain")
        if not isinstance(chain, list) or len(chain) < 2 or not all(isinstance(c, str) and c for c in chain):
            raise DataError(path, line, "expected a list of at least two non-empty strings", "chain")
        if len(set(chain)) != len(chain):
            raise DataError(path, line, "repeated caption in the chain", "chain")
        records.append(rec)
    return records, failed


def cmd_mcq(args) -> dict:
    """Chains -> multiple-choice chains, the chain becoming the letters best first (the letter of
    c0's option, then c1's, ...). --backend rules: the options are the captions themselves under
    --question; http: an LLM writes one question whose options are the facts the captions differ
    in (chain_statements). Options are shown in a seeded random order."""
    records, failed = _read_chains(args.inp, ordered=args.backend == "http")
    if args.backend == "rules":
        return run_command("mcq", args, records, offline=partial(mcq_record, args.question, args.seed),
                           left_out=failed)
    return run_command("mcq", args, records, llm=partial(mcq_by_llm, args.seed, args.step_tries),
                       left_out=failed)


def mcq_record(question: str, seed: int, rec: dict) -> dict:
    return _mcq_chain_record(rec, question, rec["chain"], seed)


def _mcq_chain_record(rec: dict, asking: str, best_first: list[str], seed: int, **extra) -> dict:
    options = list(best_first)
    _record_rng(seed, rec).shuffle(options)
    letters = [LETTERS[options.index(c)] for c in best_first]
    return {**_base_record(rec), "prompt": format_mcq(asking, options), "chain": letters,
            "options": options, "errors": rec.get("errors"), **extra, "status": "ok"}


def cmd_ynq(args) -> dict:
    """Chains -> yes/no chains: one question per caption with the fixed response "no", ranked
    most wrong first (the more errors the caption has, the surer the "no"). --backend rules:
    --question around each caption; http: an LLM writes the questions (chain_statements)."""
    records, failed = _read_chains(args.inp, ordered=args.backend == "http")
    if args.backend == "http":
        return run_command("ynq", args, records, llm=partial(ynq_by_llm, args.step_tries), left_out=failed)
    if "{caption}" not in args.question:
        raise SystemExit("ynq: --question must contain {caption}")
    return run_command("ynq", args, records, offline=partial(ynq_record, args.question), left_out=failed)


def ynq_record(question: str, rec: dict) -> dict:
    return _ynq_chain_record(rec, [question.format(caption=c) for c in rec["chain"]])


def _ynq_chain_record(rec: dict, best_first: list[str], **extra) -> dict:
    errors = rec.get("errors")
    return {**_base_record(rec), "prompts": list(reversed(best_first)), "response": "no",
            "errors": list(reversed(errors)) if isinstance(errors, list) else None, **extra, "status": "ok"}


# -- MCQ and yes/no chains written by an LLM ------------------------------------------------------
# The LLM states, once per caption and in the chain's order, what that caption says about the
# facts the captions differ in: as the options of one question (mcq) or as yes/no questions
# (ynq). The reply is checked like a degradation step and asked again with the problem:
# the right count, every statement distinct, and the order kept: the words each step's error
# brought in (error_markers) must be in the statements of that caption and every later one, and
# in no earlier one. yes/no questions must also be plain questions whose wrong ones are
# answered "no" (the fixed response): no negation, which would flip the answer.

YES_NO_START = re.compile(r"^(?:is|are|was|were|does|do|did|has|have|had|can|could|will|would)(?:n't)?\b", re.I)
NEGATION = re.compile(r"\b(?:not|no longer|never)\b|n't\b", re.I)


def error_markers(chain: list[str]) -> list[set[str]]:
    """For each step k >= 1, the words caption k brought in that no earlier caption has and every
    later one keeps: what says that its error is there. Empty when the step only moved or reused
    words (an order swap, left -> right where 'right' was already said): then only distinctness
    checks that step."""
    tokens = [set(_tokens(c)) for c in chain]
    markers = []
    for k in range(1, len(chain)):
        _, added = word_diff(chain[k - 1], chain[k])
        markers.append({w for w in added if all(w not in tokens[j] for j in range(k))
                        and all(w in tokens[j] for j in range(k, len(chain)))})
    return markers


def check_chain_statements(chain: list[str], statements: list, what: str) -> list[str]:
    """Problems with one statement per caption (options or questions, best first); [] if none."""
    n = len(chain)
    if len(statements) != n:
        return [f"{len(statements)} {what}s for {n} captions (one per caption, in order)"]
    if not all(isinstance(x, str) and x.strip() for x in statements):
        return [f"every {what} must be a non-empty string"]
    problems = []
    keys = [tuple(_tokens(x)) for x in statements]
    # A step that only moved words (an order swap) has no error marker, so the markers alone let
    # options such as "*", "yes", "no" through: each statement must say something the captions say.
    said = {w for c in chain for w in _tokens(c)} - GLUE_WORDS
    for i, key in enumerate(keys):
        if not said & set(key):
            problems.append(f"{what} {i} says nothing the captions say (none of their words)")
    for i in range(1, n):
        if keys[i] in keys[:i]:
            problems.append(f"{what} {i} repeats {what} {keys.index(keys[i])}")
    for k, marker in enumerate(error_markers(chain), 1):
        if not marker:
            continue
        said = ", ".join(f"'{w}'" for w in sorted(marker))
        for i, key in enumerate(keys):
            has = bool(marker & set(key))
            if i >= k and not has:
                problems.append(f"{what} {i} lacks the error of caption {k} ({said})")
            elif i < k and has:
                problems.append(f"{what} {i} already has the error of caption {k} ({said})")
    return problems


def _strip_enumeration(text: str) -> str:
    """"A. text", "1) text", "Option 2: text" -> "text"."""
    return re.sub(r"^\s*(?:(?:option|question|caption)\s*\w{1,2}\s*[:.)-]|[A-Za-z0-9]{1,2}[.)])\s+", "",
                  " ".join(str(text).split()), flags=re.I)


def parse_chain_mcq(chain: list[str], text: str) -> tuple[tuple[str, list[str]] | None, list[str]]:
    """(question, options best first) from an LLM reply, or the problems with it."""
    obj = parse_json_object(text)
    if obj is None:
        return None, ["unreadable"]
    question, options = obj.get("question"), obj.get("options")
    if not isinstance(question, str) or not question.strip():
        return None, ['no "question" string']
    if not isinstance(options, list):
        return None, ['no "options" list']
    options = [_strip_enumeration(o) if isinstance(o, str) else o for o in options]
    problems = check_chain_statements(chain, options, "option")
    return ((" ".join(question.split()), options), []) if not problems else (None, problems)


def parse_chain_ynq(chain: list[str], text: str) -> tuple[list[str] | None, list[str]]:
    """Yes/no questions best first from an LLM reply, or the problems with them."""
    obj = parse_json_object(text)
    if obj is None:
        return None, ["unreadable"]
    questions = obj.get("questions")
    if not isinstance(questions, list):
        return None, ['no "questions" list']
    questions = [_strip_enumeration(q) if isinstance(q, str) else q for q in questions]
    problems = check_chain_statements(chain, questions, "question")
    for i, q in enumerate(questions):
        if isinstance(q, str) and not (YES_NO_START.match(q) and q.rstrip().endswith("?")):
            problems.append(f"question {i} is not a yes/no question (it must start like 'Is'/'Does' "
                            "and end with '?')")
        elif isinstance(q, str) and NEGATION.search(q):
            problems.append(f"question {i} is negated, which flips its answer")
    return (questions, []) if not problems else (None, problems)


def chain_statements_messages(rec: dict, kind: str) -> list[dict]:
    """The request for one statement per caption: kind "mcq" (options of one question) or "ynq"."""
    chain, errors = rec["chain"], rec.get("errors") or []
    listed = []
    for k, caption in enumerate(chain):
        err = errors[k] if k < len(errors) and isinstance(errors[k], dict) else None
        change = err.get("detail") if err and err.get("detail") else word_diff(chain[k - 1], caption)[0] if k else ""
        listed.append(f"Caption {k}{f' (its new error: {change})' if change else ' (correct)'}: {caption}")
    n = len(chain)
    head = ("These captions describe the same video. Caption 0 is correct; each later caption repeats "
            "the one before it with one more error.\n" + "\n".join(listed) + "\n\n")
    if kind == "mcq":
        task = (f"Write one multiple-choice question about the video and {n} answer options, one per "
                "caption and in the same order: option i states what caption i says about the facts the "
                "captions differ in, so option 0 is the right answer and option i holds exactly the errors "
                "of caption i. Use the captions' own words for those facts; keep the options short, alike "
                "in form and all different.\nReply with JSON only: "
                '{"question": "...", "options": ["<option for caption 0>", ...]}')
    else:
        task = (f"Write {n} yes/no questions about the video, one per caption and in the same order: "
                "question i asks whether the video shows what caption i says about the facts the captions "
                "differ in, so question 0 is answered yes and every later one no. Use the captions' own "
                "words for those facts, start each with Is/Are/Does/Do, end it with '?', and use no "
                "negation.\nReply with JSON only: "
                '{"questions": ["<question for caption 0>", ...]}')
    return chat_messages("You turn caption chains into questions for training video-language models.",
                         head + task)


def chain_statements_schema(rec: dict, kind: str) -> dict:
    """What parse_chain_mcq / parse_chain_ynq read: one statement per caption of the chain."""
    n = len(rec["chain"])
    if kind == "mcq":
        return json_schema("chain_mcq", {"question": {"type": "string"}, "options": string_list(n, n)})
    return json_schema("chain_ynq", {"questions": string_list(n, n)})


def _statements_max_tokens(rec: dict) -> int:
    return 40 * len(rec["chain"]) + 2 * max(len(c.split()) for c in rec["chain"]) + 60


def mcq_by_llm(seed: int, tries: int, rec: dict, client: ChatClient, stats: RunStats) -> dict:
    asked = ask_or_fail(client, chain_statements_messages(rec, "mcq"), partial(parse_chain_mcq, rec["chain"]),
                        JSON_REASK, tries, stats, schema=chain_statements_schema(rec, "mcq"),
                        max_tokens=_statements_max_tokens(rec))
    question, options = asked.value
    return _mcq_chain_record(rec, question, options, seed, question=question, source="llm",
                             llm_calls=asked.tries)


def ynq_by_llm(tries: int, rec: dict, client: ChatClient, stats: RunStats) -> dict:
    asked = ask_or_fail(client, chain_statements_messages(rec, "ynq"), partial(parse_chain_ynq, rec["chain"]),
                        JSON_REASK, tries, stats, schema=chain_statements_schema(rec, "ynq"),
                        max_tokens=_statements_max_tokens(rec))
    return _ynq_chain_record(rec, asked.value, source="llm", llm_calls=asked.tries)


def lfmcqa_messages(caption: str) -> list[dict]:
    user = (f"Video description:\n{caption}\n\nWrite one multiple-choice question about this video that "
            "needs its details or the order of its events to answer. Give five answer choices, each a "
            "full sentence of similar length and style; exactly one is correct according to the "
            "description, each other one is wrong in a specific detail. Reply with JSON only: "
            '{"question": "...", "options": ["...", "...", "...", "...", "..."], "answer": <index 0-4 of the '
            "correct option>}")
    return chat_messages("You write exam questions about videos from their descriptions.", user)


LFMCQA_SCHEMA = json_schema("long_form_mcq", {"question": {"type": "string"}, "options": string_list(5, 5),
                                              "answer": {"type": "integer", "minimum": 0, "maximum": 4}})


def parse_lfmcqa(text: str) -> tuple[str, list[str], int] | None:
    obj = parse_json_object(text) or {}
    q, opts, ans = obj.get("question"), obj.get("options"), obj.get("answer")
    if isinstance(ans, str) and len(ans.strip()) == 1 and ans.strip().upper() in LETTERS[:5]:
        ans = LETTERS.index(ans.strip().upper())
    if not (isinstance(q, str) and q.strip() and isinstance(opts, list) and len(opts) == 5):
        return None
    opts = [re.sub(r"^\s*[A-Ea-e][.)]\s+", "", str(o)).strip() for o in opts]   # "A. ..." -> "..."
    if not all(opts) or len(set(opts)) != 5 or not isinstance(ans, int) or not 0 <= ans < 5:
        return None
    return q.strip(), opts, ans


def cmd_lfmcqa(args) -> dict:
    """A description -> a question with five long answer choices, one correct:
    {"id", "video"?, "question", "options": [5], "answer": index}."""
    require = {"caption": str, **({"facts": dict} if args.backend == "rules" else {})}
    found, left_out = read_records(args.inp, require)
    return run_command("lfmcqa", args, [rec for _, rec in found], rules=partial(lfmcqa_by_rules, args.seed),
                       llm=partial(lfmcqa_by_llm, args.seed, args.step_tries), left_out=left_out)


def lfmcqa_by_rules(seed: int, rec: dict, world, stats: RunStats) -> dict:
    return _lfmcqa_record(rec, *world.lfmcqa_from_facts(rec["facts"], _record_rng(seed, rec)))


def lfmcqa_by_llm(seed: int, tries: int, rec: dict, client: ChatClient, stats: RunStats) -> dict:
    asked = ask_until_parsed(client, lfmcqa_messages(rec["caption"]), partial(read_reply, parse_lfmcqa),
                             JSON_REASK, tries, stats, schema=LFMCQA_SCHEMA)
    if not asked.ok:
        raise StepFailed(f"no readable question after {tries} tries")
    question, options, answer = asked.value
    order = list(range(5))
    _record_rng(seed, rec).shuffle(order)         # LLMs favour putting the answer first: reshuffle
    return _lfmcqa_record(rec, question, [options[i] for i in order], order.index(answer))


def _lfmcqa_record(rec: dict, question: str, options: list[str], answer: int) -> dict:
    return {**_base_record(rec), "question": question, "options": options, "answer": answer, "status": "ok"}


def cmd_reward(args) -> dict:
    """LLaVA-Hound-DPO: score each sampled answer with the caption as evidence, then write the
    answers ranked by score as a chain record for rank_dpo.py (prompt = the question)."""
    records = []
    found, left_out = read_records(args.inp, {"caption": str, "question": str, "answers": list})
    for line, rec in found:
        if len(rec["answers"]) < 2 or not all(isinstance(a, str) and a.strip() for a in rec["answers"]):
            raise DataError(args.inp, line, "expected at least two non-empty answer strings", "answers")
        records.append(rec)
    return run_command("reward", args, records, llm=partial(reward_by_llm, args.pairs, args.step_tries),
                       left_out=left_out)


def reward_by_llm(pairs: bool, tries: int, rec: dict, client: ChatClient, stats: RunStats) -> dict:
    scored = [score_answer(client, rec["caption"], rec["question"], a, tries, stats) for a in rec["answers"]]
    ranked = rank_answers(rec["answers"], scored, pairs)
    base = {**_base_record(rec), "scored": [{"answer": a, **s} for a, s in zip(rec["answers"], scored)]}
    if len(ranked) < 2:
        stats.add("no_preference", "all answers scored alike")
        return {**base, "status": "no_preference"}
    stats.add("chain_length", str(len(ranked)))
    return {**base, "prompt": rec["question"], "chain": [rec["answers"][i] for i in ranked],
            "scores": [scored[i]["score"] for i in ranked], "status": "ok"}


# =============================================================================================
# On-policy data: QA from captions (LLaVA-Hound), and the paper's on-policy baselines
# (Response Improvement, Response Comparison, RLAIF-V) over the model's own samples
# =============================================================================================
# Each is written once against a teacher, whose every answer is an Asked (the value and the
# requests it took): the LLM (LLMTeacher), or with --backend rules the scene's facts
# (RulesTeacher, synthetic.py; each answer counts as one call).

def qa_messages(caption: str, n: int) -> list[dict]:
    user = (f"Video description:\n{caption}\n\nWrite {n} questions about this video that the "
            "description answers (objects, colours, counts, actions, positions, directions, the order "
            "of events, the scene), each with its correct answer in one or two full sentences taken "
            "only from the description. Reply with JSON only: "
            '{"qa": [{"question": "...", "answer": "..."}, ...]}')
    return chat_messages("You write video question-answer pairs from detailed video "
                         "descriptions, for instruction tuning.", user)


def qa_schema(n: int) -> dict:
    """What parse_qa reads: up to n question-answer pairs."""
    pair = json_schema("qa_pair", {"question": {"type": "string"}, "answer": {"type": "string"}})["schema"]
    return json_schema("qa_pairs", {"qa": {"type": "array", "items": pair, "minItems": 1, "maxItems": n}})


def parse_qa(text: str) -> list[dict] | None:
    obj = parse_json_object(text) or {}
    items = obj.get("qa", obj.get("questions"))
    if not isinstance(items, list):
        return None
    out, seen = [], set()
    for it in items:
        if not isinstance(it, dict):
            continue
        q, a = it.get("question"), it.get("answer")
        if isinstance(q, str) and q.strip() and isinstance(a, str) and a.strip() and q.strip() not in seen:
            seen.add(q.strip())
            out.append({"question": q.strip(), "answer": " ".join(a.split())})
    return out or None


def improve_messages(reference: str, caption: str) -> list[dict]:
    user = (f"Reference description of a video (correct):\n{reference}\n\nA model's caption of the "
            f"same video:\n{caption}\n\nRewrite the model's caption so that it is correct: fix every "
            "statement the reference contradicts, drop what it does not support, add what the caption "
            "misses; keep the caption's style. Reply with JSON only: {\"caption\": \"<the corrected caption>\", "
            "\"already_correct\": false}, or {\"caption\": \"\", \"already_correct\": true} when there is "
            "nothing to fix.")
    return chat_messages("You are a teacher who corrects video captions against a "
                         "reference description.", user)


def parse_caption_reply(text: str) -> str | None:
    caption, obj = clean_reply(text)
    if not caption or (not obj and REFUSAL.search(caption) and len(caption.split()) < 25):
        return None
    return caption


ALREADY_CORRECT = object()                 # improve's teacher found nothing to fix


# Structured, both keys come back (a strict schema requires every property): already_correct
# true means nothing to fix, whatever the caption says.
IMPROVE_SCHEMA = json_schema("corrected_caption", {"caption": {"type": "string"},
                                                   "already_correct": {"type": "boolean"}})


def parse_correction(text: str):
    """improve's reply: the corrected caption, ALREADY_CORRECT, or None when unreadable."""
    obj = parse_json_object(text) or {}
    if obj.get("already_correct") is True:
        return ALREADY_CORRECT
    return parse_caption_reply(text)


def pick_messages(reference: str, first: str, second: str) -> list[dict]:
    user = (f"Reference description of a video (correct):\n{reference}\n\nCaption 1:\n{first}\n\n"
            f"Caption 2:\n{second}\n\nWhich caption describes the video better: more correct facts, "
            "fewer wrong ones? Reply with JSON only: {\"better\": 1 or 2}")
    return chat_messages("You are a teacher who compares video captions against a "
                         "reference description.", user)


PICK_SCHEMA = json_schema("better_caption", {"better": {"type": "integer", "enum": [1, 2]}})


def parse_pick(text: str) -> str | None:
    obj = parse_json_object(text) or {}
    value = obj.get("better", obj.get("choice"))
    if value is None:
        m = re.search(r"\b(?:caption|better)\W{0,4}([12])\b", text or "", re.I)
        value = m.group(1) if m else None
    value = str(value).strip() if value is not None else ""
    return value if value in ("1", "2") else None


def claims_messages(caption: str) -> list[dict]:
    user = (f"Caption of a video:\n{caption}\n\nSplit the caption into atomic claims: short, "
            "self-contained statements, each stating one fact about the video. Reply with JSON only: "
            '{"claims": ["...", "..."]}')
    return chat_messages("You split text into atomic factual claims.", user)


def verify_messages(reference: str, claim: str) -> list[dict]:
    user = (f"Reference description of a video (correct):\n{reference}\n\nClaim: {claim}\n\n"
            'Does the reference support the claim? Reply with JSON only: {"verdict": "yes" or "no"}')
    return chat_messages("You check claims about a video against its reference "
                         "description.", user)


CLAIMS_SCHEMA = json_schema("claims", {"claims": string_list(1)})
CLAIM_VERDICT_SCHEMA = json_schema("claim_verdict", {"verdict": {"type": "string", "enum": ["yes", "no"]}})


def parse_claims(text: str) -> list[str] | None:
    obj = parse_json_object(text) or {}
    claims = obj.get("claims")
    if not isinstance(claims, list):
        return None
    claims = [" ".join(c.split()) for c in claims if isinstance(c, str) and c.strip()]
    return claims or None


def parse_claim_verdict(text: str) -> bool | None:
    obj = parse_json_object(text) or {}
    v = obj.get("verdict", obj.get("supported"))
    if isinstance(v, bool):
        return v
    v = str(v or "").strip().lower()
    if v not in ("yes", "no"):
        m = re.search(r"\bverdict\W{0,6}(yes|no)\b", text or "", re.I)
        v = m.group(1).lower() if m else ""
    return {"yes": True, "no": False}.get(v)


def no_problems(value) -> list[str]:
    return []


class LLMTeacher:
    """The teacher over HTTP: each answer is asked until it parses and passes its check (a
    refusal, an unreadable reply or one a check rejects is counted under "rejected" and asked
    again with the problem); a record whose `tries` replies to one question were all unusable
    fails (StepFailed) with the reasons. With --frames the questions about a record carry its
    reference video's frames (Frames); splitting a caption into claims is about text only."""

    def __init__(self, client: ChatClient, tries: int, stats: RunStats, frames: Frames | None = None):
        self.client, self.tries, self.stats = client, tries, stats
        self.frames = frames if frames is not None else Frames()

    def _ask(self, rid: str | None, messages: list[dict], parse: Callable[[str], object],
             check: Callable[[object], list[str]], schema: dict, max_tokens: int) -> Asked:
        return ask_or_fail(self.client, self.frames.attach(messages, rid),
                           partial(checked_reply, parse, check), JSON_REASK, self.tries, self.stats,
                           schema=schema, max_tokens=max_tokens)

    def qa(self, rec: dict, n: int, rng: random.Random) -> Asked:
        messages = qa_messages(rec["caption"], n)
        check = lambda items: check_qa(rec["caption"], instruction_words(messages, rec["caption"]), items[:n])
        asked = self._ask(rec["id"], messages, parse_qa, check, qa_schema(n), 120 * n)
        return replace(asked, value=asked.value[:n])

    def improve(self, ref: dict, sample: str) -> Asked:
        """The corrected caption: plain text, not the sample unchanged, 0.5x the shorter to 2x the
        longer of reference and sample (+10 words); "already correct" gives the sample back."""
        messages = improve_messages(ref["caption"], sample)
        check = partial(check_correction, ref["caption"], sample, instruction_words(messages, ref["caption"], sample),
                        length_bounds(ref["caption"], sample))
        asked = self._ask(ref.get("id"), messages, parse_correction, check, IMPROVE_SCHEMA,
                          max(128, 3 * len(ref["caption"].split())))
        return replace(asked, value=sample) if asked.value is ALREADY_CORRECT else asked

    def pick(self, ref: dict, first: str, second: str) -> Asked:
        return self._ask(ref.get("id"), pick_messages(ref["caption"], first, second), parse_pick,
                         no_problems, PICK_SCHEMA, 64)

    def claims(self, answer: str) -> Asked:
        return self._ask(None, claims_messages(answer), parse_claims, partial(check_claims, answer),
                         CLAIMS_SCHEMA, max(128, 3 * len(answer.split())))

    def verify(self, ref: dict, claim: str) -> Asked:
        return self._ask(ref.get("id"), verify_messages(ref["caption"], claim), parse_claim_verdict,
                         no_problems, CLAIM_VERDICT_SCHEMA, 32)


class RulesTeacher:
    """The scene's facts as the teacher (--backend rules; synthetic.py): `improve` writes the
    gold caption, `pick` goes by the rules judge's score, `claims` are sentences and `verify`
    is match_facts. Each answer counts as one call."""

    def __init__(self, world):
        self.world = world

    def qa(self, rec: dict, n: int, rng: random.Random) -> Asked:
        return Asked(self.world.qa_from_facts(rec["facts"], rng, n))

    def improve(self, ref: dict, sample: str) -> Asked:
        return Asked(self.world.rules_improve(sample, ref["facts"]))

    def pick(self, ref: dict, first: str, second: str) -> Asked:
        q1, q2 = (self.world.caption_quality(x, ref["facts"]) for x in (first, second))
        return Asked("1" if q1 > q2 else "2" if q2 > q1 else "tie")

    def claims(self, answer: str) -> Asked:
        return Asked(self.world.rules_claims(answer))

    def verify(self, ref: dict, claim: str) -> Asked:
        return Asked(self.world.rules_supported(claim, ref["facts"]))


def qa_items_path(out: str) -> str:
    return re.sub(r"\.jsonl$", "", out) + ".items.jsonl"


def write_qa_items(out: str) -> dict:
    """Flatten qa's per-video records into one record per question (what SFT, `sample` and
    `eval_judge.py reward` read): {"id": VIDEO-qK, "video"?, "caption", "question", "answer",
    "prompt", "chain": [answer]}. Rewritten atomically from the whole output on every run.
    Returns {"items": its path, "questions": how many} for the summary."""
    rows = [{"id": f"{rec['id']}-q{k}", **{x: rec[x] for x in ("video",) if x in rec},
             "caption": rec["caption"], "question": item["question"], "answer": item["answer"],
             "prompt": item["question"], "chain": [item["answer"]], "source": "qa"}
            for _, rec in read_jsonl(out) if is_ok(rec) for k, item in enumerate(rec["qa"])]
    path = qa_items_path(out)
    write_jsonl(path, rows)
    return {"items": path, "questions": len(rows)}


def cmd_qa(args) -> dict:
    """LLaVA-Hound's instruction data: an LLM writes question-answer pairs from each detailed
    caption -> OUT (one record per video, resumable) and OUT.items.jsonl (one per question)."""
    require = {"caption": str, **({"facts": dict} if args.backend == "rules" else {})}
    found, left_out = read_records(args.inp, require)
    return run_command("qa", args, [r for _, r in found], taught=partial(qa_record, args.n, args.seed),
                       left_out=left_out, then=partial(write_qa_items, args.out),
                       frames=run_frames(args, args.inp, found))


def qa_record(n: int, seed: int, rec: dict, teacher, stats: RunStats) -> dict:
    asked = teacher.qa(rec, n, _record_rng(seed, rec))
    stats.add("questions", "written", len(asked.value))
    return {**_base_record(rec), "caption": rec["caption"], "qa": asked.value, "source": "qa",
            "llm_calls": asked.tries, "status": "ok"}


def read_samples(path: str, min_answers: int = 1) -> tuple[list[tuple[int, dict]], int]:
    """`eval_judge.py sample` output as (line, record): every record needs `answers`, a list of at
    least min_answers non-empty strings."""
    found, left_out = read_records(path, {"answers": list})
    for line, rec in found:
        if len(rec["answers"]) < min_answers or not all(isinstance(a, str) for a in rec["answers"]):
            raise DataError(path, line, f"expected at least {min_answers} answer strings "
                            "(the output of `eval_judge.py sample`)", "answers")
    return found, left_out


def read_refs(path: str, rules: bool) -> dict[str, tuple[int, dict]]:
    """The reference captions by id, with their lines ({"id", "caption"}; the rules backend also
    needs `facts`)."""
    found, _ = read_records(path, {"caption": str, **({"facts": dict} if rules else {})})
    return {rec["id"]: (line, rec) for line, rec in found}


def run_on_samples(name: str, args, need: int, judge: Callable) -> dict:
    """The on-policy baselines: the model's samples (--in) and their reference captions (--ref),
    matched by id and checked up front; per record, judge(rec, ref, answers, teacher, stats)
    on its non-empty samples (run_command's `taught`)."""
    found, left_out = read_samples(args.inp, need)
    refs = read_refs(args.ref, args.backend == "rules")
    for line, rec in found:
        if rec["id"] not in refs:
            raise DataError(args.inp, line, f"no reference caption with id {rec['id']!r} in {args.ref}", "id")
    frames = run_frames(args, args.ref, [refs[rec["id"]] for _, rec in found])   # the reference's video
    ref_records = {rid: ref for rid, (_, ref) in refs.items()}
    return run_command(name, args, [rec for _, rec in found], left_out=left_out, frames=frames,
                       taught=partial(_on_usable_samples, name, need, ref_records, judge))


def _on_usable_samples(source: str, need: int, refs: dict[str, dict], judge: Callable, rec: dict, teacher,
                       stats: RunStats) -> dict:
    """judge() on the record's non-empty samples (a model may stop at once: an empty sample is
    real output, not bad input), or a no_preference record when fewer than `need` are left."""
    answers = [a for a in rec["answers"] if a.strip()]
    if len(answers) < need:
        stats.add("no_preference", "empty samples")
        return _no_preference(rec, source, 0, f"{len(answers)} non-empty sample(s), {need} needed")
    return judge(rec, refs[rec["id"]], answers, teacher, stats)


def _no_preference(rec: dict, source: str, calls: int, reason: str, **extra) -> dict:
    return {**_base_record(rec), "source": source, "llm_calls": calls, **extra, "status": "no_preference",
            "reason": reason}


def _pair_record(rec: dict, better: str, worse: str, source: str, calls: int, **extra) -> dict:
    return {**_base_record(rec), "prompt": rec.get("prompt", rec.get("question", DEFAULT_PROMPT)),
            "chain": [better, worse], "source": source, "llm_calls": calls, **extra, "status": "ok"}


def cmd_improve(args) -> dict:
    """Response Improvement: the teacher corrects the model's caption against the reference;
    pair: corrected > sampled (the first sample of each record)."""
    return run_on_samples("improve", args, 1, improve_record)


def improve_record(rec: dict, ref: dict, answers: list[str], teacher, stats: RunStats) -> dict:
    sample = answers[0]
    improved = teacher.improve(ref, sample)
    if _tokens(improved.value) == _tokens(sample):
        stats.add("no_preference", "already correct")
        return _no_preference(rec, "improve", improved.tries, "the teacher left the sample unchanged")
    return _pair_record(rec, improved.value, sample, "improve", improved.tries)


def cmd_response_comparison(args) -> dict:
    """Response Comparison (`compare`): the teacher picks the better of two samples, asked in
    both orders (ask_both_orders); a pair only when both orders agree (disagreements are written
    as no_preference and counted: that is the position bias cancelled)."""
    return run_on_samples("compare", args, 2, comparison_record)


def comparison_record(rec: dict, ref: dict, answers: list[str], teacher, stats: RunStats) -> dict:
    a, b = next(((x, y) for i, x in enumerate(answers) for y in answers[i + 1:]
                 if _tokens(x) != _tokens(y)), (answers[0], answers[1]))
    if _tokens(a) == _tokens(b):
        stats.add("no_preference", "identical samples")
        return _no_preference(rec, "compare", 0, "all samples are the same text")
    both = ask_both_orders(partial(teacher.pick, ref), a, b)
    if both.result in ("win", "loss"):
        better, worse = (a, b) if both.result == "win" else (b, a)
        stats.add("decided", "both orders agree")
        return _pair_record(rec, better, worse, "compare", both.tries, picks=both.verdicts)
    stats.add("no_preference", "orders disagree")
    return _no_preference(rec, "compare", both.tries, "the two orders disagree (position bias or a tie)",
                          picks=both.verdicts)


def rank_by_support(answers: list[str], supported: list[int], claims: list[int], pairs: bool) -> list[int]:
    """RLAIF-V's order: share of supported claims, ties broken by the count of supported claims;
    one sample per distinct (share, count), so the list is strictly ordered."""
    key = lambda i: (supported[i] / claims[i] if claims[i] else 0.0, supported[i])
    order = sorted(range(len(answers)), key=lambda i: (-key(i)[0], -key(i)[1], i))
    kept, seen = [], set()
    for i in order:
        if key(i) not in seen and _tokens(answers[i]) not in [_tokens(answers[j]) for j in kept]:
            seen.add(key(i))
            kept.append(i)
    return [kept[0], kept[-1]] if pairs and len(kept) >= 2 else kept


def cmd_rlaifv(args) -> dict:
    """RLAIF-V: claims extracted from each sample, each claim checked against the reference,
    samples ranked by the share of supported claims (ties: by count) -> a ranked chain."""
    return run_on_samples("rlaifv", args, 2, partial(rlaifv_record, args.pairs))


def rlaifv_record(pairs: bool, rec: dict, ref: dict, answers: list[str], teacher, stats: RunStats) -> dict:
    calls, supported, n_claims = 0, [], []
    for answer in answers:
        claims = teacher.claims(answer)
        verdicts = [teacher.verify(ref, c) for c in claims.value]
        calls += claims.tries + sum(v.tries for v in verdicts)
        n_claims.append(len(claims.value))
        supported.append(sum(v.value for v in verdicts))
    ranked = rank_by_support(answers, supported, n_claims, pairs)
    support = [{"answer": a, "claims": c, "supported": s} for a, c, s in zip(answers, n_claims, supported)]
    if len(ranked) < 2:
        stats.add("no_preference", "all samples equally supported")
        return _no_preference(rec, "rlaifv", calls, "every sample has the same support", support=support)
    stats.add("chain_length", str(len(ranked)))
    return {**_base_record(rec), "source": "rlaifv", "llm_calls": calls, "support": support,
            "prompt": rec.get("prompt", rec.get("question", DEFAULT_PROMPT)),
            "chain": [answers[i] for i in ranked], "status": "ok"}


# =============================================================================================
# Command line
# =============================================================================================

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gen_chains.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-v", "--verbose", action="store_true", help="log every retry")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("synth", help="synthetic videos, gold captions and facts")
    s.add_argument("--out", required=True, help="output directory")
    s.add_argument("--n", type=int, default=1000, help="number of videos")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--test_frac", type=float, default=0.1, help="share of videos in test.jsonl")
    s.add_argument("--frames", type=int, default=16)
    s.add_argument("--size", type=int, default=64, help="frame height and width in pixels")
    s.set_defaults(fn=cmd_synth)

    b = sub.add_parser("benchmarks", help="synthetic TempCompass, VidHal, VDC and ARGUS sets (offline)")
    b.add_argument("--out", required=True, help="output directory (tempcompass/, vidhal/, vdc/, argus/)")
    b.add_argument("--n", type=int, default=20, help="number of scenes (videos) in each set")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--frames", type=int, default=16)
    b.add_argument("--size", type=int, default=64, help="frame height and width in pixels (even)")
    b.set_defaults(fn=cmd_benchmarks)

    def io(sp, backend: bool | str = False, client: bool = True):
        sp.add_argument("--in", dest="inp", required=True, help="input JSONL")
        sp.add_argument("--out", required=True, help="output JSONL (appended to; re-run to resume)")
        sp.add_argument("--seed", type=int, default=0)
        sp.add_argument("--retry_failed", action="store_true",
                        help="drop records written as failed by an earlier run and redo them")
        if backend:
            sp.add_argument("--backend", choices=("http", "rules"), default=backend if isinstance(backend, str) else "http",
                            help="http: an OpenAI-compatible LLM; rules: offline (from synth's facts, or "
                                 "for mcq/ynq a template over the captions)")
        if client:
            sp.add_argument("--step_tries", type=int, default=4, help="LLM replies tried per step")
            add_client_args(sp)

    for name, fn, text in (("chains", cmd_chains, "repeated degradation into caption chains"),
                           ("inject", cmd_inject, "error-injection baseline: K one-error negatives")):
        c = sub.add_parser(name, help=text)
        io(c, backend=True)
        c.add_argument("--length", type=int, default=4, help="K: degradation steps (K+1 captions)")
        c.add_argument("--prompt", default=DEFAULT_PROMPT, help="prompt stored with records that have none")
        c.add_argument("--unconditioned", action="store_true",
                       help="let the LLM choose each error (rules: sample a fact, not a type)")
        c.add_argument("--max_edit_frac", type=float, default=0.25,
                       help="reject a step that edits more than this fraction of the words")
        c.add_argument("--max_length_change", type=float, default=0.2,
                       help="reject a step whose length changes by more than this fraction")
        c.add_argument("--error_types", type=parse_error_types, default=None,
                       help="comma list: the only error types a step may use, e.g. object,action for "
                            f"SSv2-style data (known: {', '.join(ERROR_TYPES)}; rules: the synthetic "
                            "world's fact types among them)")
        add_frame_args(c, "each degradation request (the LLM may then pick errors the video shows)")
        c.set_defaults(fn=fn)

    r = sub.add_parser("recaption", help="short human captions -> one detailed caption (LLM)")
    io(r)
    add_frame_args(r, "the short captions")
    r.set_defaults(fn=cmd_recaption)

    m = sub.add_parser("mcq", help="chains -> multiple-choice chains (letters ranked)")
    io(m, backend="rules")
    m.add_argument("--question", default="Which caption describes the video best?",
                   help="rules: the question over the captions (http: the LLM writes it)")
    m.set_defaults(fn=cmd_mcq)

    y = sub.add_parser("ynq", help="chains -> yes/no chains (prompts ranked, response 'no')")
    io(y, backend="rules")
    y.add_argument("--question", default='Does this caption describe the video correctly? '
                   'Caption: "{caption}" Answer yes or no.',
                   help="rules: the question around each {caption} (http: the LLM writes them)")
    y.set_defaults(fn=cmd_ynq)

    q = sub.add_parser("lfmcqa", help="descriptions -> long-form five-choice questions")
    io(q, backend=True)
    q.set_defaults(fn=cmd_lfmcqa)

    w = sub.add_parser("reward", help="LM reward: rank sampled answers with the caption as evidence")
    io(w)
    w.add_argument("--pairs", action="store_true", help="keep only the best and the worst answer")
    w.set_defaults(fn=cmd_reward)

    a = sub.add_parser("qa", help="captions -> question-answer pairs (LLaVA-Hound's instruction data)")
    io(a, backend=True)
    a.add_argument("--n", type=int, default=3, help="questions per caption")
    add_frame_args(a, "the caption")
    a.set_defaults(fn=cmd_qa)

    for name, fn, text in (
            ("improve", cmd_improve, "Response Improvement: teacher-corrected caption > the sample"),
            ("compare", cmd_response_comparison, "Response Comparison: the teacher's pick of two samples, both orders"),
            ("rlaifv", cmd_rlaifv, "RLAIF-V: samples ranked by their share of supported claims")):
        c = sub.add_parser(name, help=text)
        io(c, backend=True)
        c.add_argument("--ref", required=True,
                       help="reference captions JSONL {id, caption} (rules: with facts, e.g. synth's)")
        if name == "rlaifv":
            c.add_argument("--pairs", action="store_true", help="keep only the best and the worst sample")
        add_frame_args(c, "the reference (the --ref record's video; claims are split from text alone)")
        c.set_defaults(fn=fn)
    return p


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if getattr(args, "length", 1) < 1:
        raise SystemExit(f"{args.command}: --length must be at least 1")
    try:
        return args.fn(args)
    except (DataError, ChatError, OutputLocked) as e:
        raise SystemExit(f"{args.command}: {e}") from None


if __name__ == "__main__":
    main()
