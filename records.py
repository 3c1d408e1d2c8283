"""records.py: what the three tools share about records on disk.

Every file the tools read or write is JSONL (one JSON object a line) or one JSON document:
  - reading names the file and line of anything bad (DataError), and checks ids and statuses
    the same way everywhere: each record has a unique non-empty string `id`; a record an
    earlier step wrote with a `status` other than "ok" (failed, no_preference) carries no data;
  - whole files are written atomically (a temporary file, then a rename), so a kill leaves
    the old file or the new one, never half of one;
  - long-running outputs are append-only and resumable (ResumableJsonl, map_resumable): each
    finished record is one fsynced line, one writer at a time, and re-running the same command
    after a kill finishes the job with every id exactly once;
  - a training run's metadata (RUN_META, next to its adapter) is read and written here.

Nothing here knows about models, LLMs or the toy world; gen_chains.py, rank_dpo.py and
eval_judge.py all import it, and it imports none of them.
"""
from __future__ import annotations

import concurrent.futures as cf
import fcntl
import hashlib
import json
import logging
import math
import os
import sys
import threading
import time
from typing import Callable, Iterable, Iterator

log = logging.getLogger("records")

RUN_META = "rank_dpo.json"      # written next to a trained adapter: base model, init chain, run args


# =============================================================================================
# Reading: bad input is named by file, line and field
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


def load_jsonl(path: str) -> list[dict]:
    """Every record of a JSONL file, in order (read_jsonl without the line numbers)."""
    return [record for _, record in read_jsonl(path)]


def is_ok(record: dict) -> bool:
    """Whether a record carries data: no status (an input) or status "ok" (a finished step)."""
    return record.get("status", "ok") == "ok"


def read_records(path: str, require: dict[str, type | tuple[type, ...]] | None = None,
                 allow_empty: bool = False) -> tuple[list[tuple[int, dict]], int]:
    """(line, record) for every record of an input file, checked up front: each has a unique
    non-empty string `id` and each required field with the right type (non-empty strings and
    lists unless allow_empty). Records that are not ok (is_ok) are left out and counted (the
    second return value), never silently dropped. Errors name file, line and field."""
    if not os.path.exists(path):
        raise DataError(path, None, "input file not found")
    records, seen, left_out = [], {}, 0
    for line_no, rec in read_jsonl(path):
        rid = rec.get("id")
        if not isinstance(rid, str) or not rid:
            raise DataError(path, line_no, "missing or not a non-empty string", "id")
        if rid in seen:
            raise DataError(path, line_no, f"duplicate id {rid!r} (first on line {seen[rid]})", "id")
        seen[rid] = line_no
        if not is_ok(rec):
            left_out += 1
            continue
        for name, kind in (require or {}).items():
            value = rec.get(name)
            if value is None:
                raise DataError(path, line_no, "missing", name)
            empty = not allow_empty and isinstance(value, (str, list)) and not value
            if not isinstance(value, kind) or empty:
                raise DataError(path, line_no, f"expected a {'' if allow_empty else 'non-empty '}"
                                f"{_type_names(kind)}", name)
        records.append((line_no, rec))
    return records, left_out


def records_by_id(path: str, require: dict[str, type | tuple[type, ...]] | None = None,
                  allow_empty: bool = False) -> dict[str, tuple[int, dict]]:
    """read_records as {id: (line, record)}, for files joined by id."""
    found, _ = read_records(path, require, allow_empty)
    return {rec["id"]: (line, rec) for line, rec in found}


def _type_names(kind) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    names = {"str": "string", "list": "list", "dict": "object"}
    return " or ".join(names.get(k.__name__, k.__name__) for k in kinds)


# =============================================================================================
# Whole files: written atomically
# =============================================================================================

