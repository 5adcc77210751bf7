"""What every command-line entry point shares: user errors as one line, and command-line options derived from a
config dataclass so each option is declared once.

A user error (bad value, missing file, a refused output directory) prints `error: MESSAGE` on stderr and exits
with status 2, no traceback; `--debug` or `ELO_DEBUG=1` shows the traceback. Ctrl-C exits with status 130.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import re
import sys
import types
import typing
from collections.abc import Callable, Iterable
from typing import Any

USER_ERRORS = (ValueError, OSError, KeyError, FloatingPointError)


def debug_enabled(argv: list[str] | None = None) -> bool:
    argv = sys.argv[1:] if argv is None else argv
    return "--debug" in argv or os.environ.get("ELO_DEBUG", "") not in ("", "0")


def fail(message: str) -> typing.NoReturn:
    """Exit with a one-line user error (status 2)."""
    print(f"error: {' '.join(str(message).split())}", file=sys.stderr, flush=True)
    sys.exit(2)


def run_main(main: Callable[[list[str] | None], Any], argv: list[str] | None = None) -> Any:
    """Call `main(argv)`, turning user errors into one line and exit status 2 (unless debugging)."""
    try:
        return main(argv)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr, flush=True)
        sys.exit(130)
    except USER_ERRORS as e:
        if debug_enabled(argv):
            raise
        message = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
        if isinstance(e, OSError) and e.filename and str(e.filename) not in message:
            message = f"{e.filename}: {message}"
        fail(message)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with its errors as one line (`error: ...`, exit 2) instead of usage + message."""

    def error(self, message: str) -> typing.NoReturn:
        fail(f"{message} (see {self.prog} --help)")


_COUNT = re.compile(r"\s*(\d+(?:\.\d+)?(?:e\d+)?)\s*([kmb]?)\s*", re.IGNORECASE)
_UNITS = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9}


def parse_count(text: str) -> float | None:
    """A count as people write it: `40000`, `2.5e6`, `300M`, `50k`, `2B` (k, M, B: 10^3, 10^6, 10^9); None when
    `text` is not one (the caller names the option in its error)."""
    match = _COUNT.fullmatch(text)
    return float(match[1]) * _UNITS[match[2].lower()] if match else None


def option(help: str, **more: Any) -> dict:
    """Field metadata for `add_dataclass_options`: the help text, plus `flag`, `repeat`, `metavar`, `parse`,
    `required`."""
    return {"help": help, **more}


def base_type(tp: Any) -> Any:
    """`int | None` -> int; `str` -> str."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def add_dataclass_options(parser: argparse.ArgumentParser, cls: type, skip: set[str] = frozenset(),
                          positive: set[str] = frozenset()) -> None:
    """One `--option` per field of dataclass `cls`: the type from the annotation, the default and the help text
    from the field (`field(metadata={"help": ...})`); booleans become flags. Fields in `skip` are left out;
    `metadata["flag"]` renames the option, `metadata["repeat"]` makes it repeatable (a list)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip or not f.init:
            continue
        flag = f.metadata.get("flag", "--" + f.name.replace("_", "-"))
        kind = base_type(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else None
        kw: dict[str, Any] = {"dest": f.name, "help": f.metadata.get("help")}
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            kw["required"] = not f.metadata.get("repeat")
        if kind is bool:
            kw["action"] = "store_true"
        elif f.metadata.get("repeat"):
            kw.update(action="append", default=[], metavar=f.metadata.get("metavar"))
            kw["required"] = f.metadata.get("required", False)
        else:
            kw.update(type=kind if kind in (int, float, str) else str, default=default,
                      metavar=f.metadata.get("metavar"))
        if kw.get("help") and "default" in kw and kw["default"] not in (None, [], False) and kind is not bool:
            kw["help"] += f" (default {kw['default']})"
        parser.add_argument(flag, **kw)
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")


def parse_config(cls: type, argv: list[str] | None, description: str) -> Any:
    """A stage config from the command line: one option per dataclass field."""
    p = ArgumentParser(description=description)
    add_dataclass_options(p, cls)
    a = vars(p.parse_args(argv))
    a.pop("debug")
    return build_config(cls, a)


def build_config(cls: type, values: dict[str, Any]) -> Any:
    """A stage config from option values (field name -> value; a repeated option: the list of its texts), each
    read by its field's `parse` as on the command line. The pipeline builds its stages' configs with this."""
    for f in dataclasses.fields(cls):
        if "parse" in f.metadata and f.name in values:
            values = values | {f.name: f.metadata["parse"](values[f.name])}
    return cls(**values)


def to_argv(cfg: Any, names: Iterable[str]) -> list[str]:
    """The options `names` of config `cfg` as the command line that `parse_config(type(cfg), argv)` reads back as
    `cfg` when every other option keeps its default. A repeated option's dict {key: [values]} becomes `--flag
    key=value` per value; a false flag, an empty repeated option and None are left out."""
    fields = {f.name: f for f in dataclasses.fields(cfg)}
    argv: list[str] = []
    for name in names:
        f, value = fields[name], getattr(cfg, name)
        flag = f.metadata.get("flag", "--" + name.replace("_", "-"))
        if f.metadata.get("repeat"):
            argv += [x for key, items in value.items() for item in items for x in (flag, f"{key}={item}")]
        elif isinstance(value, bool):
            argv += [flag] if value else []
        elif value is not None:
            argv += [flag, str(value)]
    return argv
