"""What every command-line entry point shares: user errors as one line, and command-line options derived from a
config dataclass so each option is declared once.

A user error (bad value, missing file, a refused output directory) prints `error: MESSAGE` on stderr and exits
with status 2, no traceback; `--debug` or `ELO_DEBUG=1` shows the traceback. Ctrl-C exits with status 130.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import types
import typing
from collections.abc import Callable
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
    for f in dataclasses.fields(cls):
        if "parse" in f.metadata and f.name in a:
            a[f.name] = f.metadata["parse"](a[f.name])
    return cls(**a)
