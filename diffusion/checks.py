"""The checks of a setting's value, each raising one :class:`~diffusion.errors.SettingError` that names the key as
the user types it, the value, what is wrong and the fix: ``model.base_channels='abc' is not a whole number of at
least 1; e.g. model.base_channels=64``. Plain Python, so that the settings of the entry points and the classes that
Hydra builds (objectives, networks) check their values the same way."""

from __future__ import annotations

import difflib
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

from diffusion.errors import SettingError


def fail(key: str, value: Any, why: str, fix: str) -> NoReturn:
    raise SettingError(f"{key}={value!r} {why}; {fix}")


def is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def whole_number(
    key: str, value: Any, minimum: int, fix: str, *, allowed: tuple = (), maximum: float = math.inf
) -> None:
    """An int in [minimum, maximum] (or one of ``allowed``, e.g. ``None``)."""
    if value in allowed and not isinstance(value, bool):
        return
    if not isinstance(value, int) or isinstance(value, bool) or not minimum <= value <= maximum:
        at_most = f" and at most {int(maximum)}" if maximum < math.inf else ""
        fail(key, value, f"is not a whole number of at least {minimum}{at_most}", fix)


def number(key: str, value: Any, low: float, high: float, fix: str, *, open_low=False, open_high=False) -> None:
    """A real number in [low, high] (or open at either end); ``None`` passes where the setting may be null."""
    if value is None:
        return
    inside = is_number(value)
    inside = inside and (low < value if open_low else low <= value) and (value < high if open_high else value <= high)
    if not inside:
        where = f"{'(' if open_low else '['}{low:g}, {high:g}{')' if open_high else ']'}"
        fail(key, value, f"is not a number in {where}", fix)


def choice(key: str, value: Any, choices: tuple) -> None:
    """One of ``choices``, with the nearest one suggested."""
    if isinstance(value, bool) or value not in choices:
        close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        fail(key, value, "is not one of its choices", f"{hint}choose one of {', '.join(map(str, choices))}")


def flag(key: str, value: Any) -> None:
    if not isinstance(value, bool):
        fail(key, value, "is not true or false", f"e.g. {key}=true")


def whole_numbers(key: str, value: Any, minimum: int, fix: str, *, length: int | None = None, at_least=0) -> None:
    """A list of whole numbers, each at least ``minimum``: of exactly ``length`` elements, or at least ``at_least``."""
    good = isinstance(value, list | tuple) and all(
        isinstance(v, int) and not isinstance(v, bool) and v >= minimum for v in value
    )
    if not good or (length is not None and len(value) != length) or len(value) < at_least:
        size = f"{length}" if length is not None else f"at least {at_least}" if at_least else "any number of"
        fail(key, value, f"is not a list of {size} whole numbers of at least {minimum}", fix)


def known_keys(group: str, keys: Iterable[str], known: Sequence[str], *, what: str | None = None) -> None:
    """Every key one the group has (a typo would otherwise reach a constructor as an unexpected argument), the
    nearest one suggested; ``what`` names the class whose settings they are."""
    for key in keys:
        if key not in known:
            close = difflib.get_close_matches(key, list(known), n=1)
            hint = f"did you mean {group}.{close[0]}?" if close else f"its settings are {', '.join(known)}"
            raise SettingError(f"{group}.{key} is not a setting of {group}{f' ({what})' if what else ''}; {hint}")


@dataclass(frozen=True)
class Range:
    """Where a numeric setting may lie: in [low, high] (either end open), an int when ``whole``, or exactly one of
    ``allowed`` (``None`` for a setting that may be null, -1 for "no limit"). ``fix`` says what to give instead;
    ``{key}`` in it is the key. With ``others`` set, a value that is not a number is left to that library's own
    check (Lightning's ``trainer.devices`` also takes ``auto`` and lists)."""

    low: float
    high: float = math.inf
    fix: str = ""
    whole: bool = False
    open_low: bool = False
    open_high: bool = False
    allowed: tuple = ()
    others: str | None = None

    def check(self, key: str, value: Any) -> None:
        if any(value == a and type(value) is type(a) for a in self.allowed) or (value is None and None in self.allowed):
            return
        if self.others is not None and not is_number(value):
            return
        fix = self.fix.format(key=key) or f"see the comment on {key} in configs/"
        if value is None:
            fail(key, value, "must be given", fix)
        if self.whole:
            whole_number(key, value, math.ceil(self.low + self.open_low), fix, maximum=self.high)
        else:
            number(key, value, self.low, self.high, fix, open_low=self.open_low, open_high=self.open_high)
