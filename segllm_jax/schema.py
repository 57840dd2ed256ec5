"""Config dataclasses from untrusted JSON, checked field by field.

Why: a checkpoint's ``config.json`` may be hand-edited, truncated or from another tool. Passing
its dict straight to a dataclass turns a string width into a JAX shape error three modules later
(a traceback). Here every field is checked against the dataclass's type hints first, and any
violation is one :class:`~segllm_jax.errors.CheckpointError` naming the file and the field.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Mapping

from segllm_jax.errors import CheckpointError, ConfigError


def _type_name(t: Any) -> str:
    return getattr(t, "__name__", None) or str(t).replace("typing.", "")


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """``value`` as type ``hint`` (JSON lists become tuples, ints are accepted as floats), or raises."""
    origin = typing.get_origin(hint)
    if origin in (types.UnionType, typing.Union):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, where)
            except CheckpointError:
                pass
        raise CheckpointError(f"{where} must be {' or '.join(map(_type_name, options))}, not {value!r:.60}.")
    if origin is tuple:
        args = typing.get_args(hint)
        if not isinstance(value, (list, tuple)):
            raise CheckpointError(f"{where} must be a list, not {type(value).__name__}.")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise CheckpointError(f"{where} must have {len(args)} entries, not {len(value)}.")
        return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True)))
    if dataclasses.is_dataclass(hint):
        return build(hint, value, where)
    if hint is bool:
        ok = isinstance(value, bool)
    elif hint is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif hint is str:
        ok = isinstance(value, str)
    else:  # a type this checker does not know: let the dataclass judge it
        ok = True
    if not ok:
        raise CheckpointError(f"{where} must be {_type_name(hint)}, not {type(value).__name__} {value!r:.60}.")
    return value


def build(cls: type, fields: Any, where: str, *, ignore_unknown: bool = False) -> Any:
    """An instance of the dataclass ``cls`` from a JSON object, every field type-checked.

    ``where`` names the place for messages (``"conv/config.json: config.llm"``). ``ignore_unknown``
    drops fields the dataclass does not have (for configs that have shed fields over versions).
    """
    if not isinstance(fields, Mapping):
        raise CheckpointError(f"{where} must be a JSON object, not {type(fields).__name__}.")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(fields) - set(known))
    if unknown and not ignore_unknown:
        raise CheckpointError(f"{where} has unknown fields: {', '.join(map(str, unknown))}.")
    missing = sorted(name for name, f in known.items() if name not in fields
                     and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)
    if missing:
        raise CheckpointError(f"{where} lacks the fields: {', '.join(missing)}.")
    values = {name: _coerce(fields[name], hints[name], f"{where}.{name}") for name in known if name in fields}
    try:
        return cls(**values)
    except ConfigError as e:
        raise CheckpointError(f"{where}: {e}") from None
