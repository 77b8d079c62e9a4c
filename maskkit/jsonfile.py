"""Reading JSON files strictly: every problem is ONE line naming the file, the line (of a JSON-lines file)
and the field, raised as the caller's error type (a ValueError the CLI prints as one line), never a
traceback and never a default standing in for a damaged value.

    summary = Fields(read_json(path, StudyError), shown_path(path), StudyError)
    steps = summary.integer("steps", low=0)   # DIR/summary.json: field steps must be an integer >= 0, got "30"
    top1 = summary.object("linear").number("top1", low=0, high=1)

A file that is not a regular file (a FIFO would block the reader, a folder cannot be read), not UTF-8,
not JSON, or not of the expected shape is refused; NaN and Infinity parse (Python writes them) but no
`number` field accepts them. `shown_path` writes a file name that is not UTF-8 or holds a newline or
another control character escaped (`\\xff`, `\\n`), quoted, so a message stays one readable line.
"""

from __future__ import annotations

import json
import os
import re
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

from maskkit.options import shown_path as _shown_path

__all__ = ["Fields", "read_json", "read_json_lines", "read_text", "shown_path", "shown_value"]

_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def shown_path(path: str | os.PathLike[str] | bytes) -> str:
    """`path` as text for a one-line message: as it is when printable UTF-8, else quoted with its bytes
    that are not UTF-8 as `\\xNN` and its control characters (newline, tab, ...) escaped as Python does."""
    return _shown_path(path, quoted=True)


def shown_value(value: Any) -> str:
    """A JSON value as JSON text, cut to 40 characters."""
    text = json.dumps(value, ensure_ascii=False)
    text = text if text.isprintable() else json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _read_bytes(path: Path, error: type[Exception]) -> bytes:
    try:
        mode = os.stat(path).st_mode
    except OSError as err:
        raise error(f"{shown_path(path)}: cannot read it ({err.strerror or err})") from None
    if not stat.S_ISREG(mode):
        raise error(f"{shown_path(path)}: not a regular file")
    try:
        return path.read_bytes()
    except OSError as err:
        raise error(f"{shown_path(path)}: cannot read it ({err.strerror or err})") from None


def _decode(data: bytes, where: str, error: type[Exception]) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise error(f"{where}: not UTF-8 text (byte {err.start})") from None


def _parse(data: bytes, where: str, error: type[Exception]) -> Any:
    text = _decode(data, where, error)
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        at = f"column {err.colno}" if "\n" not in text.strip() else f"line {err.lineno} column {err.colno}"
        what = "empty" if not text.strip() else f"not JSON ({err.msg} at {at})"
        raise error(f"{where}: {what}") from None
    except RecursionError:
        raise error(f"{where}: not JSON that can be read (nested too deeply)") from None


def read_text(path: str | os.PathLike[str], error: type[Exception] = ValueError) -> str:
    """The UTF-8 text of the regular file `path`; a one-line `error` naming it otherwise."""
    path = Path(path)
    return _decode(_read_bytes(path, error), shown_path(path), error)


def read_json(path: str | os.PathLike[str], error: type[Exception] = ValueError) -> Any:
    """The JSON value held by the regular file `path`; a one-line `error` naming it otherwise."""
    path = Path(path)
    return _parse(_read_bytes(path, error), shown_path(path), error)


def read_json_lines(path: str | os.PathLike[str], error: type[Exception] = ValueError) -> Iterator[tuple[int, Any]]:
    """(line number, JSON value) of each non-blank line of `path`; a one-line `error` naming the file and line."""
    path = Path(path)
    for number, line in enumerate(_read_bytes(path, error).split(b"\n"), 1):
        if line.strip():
            yield number, _parse(line, f"{shown_path(path)} line {number}", error)


def _field(parent: str, key: str) -> str:
    """A field's name for messages: `a.b`, or `a["x-s0"]` for a key that is not an identifier."""
    if _KEY.match(key):
        return f"{parent}.{key}" if parent else key
    return f"{parent}[{json.dumps(key)}]"


class Fields:
    """A JSON object read from `where` (a file, or a file's line), its fields checked as they are taken.

    Each getter returns the value of the type asked for, or raises `error` in one line: `<where>: field
    <name> must be ..., got <value>` or `<where>: field <name> is missing`. `optional=True`: an absent
    field (or null) gives None.
    """

    def __init__(self, value: Any, where: str, error: type[Exception] = ValueError, name: str = "") -> None:
        self.where, self.error, self.name = where, error, name
        if not isinstance(value, dict):
            what = f"field {name} must be an object" if name else "must hold a JSON object"
            raise error(f"{where}: {what}, got {shown_value(value)}")
        self.raw: dict[str, Any] = value

    def __contains__(self, key: str) -> bool:
        return key in self.raw

    def keys(self) -> list[str]:
        return list(self.raw)

    def field(self, key: str) -> str:
        """The full name of `key` in messages."""
        return _field(self.name, key)

    def fail(self, key: str, why: str) -> NoReturn:
        """Raise the one-line error `<where>: field <key> <why>`."""
        raise self.error(f"{self.where}: field {self.field(key)} {why}")

    def _get(self, key: str, optional: bool) -> Any:
        value = self.raw.get(key)
        if value is None and not optional:
            self.fail(key, "is missing" if key not in self.raw else "must not be null")
        return value

    def number(
        self, key: str, *, low: float | None = None, high: float | None = None, above: float | None = None,
        optional: bool = False,
    ) -> float | None:
        """A finite number (not true/false), within [low, high] and above `above` where given."""
        value = self._get(key, optional)
        if value is None:
            return None
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and abs(value) != float("inf")
        ok = ok and value == value and (low is None or value >= low) and (high is None or value <= high)
        if not ok or (above is not None and not value > above):
            if low is not None and high is not None:
                what = f"a number in [{low:g}, {high:g}]"
            elif above is not None:
                what = f"a number > {above:g}"
            elif low is not None:
                what = f"a number >= {low:g}"
            else:
                what = "a finite number"
            self.fail(key, f"must be {what}, got {shown_value(value)}")
        return value  # an int stays an int, as the file wrote it

    def integer(
        self, key: str, *, low: int | None = None, high: int | None = None, optional: bool = False
    ) -> int | None:
        """An integer (not 1.0, not true/false), within [low, high] where given."""
        value = self._get(key, optional)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or (low is not None and value < low) \
                or (high is not None and value > high):  # fmt: skip
            bounds = f" in [{low}, {high}]" if low is not None and high is not None else \
                f" >= {low}" if low is not None else ""  # fmt: skip
            self.fail(key, f"must be an integer{bounds}, got {shown_value(value)}")
        return value

    def string(self, key: str, *, optional: bool = False) -> str | None:
        value = self._get(key, optional)
        if value is not None and not isinstance(value, str):
            self.fail(key, f"must be a string, got {shown_value(value)}")
        return value

    def boolean(self, key: str, *, optional: bool = False) -> bool | None:
        value = self._get(key, optional)
        if value is not None and not isinstance(value, bool):
            self.fail(key, f"must be true or false, got {shown_value(value)}")
        return value

    def object(self, key: str, *, optional: bool = False) -> Fields:
        """The nested object `key` (an empty one when optional and absent)."""
        value = self._get(key, optional)
        return Fields({} if value is None else value, self.where, self.error, self.field(key))
