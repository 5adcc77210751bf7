"""Data sources: where the records of `--data LANG=SOURCE` (pretraining text, chat data) come from.

A SOURCE is one of

    FILE.jsonl | FILE.txt | FILE.parquet       a local file
    DIR                                        every .jsonl, .txt and .parquet file under DIR (recursively)
    GLOB                                       the local files matching GLOB (Python's glob: * and [..]; ** recurses)
    hf://datasets/OWNER/NAME[@REVISION]/GLOB   the files of a Hugging Face Hub dataset matching GLOB (huggingface_hub's
                                               allow_patterns: fnmatch, so * also matches /) at REVISION (a branch,
                                               tag or commit; default main; a ref with slashes URL-quoted, e.g.
                                               @refs%2Fconvert%2Fparquet)

optionally followed by `?OPTION&OPTION...` (`?` starts the options, so it is no wildcard in a GLOB):

    COLUMN=VALUE   keep only the records whose COLUMN equals VALUE (compared as text), e.g. ?language=Korean
    tokens=N       pretraining text: read the shards in order only until N tokens (50M, 2.5e9, 40000) are reached

A source's files (shards) are read in sorted path order. A Hub dataset is pinned to a commit when it is listed, and
each shard is fetched with hf_hub_download into huggingface_hub's own cache only when a reader reaches it; with
HF_HUB_OFFLINE=1 the commit and the shards come from that cache alone.

    listing = parse_source("hf://datasets/lightblue/tagengo-gpt4/*.parquet?language=Korean").list_shards()
    for shard in listing.shards:                  # listing.commit: the dataset's commit (None for local files)
        for number, record in shard.records():    # a JSON value, a Parquet row (dict) or a .txt document (str)
            ...
"""
from __future__ import annotations

import glob
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from types import ModuleType
from typing import Any
from urllib.parse import unquote

from huggingface_hub import HfApi, constants, hf_hub_download, snapshot_download
from huggingface_hub.utils import LocalEntryNotFoundError, filter_repo_objects

from elo.tools.cli import parse_count
from elo.tools.files import sha256_file
from elo.tools.jsonl import json_lines, utf8_lines

FORMATS = (".jsonl", ".txt", ".parquet")
HUB_PREFIX = "hf://datasets/"
_HUB_FORM = "hf://datasets/OWNER/NAME[@REVISION]/GLOB, e.g. hf://datasets/wikimedia/wikipedia/20231101.ko/*.parquet"
_FORMAT_NAMES = ".jsonl, .txt or .parquet"


@dataclass(frozen=True)
class HubFile:
    repo_id: str  # OWNER/NAME
    commit: str
    path: str  # inside the dataset repository


