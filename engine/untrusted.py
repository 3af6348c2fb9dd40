"""The one bounded reader of untrusted JSON and TOML text.

Peers, buckets, checkpoints and operators hand the engine text that someone else wrote: signed
object headers, weights indexes, chain rows, config files. The standard library parsers are
correct but unbounded: ``json.loads`` recurses once per nesting level (a few kilobytes of ``[``
end in ``RecursionError``), converts integer literals of any length (quadratic in the digits, and
``ValueError`` past Python's 4300-digit limit), accepts ``NaN``/``Infinity`` and silently keeps
the last of duplicate keys, so two readers of the same bytes can disagree. ``tomllib`` has the
same recursion and integer problems.

Every function here checks its bounds *before* the work they bound (size before decoding,
nesting depth and number length on a linear regex pre-scan before the parser runs) and turns
every failure into one :class:`UntrustedInputError` that names what was being read. Work and
memory are linear in the (bounded) input size: the parsed result takes at most about
``64 * max_bytes`` bytes (a JSON list of empty objects is the worst case).

:func:`canonical_json` is the one byte form that is signed and hashed; :func:`loads_canonical_json`
accepts exactly that form, so the bytes a signer signed and the value a reader acts on cannot
differ.
"""

from __future__ import annotations

import json
import math
import re
import tomllib
from itertools import accumulate
from typing import Any

from covenant.engine.errors import CovenantError

__all__ = [
    "UntrustedInputError",
    "canonical_json",
    "loads_canonical_json",
    "loads_json",
    "loads_toml",
]

DEFAULT_MAX_BYTES = 1 << 20
DEFAULT_MAX_DEPTH = 32
DEFAULT_MAX_INT_DIGITS = 64


class UntrustedInputError(CovenantError, ValueError):
    """Untrusted JSON/TOML text was refused; ``str(err)`` is ``"<what>: <problem>"``.

    ``bound`` is true when a limit was exceeded (size, depth, number length) rather than the
    text being malformed: a caller that falls back to reading malformed text as a plain string
    (``--set`` values) must still refuse these.
    """

    def __init__(self, what: str, problem: str, *, bound: bool = False) -> None:
        super().__init__(f"{what}: {problem}")
        self.what = what
        self.problem = problem
        self.bound = bound

    def __reduce__(self) -> tuple[Any, ...]:  # keep it picklable despite the keyword-only init
        return (_rebuild, (type(self), self.what, self.problem, self.bound))


def _rebuild(cls: type[UntrustedInputError], what: str, problem: str, bound: bool) -> Any:
    return cls(what, problem, bound=bound)


# --- lexical pre-scans (linear: possessive quantifiers never backtrack, and an unterminated
# string consumes the rest of the text instead of failing, which would rescan it from every
# later quote and make the scan quadratic)

_JSON_STRING = re.compile(r'"(?:[^"\\]++|\\.)*+(?:"|\\?\Z)', re.DOTALL)
_TOML_STRINGS_AND_COMMENTS = re.compile(
    r'"""(?:[^"\\]++|\\.|"(?!""))*+(?:"{3,5}|\\?\Z)'  # multi-line basic string
    r"|'''(?:[^']++|'(?!''))*+(?:'{3,5}|\Z)"  # multi-line literal string
    r'|"(?:[^"\\\n]++|\\[^\n])*+(?:"|\\?(?=\n)|\\?\Z)'  # basic string (ends at a newline)
    r"|'[^'\n]*+(?:'|(?=\n)|\Z)"  # literal string
    r"|\#[^\n]*+",  # comment
    re.DOTALL,
)
_NOT_BRACKET = re.compile(r"[^\[\]{}]++")
_OPENERS = frozenset("[{")
# a TOML integer literal in value position (after '=', '[' or ','), not a bare key (followed by
# '=' or '.') and not the start of a float, date or time (those go through parse_float or are
# short by construction)
_TOML_INT = re.compile(
    r"[=\[,]\s*+([+-]?(?:0[xob][0-9A-Fa-f_]++|[0-9_]++))(?![0-9A-Za-z_.\-:]|\s*+[=.])"
)
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_DIGIT = re.compile(r"[0-9A-Fa-f]")