def _json_safe(x):
    """NaN / inf (an undefined statistic) -> null, so the file is strict JSON."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


def _replace_atomically(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_jsonl(path: str, records: Iterable[dict]) -> None:
    """Write a whole JSONL file, all of it or none of it (tmp file + rename)."""
    _replace_atomically(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def write_json(path: str, obj, indent: int = 2) -> None:
    """Write a JSON document, all of it or none of it; NaN and inf become null."""
    _replace_atomically(path, json.dumps(_json_safe(obj), indent=indent) + "\n")


def read_run_meta(directory: str) -> dict:
    """The run metadata next to a trained adapter ({} where the directory has none)."""
    path = os.path.join(directory, RUN_META)
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def write_run_meta(directory: str, meta: dict) -> None:
    write_json(os.path.join(directory, RUN_META), meta, indent=1)


# =============================================================================================
# Resumable outputs: append-only, one writer, exactly once across kills
# =============================================================================================

class OutputLocked(RuntimeError):
    """Another live process is writing the same output file."""


def lock_output(path: str) -> int:
    """Take the one-writer lock of an output file: flock on the sidecar PATH.lock, which holds the
    holder's pid. The kernel drops a flock when its holder dies, so a killed run never blocks the
    next one; a live holder makes this raise OutputLocked at once, naming the file and the pid.
    Returns the lock's fd (closing it releases the lock)."""
    lock_path = path + ".lock"
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        try:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        finally:
            os.close(fd)
        raise OutputLocked(f"{path}: another run (pid {holder}) is writing this file; wait for it "
                           f"to finish or stop it (lock: {lock_path})") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


class ResumableJsonl:
    """An append-only JSONL output that survives kill -9, with one writer at a time.

    Each finished record is one line written with a single write, then flushed and fsynced, so
    at any instant the file holds complete lines plus at most one torn last line. Opening the
    file repairs that torn line (a tail that is not a complete JSON object is cut off) and
    collects the ids already written; a run skips those, so re-running the same command
    finishes the job with every id exactly once. The file is locked (lock_output) from before
    the scan until close, so two runs on one file cannot write the same id twice.
    """

    def __init__(self, path: str, drop_failed: bool = False):
        self.path = path
        self.done_ids: set[str] = set()
        self.repaired = False
        self._lock = threading.Lock()
        self._fd = None
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self._lock_fd = lock_output(path)
        try:
            self._repair_and_scan(drop_failed)
            self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        except BaseException:
            os.close(self._lock_fd)
            raise

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
        if self._lock_fd is not None:
            os.close(self._lock_fd)            # releases the flock; the .lock file stays, harmless
            self._lock_fd = None

    def __enter__(self) -> "ResumableJsonl":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def collect_outputs(path: str, ids: Iterable[str]) -> dict[str, dict]:
    """The records of a resumable output file for `ids`; a later success replaces a failure."""
    wanted, out = set(ids), {}
    if not os.path.exists(path):
        return out
    for _, rec in read_jsonl(path):
        rid = str(rec.get("id"))
        if rid in wanted and (rid not in out or out[rid].get("status") == "failed"):
            out[rid] = rec
    return out


class RecordFailed(RuntimeError):
    """One record could not be done (e.g. an LLM request that failed for good): map_resumable
    writes it as {"id", "status": "failed", "reason", **details} and goes on. A fatal one (every
    record would fail alike: a wrong URL, key or model) stops the run instead."""

    def __init__(self, reason: str, fatal: bool = False, details: dict | None = None):
        super().__init__(reason)
        self.fatal = fatal
        self.details = details or {}


def map_resumable(records: Iterable[dict], fn: Callable[[dict], dict], out_path: str,
                  concurrency: int = 1, desc: str = "records", drop_failed: bool = False,
                  postfix: Callable[[], dict] | None = None) -> dict:
    """Run fn(record) -> output record over a thread pool, appending each result to out_path.

    Ids already in out_path are skipped (resume). A RecordFailed becomes a failed record; a
    fatal one, or any other exception, stops the run, since every record would fail the same way.
    The progress bar shows records/s and the time left; postfix() adds live figures of the
    caller's (e.g. an LLM client's tokens/s). Returns a summary: total, skipped (already done),
    done, failed, kept (done and ok: is_ok), seconds, rate.
    """
    from tqdm.auto import tqdm              # comes with transformers

    out = ResumableJsonl(out_path, drop_failed=drop_failed)
    records = list(records)
    todo = [r for r in records if r["id"] not in out.done_ids]
    summary = {"total": len(records), "skipped": len(records) - len(todo), "done": 0, "failed": 0, "kept": 0}
    start = time.monotonic()
    bar = tqdm(total=len(todo), desc=desc, unit="rec", dynamic_ncols=True, file=sys.stderr,
               disable=None if todo else True)

    def run_one(rec: dict) -> dict:
        try:
            result = fn(rec)
        except RecordFailed as e:
            if e.fatal:
                raise
            result = {"id": rec["id"], "status": "failed", "reason": str(e), **e.details}
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
                        summary["kept"] += is_ok(result)
                    bar.update(1)
                    bar.set_postfix(failed=summary["failed"], **(postfix() if postfix else {}), refresh=False)
    finally:
        bar.close()
        out.close()
    summary["seconds"] = round(time.monotonic() - start, 3)
    summary["rate"] = round((summary["done"] + summary["failed"]) / max(summary["seconds"], 1e-9), 2)
    return summary