@dataclass(frozen=True)
class Shard:
    """One file of a source, with the source's record filters."""

    name: str  # a local path, or hf://datasets/OWNER/NAME@COMMIT/PATH: what errors and record locations name
    where: tuple[tuple[str, str], ...] = ()  # (column, value): the records kept
    hub: HubFile | None = None

    def __str__(self) -> str:
        return self.name

    @property
    def suffix(self) -> str:
        return PurePosixPath(self.name).suffix

    def identity(self) -> list[str]:
        """Format and contents, for a token cache key: a local file's sha256; a Hub file's name, whose commit pins
        its contents (so nothing is downloaded to compute it)."""
        return [self.suffix, self.name if self.hub else sha256_file(self.name)]

    def fetch(self) -> Path:
        """The shard as a local file: a Hub file is downloaded into huggingface_hub's cache the first time."""
        if self.hub is None:
            return Path(self.name)
        try:
            return Path(hf_hub_download(self.hub.repo_id, self.hub.path, repo_type="dataset",
                                        revision=self.hub.commit))
        except LocalEntryNotFoundError:  # offline, or no network: and the cache lacks it (or its blob was deleted)
            raise FileNotFoundError(f"{self}: shard missing: not in the local Hugging Face cache "
                                    f"({constants.HF_HUB_CACHE}) and the Hub cannot be reached") from None

    def records(self, columns: Sequence[str] | None = None) -> Iterator[tuple[int, Any]]:
        """(line or row number, record) of each record the filters keep: a JSON value per non-blank line of a .jsonl
        file, a dict per row of a .parquet file (only `columns`, which must exist, and the filter columns; None: all
        columns), a blank-line separated document per .txt file. Bad UTF-8 or JSON is a one-line error naming the
        shard and line."""
        path = self.fetch()
        if self.suffix == ".parquet":
            rows = self._parquet_rows(path, columns)
        elif self.suffix == ".jsonl":
            rows = json_lines(path, str(self))
        else:
            rows = self._txt_documents(path)
        for number, record in rows:
            if self._kept(number, record):
                yield number, record

    def _kept(self, number: int, record: Any) -> bool:
        for column, value in self.where:
            if not isinstance(record, dict) or column not in record:
                raise ValueError(f"{self}:{number}: no {column!r} field to select records by")
            if str(record[column]) != value:
                return False
        return True

    def _txt_documents(self, path: Path) -> Iterator[tuple[int, str]]:
        paragraph: list[str] = []
        start = 0
        for number, line in utf8_lines(path, str(self)):
            if line.strip():
                start = start if paragraph else number
                paragraph.append(line)
            elif paragraph:
                yield start, "".join(paragraph).rstrip("\r\n")
                paragraph = []
        if paragraph:
            yield start, "".join(paragraph).rstrip("\r\n")

    def _parquet_rows(self, path: Path, columns: Sequence[str] | None) -> Iterator[tuple[int, dict]]:
        parquet = _parquet_module(self)
        try:
            file = parquet.ParquetFile(path)
        except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
            raise ValueError(f"{self}: not a readable Parquet file ({e})") from None
        names = file.schema_arrow.names
        wanted = None if columns is None else list(dict.fromkeys([*columns, *(c for c, _ in self.where)]))
        for column in wanted or [c for c, _ in self.where]:
            if column not in names:
                raise ValueError(f"{self}: no column {column!r}; its columns are {', '.join(names)}")
        number = 0
        for batch in file.iter_batches(columns=wanted):
            for row in batch.to_pylist():
                number += 1
                yield number, row


@dataclass(frozen=True)
class Listing:
    """A source's shards, in reading order."""

    source: Source
    commit: str | None  # the Hub dataset's commit the shards are read at (None: local files)
    shards: tuple[Shard, ...]


@dataclass(frozen=True)
class Source:
    """A parsed SOURCE string (see the module docstring); `list_shards` finds its files."""

    spec: str  # the SOURCE, a local path made absolute: how run configs, errors and provenance name it
    location: str  # a local file, directory or glob; or the GLOB inside a Hub dataset
    repo_id: str | None = None  # OWNER/NAME of a Hub dataset
    revision: str | None = None  # the Hub branch, tag or commit asked for (None: main)
    where: tuple[tuple[str, str], ...] = ()  # (column, value): the records kept
    tokens: int | None = None  # pretraining text: read only until this many tokens

    def __str__(self) -> str:
        return self.spec

    def list_shards(self) -> Listing:
        """The shards, cheaply: local files are found, a Hub dataset's commit and files are looked up (offline: in
        the local cache); nothing is read or downloaded. A source without files is a one-line error naming it."""
        listing = self._list_hub() if self.repo_id else self._list_local()
        suffixes = {shard.suffix for shard in listing.shards}
        if ".parquet" in suffixes:
            _parquet_module(self)
        if self.where and ".txt" in suffixes:
            raise ValueError(f"{self}: ?{self.where[0][0]}= selects records by a column; .txt documents have none")
        return listing

    def _list_local(self) -> Listing:
        path = Path(self.location)
        if any(wildcard in self.location for wildcard in "*["):
            names = sorted(p for p in glob.glob(self.location, recursive=True) if _is_data_file(Path(p)))
            if not names:
                raise FileNotFoundError(f"{self}: no {_FORMAT_NAMES} files match")
        elif path.is_dir():
            names = sorted(str(p) for p in path.rglob("*") if _is_data_file(p))
            if not names:
                raise FileNotFoundError(f"{self}: a directory without {_FORMAT_NAMES} files")
        elif path.suffix not in FORMATS:
            raise ValueError(f"{path}: unsupported file type {path.suffix!r}; expected {_FORMAT_NAMES}")
        elif not path.is_file():
            raise FileNotFoundError(f"file {path} not found")
        else:
            names = [str(path)]
        return Listing(self, None, tuple(Shard(name, self.where) for name in names))

    def _list_hub(self) -> Listing:
        if constants.HF_HUB_OFFLINE:
            try:
                snapshot = Path(snapshot_download(self.repo_id, repo_type="dataset", revision=self.revision,
                                                  allow_patterns=self.location, local_files_only=True))
            except LocalEntryNotFoundError:
                raise FileNotFoundError(f"{self}: not in the local Hugging Face cache ({constants.HF_HUB_CACHE}) "
                                        f"and HF_HUB_OFFLINE is set; fetch it once online") from None
            commit = snapshot.name
            files = [p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if not p.is_dir()]
        else:
            api = HfApi()
            try:
                commit = api.dataset_info(self.repo_id, revision=self.revision).sha
                files = api.list_repo_files(self.repo_id, repo_type="dataset", revision=commit)
            except Exception as e:  # unknown or gated dataset, bad revision, no network: Hub errors are many-typed
                reason = str(e).strip().splitlines()[0] if str(e).strip() else ""
                raise ValueError(f"{self}: the Hugging Face Hub cannot list it ({type(e).__name__}: {reason}); "
                                 f"set HF_HUB_OFFLINE=1 to read it from the local cache") from None
        names = sorted(f for f in filter_repo_objects(files, allow_patterns=self.location)
                       if PurePosixPath(f).suffix in FORMATS)
        if not names:
            raise FileNotFoundError(f"{self}: no {_FORMAT_NAMES} files match {self.location!r} at commit {commit}")
        return Listing(self, commit, tuple(Shard(f"{HUB_PREFIX}{self.repo_id}@{commit}/{name}", self.where,
                                                 HubFile(self.repo_id, commit, name)) for name in names))


