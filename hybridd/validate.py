"""Untrusted nested data (parsed TOML, JSON or msgpack) read with its dotted path kept. Pure.

A `Reader` holds one value and where it sits: `models[1].type_v`, `node.devices[0].memory_bytes`,
`inventory.models[0].max_ctx`. Each check returns the value typed or raises the exception the caller chose (ConfigError,
ProfileError, LinkProtocolError, BadPairingMessage, BadRequest...) with one line naming the path, the problem and,
where there is a fixed set, the valid choices:

    cfg.toml: models[1].type_v: unknown value "q9" (valid: bf16, f16, f32, iq4_nl, q4_0, q4_1, q5_0, q5_1, q8_0)

A `Wording` says how a kind of document words its failures: TOML for files people write, JSON for request bodies in
the uvicorn style (`'ctx' must be an integer, got a string`), MSGPACK for link frames (terse, Python type names).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import math
import re
from collections.abc import Callable, Collection, Mapping, Sequence, Sized
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")
S = TypeVar("S", bound=Sized)


class _Sentinel:
    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


# As a default: the key must be there. Typed Any so that a check called without a default returns its own type.
REQUIRED: Any = _Sentinel("REQUIRED")
_ABSENT: Any = _Sentinel("ABSENT")  # the value of a key that is not there
_MAC = re.compile(r"[0-9A-Fa-f]{2}([:-])[0-9A-Fa-f]{2}(\1[0-9A-Fa-f]{2}){4}")
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def field_names(cls: type) -> tuple[str, ...]:
    """The field names of a dataclass: the keys of a table that spells one out."""
    return tuple(f.name for f in dataclasses.fields(cls))


def json_kind(value: object) -> str:
    """What a decoded JSON value is, as an error message names it: "an object", "an array", "null"..."""
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", int: "an integer",
             float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def shown(value: object) -> str:
    """A value for an error message: its repr, cut short."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _english(value: object, names: Mapping[type, str]) -> str:
    if isinstance(value, bool) and bool in names:
        return names[bool]
    for kind, name in names.items():
        if isinstance(value, kind) and kind is not bool:
            return name
    return type(value).__name__


def _python_type(value: object, names: Mapping[type, str]) -> str:
    return type(value).__name__


def _short_repr(value: object) -> str:
    return repr(str(value)[:32])


def _double_quoted(value: object) -> str:
    return quoted(value)


def quoted(value: object) -> str:
    """value in double quotes, on one line whatever it holds: what is not printable is escaped."""
    text = json.dumps(str(value), ensure_ascii=False)
    return "".join(c if c.isprintable() else f"\\u{ord(c):04x}" for c in text)


@dataclass(frozen=True)
class Wording:
    """How one kind of document words a failure; the defaults are for files people write (TOML)."""

    line: str = "{path}: {problem}"  # a failure at the top of the document is the problem alone
    names: Mapping[type, str] = dataclasses.field(default_factory=lambda: {
        str: "a string", int: "an integer", float: "a number", bool: "a boolean", list: "an array", dict: "a table"})
    got: Callable[[object, Mapping[type, str]], str] = _english  # how a wrong value is named
    quote: Callable[[object], str] = _double_quoted  # how an offending key or value is shown in the problem
    wrong_type: str = "expected {want}, got {got}"
    missing: str = "missing"
    unknown_key: str = "unknown key (valid: {valid})"
    unknown_key_at_key: bool = True  # whether that failure's path is the unknown key's own (else the table's)
    unknown_choice: str = "unknown {what} {value} (valid: {valid})"
    between: str = "must be between {low} and {high}, got {value}"
    at_least: str = "must be >= {low}, got {value}"
    at_most: str = "must be <= {high}, got {value}"
    above: str = "must be > {low}, got {value}"
    not_finite: str = "must be finite, got {value}"
    empty: str = "must not be empty"
    too_long: str = "must be at most {limit} characters, got {length}"
    control: str = "contains control characters"
    too_many: str = "must have at most {limit} entries, got {count}"
    entry_path: str = ""  # how a map's entry extends the path; "" = like a table's key
    null_is_absent: bool = False  # whether a key whose value is null (None) counts as left out