# =============================================================================================
# Shared caches: many writers, a value per key, first line wins
# =============================================================================================

TAIL_WINDOW = 1 << 16      # a cache line is far shorter: a torn one ends within this of the end


class SharedCache:
    """A key -> JSON value cache in one append-only JSONL file that several processes write at
    once (the ranks of a torchrun job, runs sharing the file).

    Unlike ResumableJsonl (one writer for a whole run), each append takes the flock on
    PATH.lock only for its own write: it cuts a torn tail a killed writer left (bytes after the
    last newline), writes its lines in one write and fsyncs. Every line carries a checksum of
    its key and value, so a torn, garbled or hand-edited line is never read as a value: it is
    skipped with a warning naming file:line, and the key is computed again. The first line of a
    key wins (two writers may both add a key they both missed), so every reader of the file sees
    the same value. `refresh()` reads only what was appended since the last read.
    """

    def __init__(self, path: str):
        self.path = path
        self.values: dict[str, object] = {}
        self.skipped = 0                        # lines dropped: torn, garbled, failed checksum
        self._offset = 0                        # bytes read so far, always at a line boundary
        self._line_no = 0
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.refresh()

    @staticmethod
    def _checksum(key: str, value_json: str) -> str:
        return hashlib.sha256(f"{key}\t{value_json}".encode()).hexdigest()[:16]

    def _parse(self, raw: bytes):
        """(key, value) of one line, or None for a line that is not a whole, checked entry."""
        try:
            rec = json.loads(raw)
            key, value, check = rec["key"], rec["value"], rec["check"]
        except (ValueError, TypeError, KeyError):
            return None
        if not isinstance(key, str) or check != self._checksum(key, json.dumps(value)):
            return None
        return key, value

    def refresh(self) -> int:
        """Read the complete lines appended since the last read; returns how many were new."""
        if not os.path.exists(self.path):
            return 0
        with open(self.path, "rb") as f:
            f.seek(self._offset)
            data = f.read()
        data = data[:data.rfind(b"\n") + 1]        # a tail without its newline: not yet whole
        new = 0
        for raw in data.split(b"\n")[:-1]:
            self._line_no += 1
            if not raw.strip():
                continue
            entry = self._parse(raw)
            if entry is None:
                self.skipped += 1
                log.warning("%s:%d: skipped a line that is not a whole cache entry (torn or "
                            "garbled); its value is computed again", self.path, self._line_no)
            elif entry[0] not in self.values:
                self.values[entry[0]] = entry[1]
                new += 1
        self._offset += len(data)
        return new

    def get(self, key: str):
        return self.values.get(key)

    def add(self, entries: dict[str, object]) -> None:
        """Append the entries whose key is not in the cache yet (one write, under the lock)."""
        entries = {k: v for k, v in entries.items() if k not in self.values}
        if not entries:
            return
        lines = []
        for key, value in entries.items():
            value_json = json.dumps(value)
            lines.append(json.dumps({"key": key, "value": value,
                                     "check": self._checksum(key, value_json)}) + "\n")
        data = "".join(lines).encode("utf-8")
        lock_fd = os.open(self.path + ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                size = os.fstat(fd).st_size
                start = max(0, size - TAIL_WINDOW)
                tail = os.pread(fd, size - start, start)
                if tail and not tail.endswith(b"\n"):   # a writer was killed mid-line: cut it off
                    if tail.rfind(b"\n") < 0 and start > 0:
                        raise DataError(self.path, None, f"the last {TAIL_WINDOW} bytes hold no "
                                        "line end; not a cache file")
                    cut = start + tail.rfind(b"\n") + 1
                    log.warning("%s: cut a torn last line (%d bytes from an interrupted write)",
                                self.path, size - cut)
                    os.ftruncate(fd, cut)
                    size = cut
                view = memoryview(data)
                while view:                        # os.pwrite may write less than asked
                    size += (n := os.pwrite(fd, view, size))
                    view = view[n:]
                os.fsync(fd)
            finally:
                os.close(fd)
        finally:
            os.close(lock_fd)                      # releases the flock
        self.refresh()                             # our lines, and any another writer added
