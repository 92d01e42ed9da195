"""Choosing epochs and units of a cache: the ``0,2-4`` selections that export, info and show read and print."""

from __future__ import annotations

import re

from kdcache.errors import ConfigError

_SPAN = re.compile(r"^(\d+)(?:-(\d+))?$")


def parse_selection(text: str, what: str) -> tuple[int, ...]:
    """``"0,2-4"`` -> ``(0, 2, 3, 4)``: sorted, without repeats. ``what`` names the option in errors."""
    chosen: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        match = _SPAN.match(part)
        if match is None:
            raise ConfigError(f"{what} {text!r}: {part!r} is not a number or a range; expected e.g. 0,2-4")
        first, last = int(match.group(1)), int(match.group(2) or match.group(1))
        if last < first:
            raise ConfigError(f"{what} {text!r}: the range {part} runs backwards; write {last}-{first}")
        chosen.update(range(first, last + 1))
    if not chosen:
        raise ConfigError(f"{what} {text!r} selects nothing; expected e.g. 0,2-4")
    return tuple(sorted(chosen))


def format_selection(numbers) -> str:
    """``[0, 1, 2, 5]`` -> ``"0-2,5"``: the form :func:`parse_selection` reads."""
    spans: list[list[int]] = []
    for n in sorted(numbers):
        if spans and n == spans[-1][1] + 1:
            spans[-1][1] = n
        else:
            spans.append([n, n])
    return ",".join(f"{a}" if a == b else f"{a}-{b}" for a, b in spans)


def default_selection(cache) -> tuple[list[int], list[int]]:
    """(epochs, units) an export takes when none are chosen.

    From a subset, what it holds; else the epochs with any committed unit, and every unit (so a
    precompute stopped inside an epoch is refused, naming the unit, not exported as a block subset).
    """
    if cache.subset is not None:
        return cache.held_units()
    return cache.present_units()[0], list(range(cache.layout.num_units))
