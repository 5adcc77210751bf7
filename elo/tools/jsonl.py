"""JSON Lines reading with errors that name the file and line."""
from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def utf8_lines(path: Path, name: str) -> Iterator[tuple[int, str]]:
    """(line number, line) of a UTF-8 text file (a byte-order mark ignored); bad UTF-8 is a one-line error naming
    `name` and the line."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            try:
                yield number, raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{name}:{number}: not valid UTF-8 (byte {e.start} of the line)") from None


def json_lines(path: Path, name: str) -> Iterator[tuple[int, Any]]:
    """(line number, JSON value) of each non-blank line; a malformed line is a one-line error naming `name` and it."""
    for number, line in utf8_lines(path, name):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{name}:{number}: malformed JSON line ({e.msg} at column {e.colno})") from None


def read_jsonl(path: str | Path) -> list[tuple[int, dict]]:
    """(line number, record) for each non-blank line of a file of JSON objects; a missing file or a line that is not
    a JSON object is a one-line error naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} not found")
    records = []
    for number, record in json_lines(path, str(path)):
        if not isinstance(record, dict):
            raise ValueError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
        records.append((number, record))
    return records
