#!/usr/bin/env python3
"""gen_chains.py: caption-chain generation (issue 4 builds this out).

Bootstrap: only the shared JSONL reader exists so far; rank_dpo.py and eval_judge.py import it.
"""
from __future__ import annotations

import json
from typing import Iterator


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
