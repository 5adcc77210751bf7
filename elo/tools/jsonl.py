"""JSON Lines reading with errors that name the file and line."""
from __future__ import annotations

import json
from pathlib import Path


def read_jsonl(path: str | Path) -> list[tuple[int, dict]]:
    """(line number, record) for each non-blank line; a missing file or a line that is not a JSON object is a
    one-line error naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} not found")
    records = []
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}:{n}: not valid UTF-8 (byte {e.start} of the line)") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: malformed JSON line ({e.msg} at column {e.colno})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{n}: expected a JSON object, got {type(record).__name__}")
            records.append((n, record))
    return records
