#!/usr/bin/env python3
"""gen_chains.py: the data half of learning to rank caption chains.

A caption chain is c0 > c1 > ... > cK: c0 is a correct, detailed caption of a video and each
later caption adds exactly one factual error to the one before, so ck holds k errors and the
chain is totally ordered by construction. The trainer (rank_dpo.py) ranks whole chains.

Subcommands (records are JSONL, see DESIGN.md):
  synth      the embedded dataset: synthetic videos of coloured shapes, gold captions and facts
  recaption  short human captions -> one detailed caption (LLM)
  chains     repeated degradation: c0 -> c1 -> ... -> cK (LLM over HTTP, or offline rules)
  inject     the error-injection baseline: K independent one-error negatives of c0
  mcq, ynq   chains -> multiple-choice chains / yes-no chains
  lfmcqa     a description -> a question with five long answer choices, one correct
  reward     LLaVA-Hound-DPO's LM reward: caption as evidence, score sampled answers, rank them

Read top to bottom: input/output that never loses or duplicates a record; the one HTTP client;
cleaning and checking what an LLM returns; the error types; the synthetic scenes, their
captions and the fact matcher; the rule backend; then one function per subcommand.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import difflib
import email.utils
import json
import logging
import os
import random
import re
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

log = logging.getLogger("gen_chains")

DEFAULT_PROMPT = "Describe this video in detail."


# =============================================================================================
# Input and output: bad input is named by file and line; output is append-only and resumable
# =============================================================================================

class DataError(ValueError):
    """Bad input, with where it is: `file:line: field 'x': problem`."""

    def __init__(self, path: str, line: int | None, message: str, field: str | None = None):
        where = f"{path}:{line}" if line is not None else str(path)
        what = f"field '{field}': {message}" if field else message
        super().__init__(f"{where}: {what}")
        self.path, self.line, self.field = str(path), line, field


def read_jsonl(path: str) -> Iterator[tuple[int, dict]]:
    """Yield (line_number, record) for each non-blank line; malformed lines raise DataError."""
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(path, line_no, f"malformed JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(record, dict):
                raise DataError(path, line_no, f"expected a JSON object, got {type(record).__name__}")
            yield line_no, record


def read_records(path: str, require: dict[str, type | tuple[type, ...]]) -> list[dict]:
    """All records of an input file, checked up front: every record has a unique string `id`
    and each required field with the right type. Errors name file, line and field."""
    if not os.path.exists(path):
        raise DataError(path, None, "input file not found")
    records, seen = [], {}
    for line_no, rec in read_jsonl(path):
        rid = rec.get("id")
        if not isinstance(rid, str) or not rid:
            raise DataError(path, line_no, "missing or not a non-empty string", "id")
        if rid in seen:
            raise DataError(path, line_no, f"duplicate id {rid!r} (first on line {seen[rid]})", "id")
        seen[rid] = line_no
        for name, kind in require.items():
            value = rec.get(name)
            if value is None:
                raise DataError(path, line_no, "missing", name)
            if not isinstance(value, kind) or (isinstance(value, (str, list)) and not value):
                raise DataError(path, line_no, f"expected a non-empty {_type_names(kind)}", name)
        records.append(rec)
    return records


def _type_names(kind) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join({"str": "string", "list": "list", "dict": "object"}.get(k.__name__, k.__name__)
                       for k in kinds)


class ResumableJsonl:
    """An append-only JSONL output that survives kill -9.

    Each finished record is one line written with a single write, then flushed and fsynced, so
    at any instant the file holds complete lines plus at most one torn last line. Opening the
    file repairs that torn line (a tail that is not a complete JSON object is cut off) and
    collects the ids already written; a run skips those, so re-running the same command
    finishes the job with every id exactly once.
    """

    def __init__(self, path: str, drop_failed: bool = False):
        self.path = path
        self.done_ids: set[str] = set()
        self.repaired = False
        self._lock = threading.Lock()
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self._repair_and_scan(drop_failed)
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def _repair_and_scan(self, drop_failed: bool) -> None:
        if not os.path.exists(self.path):
            return
        with open(self.path, "rb") as f:
            data = f.read()
        cut = data.rfind(b"\n") + 1            # end of the last complete line
        tail = data[cut:]
        if tail.strip():
            try:
                whole = json.loads(tail)
            except ValueError:
                whole = None
            if isinstance(whole, dict) and "id" in whole:
                data = data + b"\n"            # killed between the object and its newline: keep it
            else:
                log.warning("%s: repaired a torn last line (%d bytes from an interrupted write)",
                            self.path, len(tail))
                data = data[:cut]
            self.repaired = True
        kept, dropped = [], 0
        for line_no, raw in enumerate(data.split(b"\n")[:-1] if data else [], start=1):
            if not raw.strip():
                continue
            try:
                rec = json.loads(raw)
            except ValueError:
                raise DataError(self.path, line_no, "malformed line in the middle of an output file "
                                "(not an interrupted write; fix or remove the file)") from None
            rid = rec.get("id") if isinstance(rec, dict) else None
            if not isinstance(rid, str):
                raise DataError(self.path, line_no, "output record without a string id", "id")
            if rid in self.done_ids:
                raise DataError(self.path, line_no, f"duplicate id {rid!r} in the output file", "id")
            if drop_failed and rec.get("status") == "failed":
                dropped += 1
                continue
            self.done_ids.add(rid)
            kept.append(raw)
        if self.repaired or dropped:
            # Rewrite atomically: a kill during the rewrite leaves the old file in place.
            tmp = self.path + ".tmp"
            with open(tmp, "wb") as f:
                f.write(b"".join(line + b"\n" for line in kept))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
            if dropped:
                log.info("%s: dropped %d failed records to retry them", self.path, dropped)

    def append(self, record: dict) -> None:
        line = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
        with self._lock:
            view = memoryview(line)
            while view:                        # os.write may write less than asked
                view = view[os.write(self._fd, view):]
            os.fsync(self._fd)
            self.done_ids.add(record["id"])

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "ResumableJsonl":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def map_resumable(records: Iterable[dict], fn: Callable[[dict], dict], out_path: str,
                  concurrency: int = 1, desc: str = "records", drop_failed: bool = False) -> dict:
    """Run fn(record) -> output record over a thread pool, appending each result to out_path.

    Ids already in out_path are skipped (resume). A ChatError (a request that failed for good)
    becomes {"id", "status": "failed", "reason"}; a fatal ChatError (wrong URL, key or model)
    or any other exception stops the run, since every record would fail the same way.
    Returns a summary: total, skipped (already done), done, failed, seconds, rate.
    """
    from tqdm.auto import tqdm              # comes with transformers

    out = ResumableJsonl(out_path, drop_failed=drop_failed)
    records = list(records)
    todo = [r for r in records if r["id"] not in out.done_ids]
    summary = {"total": len(records), "skipped": len(records) - len(todo), "done": 0, "failed": 0}
    start = time.monotonic()
    bar = tqdm(total=len(todo), desc=desc, unit="rec", dynamic_ncols=True, file=sys.stderr,
               disable=None if todo else True)

    def run_one(rec: dict) -> dict:
        try:
            result = fn(rec)
        except ChatError as e:
            if e.fatal:
                raise
            result = {"id": rec["id"], "status": "failed", "reason": str(e)}
        if result.get("id") != rec["id"]:
            raise RuntimeError(f"output record for {rec['id']!r} has id {result.get('id')!r}")
        out.append(result)
        return result

    workers = max(1, int(concurrency))
    try:
        with cf.ThreadPoolExecutor(max_workers=workers) as pool:
            pending: set[cf.Future] = set()
            queue = iter(todo)
            while True:
                # Keep a bounded number of records in flight so huge inputs stay cheap.
                while len(pending) < 2 * workers:
                    rec = next(queue, None)
                    if rec is None:
                        break
                    pending.add(pool.submit(run_one, rec))
                if not pending:
                    break
                finished, pending = cf.wait(pending, return_when=cf.FIRST_COMPLETED)
                for fut in finished:
                    try:
                        result = fut.result()
                    except BaseException:
                        for p in pending:
                            p.cancel()
                        raise
                    if result.get("status") == "failed":
                        summary["failed"] += 1
                    else:
                        summary["done"] += 1
                    bar.update(1)
                    bar.set_postfix(failed=summary["failed"], refresh=False)
    finally:
        bar.close()
        out.close()
    summary["seconds"] = round(time.monotonic() - start, 3)
    summary["rate"] = round((summary["done"] + summary["failed"]) / max(summary["seconds"], 1e-9), 2)
    return summary


# =============================================================================================
# The HTTP client: one, OpenAI-compatible (vLLM, llama.cpp server, Ollama, OpenAI)
# =============================================================================================

class ChatError(RuntimeError):
    """A chat request that failed for good. str() is the reason; it never contains the key.
    fatal=True means retrying other records cannot help (bad URL, key or model name)."""

    def __init__(self, reason: str, fatal: bool = False):
        super().__init__(reason)
        self.fatal = fatal


@dataclass
class ChatReply:
    text: str
    prompt_tokens: int = 0
    completion_tokens: int = 0


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


class ChatClient:
    """POST {base_url}/chat/completions with bounded retries.

    Retries connection errors, timeouts, 408/409/429/5xx, malformed bodies and empty content,
    waiting the server's Retry-After when it gives one, else exponential backoff with jitter.
    After max_tries the request fails with a ChatError naming the last reason. Thread-safe:
    each worker thread gets its own keep-alive session.
    """

    def __init__(self, base_url: str, model: str, api_key: str | None = None, timeout: float = 60.0,
                 max_tries: int = 5, backoff: float = 1.0, max_wait: float = 60.0,
                 default_params: dict | None = None):
        if not base_url:
            raise ValueError("no --base_url (or OPENAI_BASE_URL) given")
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model, self.timeout, self.max_tries = model, float(timeout), max(1, int(max_tries))
        self.backoff, self.max_wait = float(backoff), float(max_wait)
        self.default_params = dict(default_params or {})
        self._api_key = api_key or None
        self._local = threading.local()
        self._lock = threading.Lock()
        self.usage = Counter()             # requests, retries, prompt_tokens, completion_tokens

    def __repr__(self) -> str:             # never shows the key
        return f"ChatClient(url={self.url!r}, model={self.model!r}, timeout={self.timeout})"

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "ChatClient":
        params = {}
        if getattr(args, "temperature", None) is not None:
            params["temperature"] = args.temperature
        return cls(args.base_url, args.model, api_key=args.api_key, timeout=args.timeout,
                   max_tries=args.max_tries, backoff=getattr(args, "backoff", 1.0), default_params=params)

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

    def chat(self, messages: list[dict], **params) -> ChatReply:
        import requests
        payload = {"model": self.model, "messages": messages, **self.default_params, **params}
        headers = {"Content-Type": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        reason = "no attempt made"
        for attempt in range(1, self.max_tries + 1):
            self._count(requests=1, retries=int(attempt > 1))
            wait = None
            try:
                resp = self._session().post(self.url, json=payload, headers=headers, timeout=self.timeout)
            except requests.Timeout:
                reason = f"timed out after {self.timeout:g}s"
            except requests.RequestException as e:
                reason = f"connection error: {type(e).__name__}"
            else:
                if resp.status_code == 200:
                    reply, reason = self._parse(resp)
                    if reply is not None:
                        self._count(prompt_tokens=reply.prompt_tokens,
                                    completion_tokens=reply.completion_tokens)
                        return reply
                else:
                    reason = f"HTTP {resp.status_code}: {self._scrub(_error_message(resp))}"
                    if resp.status_code in FATAL_STATUS:
                        raise ChatError(f"{reason} (check --base_url, --model and --api_key)", fatal=True)
                    if resp.status_code not in RETRY_STATUS:
                        raise ChatError(reason)           # e.g. 400: this request is bad, not the server
                    wait = retry_after_seconds(resp.headers.get("Retry-After"))
            if attempt == self.max_tries:
                break
            if wait is None:
                # Exponential backoff with "equal jitter": half fixed, half random, so that many
                # workers hit by the same outage do not come back in lockstep.
                step = min(self.max_wait, self.backoff * 2 ** (attempt - 1))
                wait = step / 2 + random.uniform(0, step / 2)
            wait = min(wait, self.max_wait)
            log.info("request failed (%s); retry %d/%d in %.2fs", reason, attempt + 1, self.max_tries, wait)
            time.sleep(wait)
        raise ChatError(f"gave up after {self.max_tries} tries: {reason}")

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
                   help="API root, e.g. http://127.0.0.1:8000/v1 (default: $OPENAI_BASE_URL or that)")
    g.add_argument("--model", default=os.environ.get("OPENAI_MODEL", "default"),
                   help="model name the server knows (default: $OPENAI_MODEL or 'default')")
    g.add_argument("--api_key", default=os.environ.get("OPENAI_API_KEY"),
                   help="bearer token (default: $OPENAI_API_KEY); never logged or written")
    g.add_argument("--concurrency", type=int, default=8, help="requests in flight (worker threads)")
    g.add_argument("--timeout", type=float, default=60.0, help="seconds per request")
    g.add_argument("--max_tries", type=int, default=5, help="tries per request before the record fails")
    g.add_argument("--backoff", type=float, default=1.0, help="first retry wait in seconds (doubles)")
    g.add_argument("--temperature", type=float, default=None, help="sampling temperature (server default)")


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
