"""Parsing and printing of byte sizes (``512M``, ``2G``, ``1T`` or plain bytes)."""

from __future__ import annotations

import re
from fractions import Fraction

from cargohold.errors import InvalidSize

KIB = 1 << 10
MIB = 1 << 20
GIB = 1 << 30
TIB = 1 << 40

#: Volumes are sized in whole MiB: the chunk map and the loop device's 4 KiB sectors need it.
SIZE_ALIGN = MIB
MIN_VOLUME_SIZE = 16 * MIB
MAX_VOLUME_SIZE = 64 * TIB

_UNITS = {"": 1, "B": 1, "K": KIB, "M": MIB, "G": GIB, "T": TIB}
MAX_SIZE_TEXT = 24  # characters: 64 TiB in bytes has 14 digits
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*?)(?:i?B)?\s*$")


def parse_size(text: str | int) -> int:
    """Return the byte count of ``text``; binary units (``1G`` is 1024**3 bytes)."""
    if isinstance(text, bool):
        raise InvalidSize(size=text, detail="not a size")
    if isinstance(text, int):
        if text.bit_length() > 64:
            raise InvalidSize(size=f"{text.bit_length()}-bit number", detail="too large")
        if text <= 0:
            raise InvalidSize(size=text, detail="must be greater than zero")
        return text
    if len(str(text)) > MAX_SIZE_TEXT:
        raise InvalidSize(size=f"{str(text)[:MAX_SIZE_TEXT]}...", detail="too long to be a size")
    match = _SIZE_RE.match(str(text))
    if not match:
        raise InvalidSize(size=text, detail="not a number with an optional unit")
    number, unit = match.groups()
    unit = unit.upper()
    if unit not in _UNITS:
        raise InvalidSize(size=text, detail=f"unknown unit {unit!r}")
    value = Fraction(number) * _UNITS[unit]  # exact, however many digits
    if value.denominator != 1:
        raise InvalidSize(size=text, detail="not a whole number of bytes")
    if value <= 0:
        raise InvalidSize(size=text, detail="must be greater than zero")
    return int(value)


def volume_size(text: str | int) -> int:
    """Parse a requested volume size, round it up to whole MiB and check the limits."""
    size = parse_size(text)
    size = -(-size // SIZE_ALIGN) * SIZE_ALIGN
    if size < MIN_VOLUME_SIZE:
        raise InvalidSize(size=text,
                          detail=f"the smallest volume is {format_size(MIN_VOLUME_SIZE)}")
    if size > MAX_VOLUME_SIZE:
        raise InvalidSize(size=text, detail=f"the largest volume is {format_size(MAX_VOLUME_SIZE)}")
    return size


def format_size(size: int) -> str:
    """Print ``size`` with the largest binary unit that keeps one decimal honest."""
    for unit, factor in (("T", TIB), ("G", GIB), ("M", MIB), ("K", KIB)):
        if size >= factor:
            value = size / factor
            return f"{value:.0f}{unit}" if value == int(value) else f"{value:.1f}{unit}"
    return f"{size}B"