def parse_source(spec: str | os.PathLike, base: str | os.PathLike | None = None) -> Source:
    """Parse a SOURCE (nothing is read): a local path is made absolute, relative to `base` (default: the working
    directory). A malformed SOURCE is a one-line error."""
    text = os.fspath(spec).strip()
    location, _, options = text.partition("?")
    where, tokens = _parse_options(text, options)
    if location.startswith("hf://"):
        if not location.startswith(HUB_PREFIX):
            raise ValueError(f"{text}: only Hub datasets can be data; expected {_HUB_FORM}")
        owner, _, rest = location.removeprefix(HUB_PREFIX).partition("/")
        name, _, pattern = rest.partition("/")
        name, _, revision = name.partition("@")
        if not (owner and name and pattern):
            raise ValueError(f"{text}: expected {_HUB_FORM}")
        return Source(text, pattern, f"{owner}/{name}", unquote(revision) or None, where, tokens)
    local = str((Path(base or ".") / location).resolve())
    return Source(local + (f"?{options}" if options else ""), local, where=where, tokens=tokens)


def source_digests(specs: Iterable[str | os.PathLike]) -> dict[str, str]:
    """Provenance of data: each local file's sha256 under its path, each Hub dataset's commit under its SOURCE."""
    digests = {}
    for spec in specs:
        listing = parse_source(spec).list_shards()
        if listing.commit:
            digests[listing.source.spec] = listing.commit
        else:
            digests |= {shard.name: sha256_file(shard.name) for shard in listing.shards}
    return digests


def _parse_options(spec: str, options: str) -> tuple[tuple[tuple[str, str], ...], int | None]:
    where: dict[str, str] = {}
    tokens = None
    for option in filter(None, options.split("&")):
        key, sep, value = option.partition("=")
        if not (sep and key and value):
            raise ValueError(f"{spec}: bad option {option!r}; expected COLUMN=VALUE or tokens=N after '?'")
        if key in where or (key == "tokens" and tokens is not None):
            raise ValueError(f"{spec}: option {key!r} is given twice")
        if key == "tokens":
            tokens = _parse_count(spec, value)
        else:
            where[key] = value
    return tuple(where.items()), tokens


def _parse_count(spec: str, value: str) -> int:
    count = int(parse_count(value) or 0)
    if count < 1:
        raise ValueError(f"{spec}: tokens={value}; expected a positive count such as 50M, 2.5e9 or 40000")
    return count


def _is_data_file(path: Path) -> bool:
    return path.suffix in FORMATS and path.is_file()


def _parquet_module(source: Source | Shard) -> ModuleType:
    try:
        import pyarrow.parquet  # optional: only Parquet sources need it
    except ImportError:  # a ValueError, so that the command-line tools print it as one line
        raise ValueError(f'{source}: reading Parquet needs pyarrow; install it with pip install -e ".[hub]"') from None
    return pyarrow.parquet