def _max_bracket_depth(code: str) -> int:
    """Deepest ``[``/``{`` nesting of text with its strings (and comments) removed, linearly."""
    brackets = _NOT_BRACKET.sub("", code)
    if not brackets:
        return 0
    return max(accumulate(1 if c in _OPENERS else -1 for c in brackets))


def _check_size(data: bytes | str, what: str, max_bytes: int) -> str:
    """The text of ``data``, refused before decoding when it is over ``max_bytes`` UTF-8 bytes."""
    if isinstance(data, str):
        if len(data) > max_bytes:  # every character is at least one byte
            raise UntrustedInputError(what, f"larger than {max_bytes} bytes", bound=True)
        try:
            size = len(data.encode("utf-8"))
        except UnicodeEncodeError:
            raise UntrustedInputError(what, "not valid UTF-8 text (lone surrogate)") from None
        if size > max_bytes:
            raise UntrustedInputError(what, f"larger than {max_bytes} bytes", bound=True)
        return data
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise UntrustedInputError(what, f"expected bytes or text, got {type(data).__name__}")
    if len(data) > max_bytes:
        raise UntrustedInputError(what, f"larger than {max_bytes} bytes ({len(data)})", bound=True)
    try:
        return bytes(data).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UntrustedInputError(what, f"not valid UTF-8 at byte {exc.start}") from None


def _check_tree(value: Any, what: str, max_depth: int, root_depth: int = 0) -> None:
    """Walk a parsed value without recursion: depth bound and UTF-8-encodable strings."""
    stack: list[tuple[Any, int]] = [(value, root_depth)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, str):
            try:
                node.encode("utf-8")
            except UnicodeEncodeError:
                raise UntrustedInputError(what, "string holds a lone surrogate escape") from None
        elif isinstance(node, dict):
            if depth + 1 > max_depth:
                raise UntrustedInputError(
                    what, f"nested deeper than {max_depth} levels", bound=True
                )
            for key, item in node.items():
                stack.append((key, depth + 1))
                stack.append((item, depth + 1))
        elif isinstance(node, list):
            if depth + 1 > max_depth:
                raise UntrustedInputError(
                    what, f"nested deeper than {max_depth} levels", bound=True
                )
            stack.extend((item, depth + 1) for item in node)


def _count_digits(literal: str) -> int:
    body = literal.lstrip("+-")
    if body[:2] in ("0x", "0o", "0b"):
        body = body[2:]
    return len(_DIGIT.findall(body))


def loads_json(
    data: bytes | str,
    *,
    what: str,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_depth: int = DEFAULT_MAX_DEPTH,
    max_int_digits: int = DEFAULT_MAX_INT_DIGITS,
    allow_duplicate_keys: bool = False,
) -> Any:
    """Parse untrusted JSON within bounds; every failure is an :class:`UntrustedInputError`.

    Refused, each before the work it would cost: more than ``max_bytes`` bytes, text that is not
    UTF-8, containers nested deeper than ``max_depth``, number literals with more than
    ``max_int_digits`` digits, ``NaN``/``Infinity`` (also as the overflow of ``1e999``),
    duplicate object keys (unless ``allow_duplicate_keys``: then the last one wins, as in
    ``json``) and strings holding a lone surrogate escape (they cannot be written back out).
    """
    text = _check_size(data, what, max_bytes)
    code = _JSON_STRING.sub('""', text)  # outside strings, digits only occur in numbers
    if _max_bracket_depth(code) > max_depth:
        raise UntrustedInputError(what, f"nested deeper than {max_depth} levels", bound=True)
    if re.search(rf"[0-9]{{{max_int_digits + 1}}}", code):
        raise UntrustedInputError(what, f"number longer than {max_int_digits} digits", bound=True)

    def parse_float(literal: str) -> float:
        if _count_digits(literal) > max_int_digits:
            raise UntrustedInputError(
                what, f"number longer than {max_int_digits} digits", bound=True
            )
        value = float(literal)
        if not math.isfinite(value):
            raise UntrustedInputError(what, f"number out of range: {literal[:32]}")
        return value

    def parse_constant(literal: str) -> Any:
        raise UntrustedInputError(what, f"{literal} is not a JSON number")

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        out = dict(items)
        if len(out) != len(items) and not allow_duplicate_keys:
            seen: set[str] = set()
            for key, _ in items:
                if key in seen:
                    raise UntrustedInputError(what, f"duplicate key {key[:64]!r}")
                seen.add(key)
        return out

    try:
        value = json.loads(
            text,
            parse_float=parse_float,
            parse_constant=parse_constant,
            object_pairs_hook=pairs,
        )
    except UntrustedInputError:
        raise
    except json.JSONDecodeError as exc:
        raise UntrustedInputError(
            what, f"malformed JSON: {exc.msg} (line {exc.lineno} column {exc.colno})"
        ) from None
    except (ValueError, RecursionError) as exc:  # belt and braces: the pre-scan should catch these
        raise UntrustedInputError(
            what, f"malformed JSON: {type(exc).__name__}", bound=True
        ) from None
    if _SURROGATE_ESCAPE.search(text):  # only an escape can smuggle in a lone surrogate
        _check_tree(value, what, max_depth)
    return value