TOML = Wording()
JSON = Wording(
    line="'{path}' {problem}",
    names={str: "a string", int: "an integer", float: "a number", bool: "a boolean", list: "an array",
           dict: "an object", type(None): "null"},
    quote=repr,
    wrong_type="must be {want}, got {got}",
    missing="is required",
    unknown_key="unknown field {key} (valid: {valid})",
    unknown_key_at_key=False,
    unknown_choice="must be one of {valid}, got {value}",
    null_is_absent=True,
)
MSGPACK = Wording(
    names={str: "a string", int: "an int", float: "a number", bool: "a boolean", list: "an array", dict: "a map"},
    got=_python_type,
    quote=_short_repr,
    unknown_key="unknown field {key} (valid: {valid})",
    unknown_key_at_key=False,
    between="{value} outside {low}..{high}",
    not_finite="not finite",
    empty="length 0 outside 1..{limit}",
    too_long="length {length} outside 1..{limit}",
    too_many="{count} entries exceed {limit}",
    entry_path="{path}[{key!r}]",
)


class Reader:
    """One value of an untrusted document and its path; each check returns it typed or raises the caller's error.

    A check on a value that is not there returns its `default`, unchecked, or fails when the default is REQUIRED.
    """

    __slots__ = ("_error", "_prefix", "_wording", "path", "value")

    def __init__(self, value: Any, error: Callable[[str], Exception], wording: Wording = TOML, *, path: str = "",
                 prefix: str = "") -> None:
        self.value = value
        self.path = path
        self._error = error
        self._wording = wording
        self._prefix = prefix  # e.g. the file's name, before every line

    @property
    def present(self) -> bool:
        """Whether the key this reader stands for is there at all."""
        return self.value is not _ABSENT

    def fail(self, problem: str) -> Exception:
        """The caller's exception for `problem` at this path, for the caller to raise."""
        line = self._wording.line.format(path=self.path, problem=problem) if self.path else problem
        return self._error(self._prefix + line)

    # ------------------------------------------------------------ moving down

    def at(self, key: str) -> Reader:
        """The value under `key` of this table (which `table` has checked), present or not."""
        if not isinstance(self.value, Mapping):
            raise TypeError(f"{self.path or 'the document'} was not checked to be a table before reading {key!r}")
        value = self.value.get(key, _ABSENT)
        if value is None and self._wording.null_is_absent:
            value = _ABSENT
        return self._child(value, self._key_path(key))

    def items(self, *, optional: bool = False, max_items: int | None = None) -> list[Reader]:
        """This array's items, each at `path[i]`; an absent optional array is empty."""
        if not self.present and optional:
            return []
        values = self._bounded_size(self.of(list), max_items)
        return [self._child(value, f"{self.path}[{i}]") for i, value in enumerate(values)]

    def entries(self, *, optional: bool = False, max_items: int | None = None,
                max_key_chars: int | None = None) -> dict[str, Reader]:
        """This map's entries by key (each key a string, printable and bounded when `max_key_chars` is given)."""
        if not self.present and optional:
            return {}
        table = self._bounded_size(self.of(dict), max_items)
        out = {}
        for key, value in table.items():
            name = self._child(key, f"{self.path} key")
            text = name.of(str) if max_key_chars is None else name.text(max_chars=max_key_chars, printable=True)
            path = self._wording.entry_path.format(path=self.path, key=text) if self._wording.entry_path \
                else self._key_path(text)
            out[text] = self._child(value, path)
        return out

    # ------------------------------------------------------------ checks

    def table(self, keys: Collection[str] | None = None, *, optional: bool = False) -> Reader:
        """This value as a table; a key outside `keys` (when given) fails naming the valid ones. An absent optional
        table reads as empty."""
        if not self.present and optional:
            return self._child({}, self.path)
        table = self.of(dict)
        if keys is not None:
            for key in table:
                if key not in keys:
                    raise self._unknown_key(key, keys)
        return self

    def of(self, kinds: type | tuple[type, ...], default: Any = REQUIRED, *, want: str | None = None) -> Any:
        """This value if it is one of `kinds` (a bool is not an int or a number unless bool is named)."""
        if not self.present:
            return self._default(default)
        wanted = kinds if isinstance(kinds, tuple) else (kinds,)
        if not isinstance(self.value, wanted) or (isinstance(self.value, bool) and bool not in wanted):
            names = self._wording.names
            want = want or " or ".join(names.get(kind, kind.__name__) for kind in wanted)
            raise self.fail(self._wording.wrong_type.format(want=want, got=self._wording.got(self.value, names)))
        return self.value

    def text(self, default: T = REQUIRED, *, max_chars: int | None = None, printable: bool = False) -> str | T:
        """A non-empty string of at most `max_chars` characters (and no control characters when `printable`)."""
        if not self.present:
            return self._default(default)
        value: str = self.of(str)
        if not value:
            raise self.fail(self._wording.empty.format(limit=max_chars))
        if max_chars is not None and len(value) > max_chars:
            raise self.fail(self._wording.too_long.format(limit=max_chars, length=len(value)))
        if printable and not value.isprintable():
            raise self.fail(self._wording.control)
        return value

    def integer(self, default: T = REQUIRED, *, low: int | None = None, high: int | None = None,
                above: int | None = None) -> int | T:
        """An integer within [low, high] (and > above)."""
        if not self.present:
            return self._default(default)
        value: int = self.of(int)
        self._check_bounds(value, low, high, above)
        return value

    def number(self, default: T = REQUIRED, *, low: float | None = None, high: float | None = None,
               above: float | None = None) -> float | T:
        """A finite integer or float as a float, within [low, high] (and > above); inf and nan never pass."""
        if not self.present:
            return self._default(default)
        value = self.of((int, float), want=self._wording.names.get(float, "a number"))
        # No document of ours has a use for inf or nan: an infinite timeout or size is a typo, not a setting.
        try:
            number = float(value)
        except OverflowError:  # an integer beyond any float
            number = math.inf
        if not math.isfinite(number):
            raise self.fail(self._wording.not_finite.format(value=number))
        self._check_bounds(value, low, high, above)
        return number

    def choice(self, choices: Sequence[str], default: T = REQUIRED, *, what: str = "value") -> str | T:
        """One of `choices`; a failure lists them in the order given."""
        if not self.present:
            return self._default(default)
        value: str = self.of(str)
        if value not in choices:
            raise self.fail(self._wording.unknown_choice.format(what=what, value=self._wording.quote(value),
                                                                valid=", ".join(choices)))
        return value

    def mac(self, default: T = REQUIRED) -> str | T:
        """An Ethernet MAC address ("aa:bb:cc:dd:ee:ff", '-' or ':' between the six bytes), in lowercase with ':'."""
        if not self.present:
            return self._default(default)
        value: str = self.of(str)
        if not _MAC.fullmatch(value):
            raise self.fail(f'expected a MAC address like "aa:bb:cc:dd:ee:ff", got {self._wording.quote(value)}')
        return value.lower().replace("-", ":")

    def ipv4(self, default: T = REQUIRED) -> str | T:
        """An IPv4 address in dotted form (where a Wake-on-LAN packet is broadcast)."""
        if not self.present:
            return self._default(default)
        value: str = self.of(str)
        try:
            return str(ipaddress.IPv4Address(value))
        except ValueError:
            raise self.fail(f'expected an IPv4 address like "192.168.1.255", got {self._wording.quote(value)}') \
                from None

    # ------------------------------------------------------------ helpers

    def _child(self, value: Any, path: str) -> Reader:
        return Reader(value, self._error, self._wording, path=path, prefix=self._prefix)

    def _key_path(self, key: str) -> str:
        shown = key if _BARE_KEY.fullmatch(key) else json.dumps(key, ensure_ascii=False)
        return f"{self.path}.{shown}" if self.path else shown

    def _default(self, default: Any) -> Any:
        if default is REQUIRED:
            raise self.fail(self._wording.missing)
        return default

    def _unknown_key(self, key: object, keys: Collection[str]) -> Exception:
        wording = self._wording
        where = self._child(None, self._key_path(str(key))) if wording.unknown_key_at_key else self
        return where.fail(wording.unknown_key.format(key=wording.quote(key), valid=", ".join(sorted(keys))))

    def _bounded_size(self, values: S, max_items: int | None) -> S:
        count = len(values)
        if max_items is not None and count > max_items:
            raise self.fail(self._wording.too_many.format(count=count, limit=max_items))
        return values

    def _check_bounds(self, value: float, low: float | None, high: float | None, above: float | None) -> None:
        wording = self._wording
        if above is not None and not value > above:
            raise self.fail(wording.above.format(low=above, value=value))
        if low is not None and high is not None and not low <= value <= high:
            raise self.fail(wording.between.format(low=low, high=high, value=value))
        if low is not None and high is None and not value >= low:
            raise self.fail(wording.at_least.format(low=low, value=value))
        if high is not None and low is None and not value <= high:
            raise self.fail(wording.at_most.format(high=high, value=value))
