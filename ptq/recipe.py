"""Checks of the settings a recipe file (or the Python API) gives: each value of the type and range its setting
takes, and per-tensor overrides with known keys and names that match a quantizer. Every failure is an InputError
naming the setting (and the file, where there is one)."""
from __future__ import annotations

import difflib
import math

from .errors import InputError

OVERRIDE_KEYS = {"bits": int, "symmetric": bool, "per_channel": bool, "range": str}
OVERRIDE_BITS = set(range(2, 9)) | {16}
_KIND = {bool: "true or false", int: "a whole number", float: "a number", str: "a string", tuple: "a list",
         list: "a list", dict: "a table"}


def _prefix(where: str | None) -> str:
    return f"{where}: " if where else ""


def _fits(value, kind) -> bool:
    if kind is bool:
        return isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if kind in (tuple, list):
        return isinstance(value, (tuple, list))
    return isinstance(value, kind)


def check_types(values: dict, defaults: dict, optional: dict, where: str | None = None) -> None:
    """Each ``values[k]`` of the type of ``defaults[k]`` (an int where the default is an int, …); a setting whose
    default is None takes None or the type ``optional[k]`` names."""
    for k, v in values.items():
        kind = optional.get(k) if defaults.get(k) is None else type(defaults[k])
        if kind is None or (v is None and k in optional):
            continue
        if not _fits(v, kind):
            raise InputError(f"{_prefix(where)}setting {k} must be {_KIND.get(kind, kind.__name__)}, not {v!r}")


def check_overrides(overrides, methods: tuple, where: str | None = None) -> None:
    """``[overrides."name"]`` tables: known keys, each of its type; bits 2-8 or 16; a known range method."""
    if not isinstance(overrides, dict):
        raise InputError(f"{_prefix(where)}overrides must be tables [overrides.\"name\"], not {overrides!r}")
    for name, o in overrides.items():
        if not isinstance(o, dict):
            raise InputError(f"{_prefix(where)}[overrides.\"{name}\"] must be a table of settings, not {o!r}")
        for k, v in o.items():
            if k not in OVERRIDE_KEYS:
                near = difflib.get_close_matches(k, OVERRIDE_KEYS, 1)
                raise InputError(f"{_prefix(where)}[overrides.\"{name}\"]: unknown key {k!r}"
                                 + (f" (did you mean {near[0]!r}?)" if near else "")
                                 + f"; known: {', '.join(sorted(OVERRIDE_KEYS))}")
            if not _fits(v, OVERRIDE_KEYS[k]):
                raise InputError(f"{_prefix(where)}[overrides.\"{name}\"]: {k} must be "
                                 f"{_KIND[OVERRIDE_KEYS[k]]}, not {v!r}")
        if "bits" in o and o["bits"] not in OVERRIDE_BITS:
            raise InputError(f"{_prefix(where)}[overrides.\"{name}\"]: bits must be 2-8 or 16, not {o['bits']}")
        if "range" in o and o["range"] not in methods:
            raise InputError(f"{_prefix(where)}[overrides.\"{name}\"]: unknown range {o['range']!r} "
                             f"(choose from {', '.join(methods)})")


def check_override_names(overrides: dict, names: set[str]) -> None:
    """Every override names a layer, a weight or an activation tensor of the model (``names``)."""
    for name in overrides:
        if name not in names:
            near = difflib.get_close_matches(name, sorted(names), 3)
            raise InputError(f"[overrides.\"{name}\"] names no layer, weight or activation tensor of the model"
                             + (f" (near: {', '.join(near)})" if near else ""))