def canonical_json(obj: Any) -> bytes:
    """The one byte form of a JSON value that is signed and hashed: sorted keys, no spaces, ASCII."""
    return json.dumps(
        obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    ).encode("ascii")


def loads_canonical_json(data: bytes, *, what: str, **limits: Any) -> Any:
    """:func:`loads_json`, accepting only input that is byte for byte :func:`canonical_json`."""
    value = loads_json(data, what=what, **limits)
    raw = data.encode("utf-8") if isinstance(data, str) else bytes(data)
    if canonical_json(value) != raw:
        raise UntrustedInputError(what, "not in canonical form")
    return value


def loads_toml(
    text: str,
    *,
    what: str,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_depth: int = DEFAULT_MAX_DEPTH,
    max_int_digits: int = DEFAULT_MAX_INT_DIGITS,
) -> dict[str, Any]:
    """Parse untrusted TOML within bounds; every failure is an :class:`UntrustedInputError`.

    The same guarantees as :func:`loads_json`: size before decoding; inline nesting and integer
    length on a pre-scan before ``tomllib`` runs; ``nan``/``inf`` refused; table nesting from
    dotted keys and headers (which does not recurse in the parser) checked on the result.
    """
    text = _check_size(text, what, max_bytes)
    code = _TOML_STRINGS_AND_COMMENTS.sub('""', text)
    # a table header ``[a]``/``[[a]]`` scans as one or two levels but never holds inline values
    if _max_bracket_depth(code) > max(max_depth, 2):
        raise UntrustedInputError(what, f"nested deeper than {max_depth} levels", bound=True)
    for match in _TOML_INT.finditer(code):
        if _count_digits(match.group(1)) > max_int_digits:
            raise UntrustedInputError(
                what, f"integer longer than {max_int_digits} digits", bound=True
            )

    def parse_float(literal: str) -> float:
        if _count_digits(literal) > max_int_digits:
            raise UntrustedInputError(
                what, f"number longer than {max_int_digits} digits", bound=True
            )
        value = float(literal)
        if not math.isfinite(value):
            raise UntrustedInputError(what, f"{literal} is not a finite number")
        return value

    try:
        value = tomllib.loads(text, parse_float=parse_float)
    except UntrustedInputError:
        raise
    except tomllib.TOMLDecodeError as exc:
        raise UntrustedInputError(what, f"malformed TOML: {exc}") from None
    except (ValueError, RecursionError) as exc:  # belt and braces: the pre-scan should catch these
        raise UntrustedInputError(
            what, f"malformed TOML: {type(exc).__name__}", bound=True
        ) from None
    _check_tree(value, what, max_depth, root_depth=-1)  # the root table is not a level
    return value
