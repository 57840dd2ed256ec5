"""The model-agnostic conversion engine: declarative tables in, strictly accounted arrays out.

A :class:`MappingTable` is a list of :class:`Rule` (source-key regex -> target path template ->
transform) plus an explicit ignore list (regex + the reason the original never uses those keys).
:func:`convert` applies a table to a checkpoint and checks, before anything is written, that

* every source key is consumed by exactly one rule or explicitly ignored,
* every target parameter is filled,
* every shape (after the transform) and dtype kind matches the model,
* several source keys mapped to one target (shared heads saved under two names) hold equal arrays,

and raises one :class:`ConversionError` naming every offending key otherwise.

Target paths are the NNX state paths joined with "/", e.g. ``layers/3/attn/q_proj/kernel``.
The engine knows nothing about models: the tables live next to it, one module per model.

The same tables run backwards for ``segllm-jax export`` (:meth:`MappingTable.invert`): each
:class:`Invertible` transform carries its inverse, and :meth:`Rule.source_key` rebuilds the source
key from a target path by filling the source regex's named groups. One table, both directions, so an
export can never drift from what the converter reads.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from segllm_jax.errors import ConversionError
from segllm_jax_convert.io import TensorSource

log = logging.getLogger(__name__)

Transform = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class Invertible:
    """A transform that knows its way back: ``forward`` converts (PyTorch -> ours), ``inverse`` exports.

    Why a pair and not two functions in two places: a hand-kept export table would drift from the
    converter's; here the inverse sits in the very entry the converter uses.
    """

    forward: Transform
    inverse: Transform
    name: str

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.forward(x)


identity = Invertible(lambda x: x, lambda x: x, "identity")
# PyTorch ``nn.Linear.weight`` [out, in] <-> JAX kernel [in, out]
linear_kernel = Invertible(lambda x: x.T, lambda x: x.T, "linear_kernel")
# PyTorch ``nn.Conv2d.weight`` [O, I, kh, kw] <-> JAX NHWC kernel [kh, kw, I, O]
conv_kernel = Invertible(lambda x: x.transpose(2, 3, 1, 0), lambda x: x.transpose(3, 2, 0, 1), "conv_kernel")


def _group_end(pattern: str, start: int) -> int:
    """Index just past the ``)`` closing the group that opens at ``pattern[start]``."""
    depth, i = 0, start
    while i < len(pattern):
        c = pattern[i]
        if c == "\\":
            i += 2
            continue
        depth += (c == "(") - (c == ")")
        i += 1
        if depth == 0:
            return i
    raise ValueError(f"unbalanced group in {pattern!r}")


def fill_pattern(pattern: str, values: Mapping[str, str]) -> str:
    """The one key a table regex names for ``values`` of its named groups.

    Table regexes use a small, deliberate subset: escaped literals, named groups (filled from
    ``values``), negative look-aheads (guards: zero width, dropped) and optional non-capturing
    groups ``(?:...)?``, which export writes in full (the canonical, longer name the release uses).
    Anything else raises ``ValueError``: such a rule cannot be exported and must be rewritten.
    """
    out, i = [], 0
    while i < len(pattern):
        c = pattern[i]
        if c == "\\":
            out.append(pattern[i + 1])
            i += 2
        elif pattern.startswith("(?P<", i):
            name = pattern[i + 4:pattern.index(">", i)]
            out.append(values[name])
            i = _group_end(pattern, i)
        elif pattern.startswith("(?!", i):
            i = _group_end(pattern, i)
        elif pattern.startswith("(?:", i):
            end = _group_end(pattern, i)
            out.append(fill_pattern(pattern[i + 3:end - 1], values))
            i = end + (pattern[end:end + 1] == "?")
        elif c in ".^$*+?{}[]|()":
            raise ValueError(f"pattern {pattern!r} is not invertible at {pattern[i:]!r}")
        else:
            out.append(c)
            i += 1
    return "".join(out)


@dataclass(frozen=True)
class Rule:
    """``source`` is a regex matched against the whole key; its named groups fill ``target``."""

    source: str
    target: str
    transform: Transform = identity

    def match(self, key: str) -> str | None:
        m = re.fullmatch(self.source, key)
        return self.target.format(**m.groupdict()) if m else None

    def source_key(self, target: str) -> str | None:
        """The source key this rule maps to ``target`` (None if ``target`` is not this rule's).

        The result is checked by running the rule forwards: it must route back to ``target``.
        """
        parts = re.split(r"\{(\w+)\}", self.target)
        template = "".join(re.escape(p) if i % 2 == 0 else f"(?P<{p}>[^/]+)" for i, p in enumerate(parts))
        m = re.fullmatch(template, target)
        if m is None:
            return None
        try:
            key = fill_pattern(self.source, m.groupdict())
        except (KeyError, ValueError):
            return None
        return key if self.match(key) == target else None


@dataclass(frozen=True)
class MappingTable:
    """One model's mapping: rules, plus source keys deliberately left unused (regex, reason)."""

    name: str
    rules: tuple[Rule, ...]
    ignore: tuple[tuple[str, str], ...] = field(default=())

    def under(self, source_prefix: str, target_prefix: str) -> "MappingTable":
        """The same table for a sub-model saved under ``source_prefix`` and living at ``target_prefix``."""
        sp, tp = re.escape(source_prefix), target_prefix
        return MappingTable(
            self.name,
            tuple(Rule(sp + r.source, tp + r.target, r.transform) for r in self.rules),
            tuple((sp + pattern, reason) for pattern, reason in self.ignore),
        )

    def __add__(self, other: "MappingTable") -> "MappingTable":
        return MappingTable(f"{self.name}+{other.name}", self.rules + other.rules, self.ignore + other.ignore)

    def invert(self, arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Our arrays (target paths) -> source keys, each through its rule's inverse transform.

        A target filled from two aliased keys (shared heads saved under two names) yields both.
        Raises one :class:`ConversionError` naming every path no rule can write back.
        """
        out: dict[str, np.ndarray] = {}
        unmapped, one_way = [], []
        for target, array in arrays.items():
            hits = [(key, r.transform) for r in self.rules if (key := r.source_key(target)) is not None]
            if not hits:
                unmapped.append(target)
            for key, transform in hits:
                if not isinstance(transform, Invertible):
                    one_way.append(f"{target} ({key})")
                    continue
                out[key] = np.ascontiguousarray(transform.inverse(np.asarray(array)))
        sections = []
        if unmapped:
            sections.append(_bullets("parameters no rule writes back", sorted(unmapped)))
        if one_way:
            sections.append(_bullets("rules whose transform has no inverse", sorted(one_way)))
        if sections:
            raise ConversionError(f"cannot export through table {self.name!r}:\n" + "\n".join(sections))
        return out

    def route(self, key: str) -> tuple[str | None, Transform | None, str | None]:
        """(target, transform, None) for a mapped key, (None, None, reason) for an ignored one."""
        hits = [(t, r.transform) for r in self.rules if (t := r.match(key)) is not None]
        if len(hits) > 1:
            raise ConversionError(f"table {self.name}: key {key!r} matches {len(hits)} rules; "
                                  "make the patterns exclusive.")
        if hits:
            return hits[0][0], hits[0][1], None
        for pattern, reason in self.ignore:
            if re.fullmatch(pattern, key):
                return None, None, reason
        return None, None, None


def flat_targets(module_or_state) -> dict[str, jax.ShapeDtypeStruct]:
    """'/'-joined path -> shape/dtype of every ``nnx.Param`` of a (possibly abstract) module."""
    state = module_or_state if isinstance(module_or_state, nnx.State) else nnx.state(module_or_state, nnx.Param)
    out = {}
    for path, var in nnx.to_flat_state(state):
        value = var.get_value() if hasattr(var, "get_value") else var.value
        out["/".join(map(str, path))] = jax.ShapeDtypeStruct(value.shape, value.dtype)
    return out


def _kind(dtype: np.dtype) -> str:
    return "float" if np.issubdtype(dtype, np.floating) or dtype.name == "bfloat16" else dtype.kind


def _bullets(title: str, lines: Sequence[str]) -> str:
    return f"{title} ({len(lines)}):\n" + "\n".join(f"  - {line}" for line in lines)


def convert(source: TensorSource, table: MappingTable, targets: Mapping[str, jax.ShapeDtypeStruct], *,
            subtree: str | None = None, progress: bool = True) -> dict[str, np.ndarray]:
    """Arrays for every target path, cast to the target dtype; raises ConversionError listing all problems.

    ``subtree`` (a target path prefix such as ``"backbone/"``) converts one part of a model into a
    module built on its own: keys routed elsewhere count as consumed, and the prefix is stripped.
    """
    routed: dict[str, list[tuple[str, Transform]]] = {}
    unknown, ignored = [], []
    for key in source:
        target, transform, reason = table.route(key)
        if target is not None and subtree is not None:
            if not target.startswith(subtree):
                ignored.append(key)
                continue
            target = target[len(subtree):]
        if target is not None:
            routed.setdefault(target, []).append((key, transform))
        elif reason is not None:
            ignored.append(key)
        else:
            unknown.append(key)
    not_in_model = sorted(t for t in routed if t not in targets)
    missing = sorted(t for t in targets if t not in routed)

    # Shapes and dtypes are checked on metadata before any tensor is read: a wrong checkpoint fails fast.
    problems: list[str] = []
    for target, sources in sorted(routed.items()):
        if target not in targets:
            continue
        want = targets[target]
        for key, transform in sources:
            info = source[key]
            # transforms only move axes or slice, so a zero-memory stand-in gives the result shape
            shape = transform(np.broadcast_to(np.zeros((), np.bool_), info.shape)).shape
            if tuple(shape) != tuple(want.shape):
                problems.append(f"{key}: shape {info.shape} -> {tuple(shape)} after transform, "
                                f"but {target} needs {tuple(want.shape)}")
            if _kind(info.dtype) != _kind(np.dtype(want.dtype)):
                problems.append(f"{key}: dtype {info.dtype} cannot fill {target} of dtype {np.dtype(want.dtype)}")

    sections = []
    if unknown:
        sections.append(_bullets("keys in the checkpoint that no rule maps and no ignore entry covers",
                                 sorted(unknown)))
    if not_in_model:
        sections.append(_bullets("mapped keys whose target does not exist in the model",
                                 [f"{routed[t][0][0]} -> {t}" for t in not_in_model]))
    if missing:
        sections.append(_bullets("model parameters that no checkpoint key fills", missing))
    if problems:
        sections.append(_bullets("shape/dtype mismatches", problems))
    if sections:
        raise ConversionError(f"checkpoint does not match table {table.name!r}; nothing was written.\n"
                              + "\n".join(sections))

    out: dict[str, np.ndarray] = {}
    conflicts = []
    bar = tqdm(total=len(routed), desc=f"converting {table.name}", unit="tensor", disable=not progress)
    for target, sources in routed.items():
        want = np.dtype(targets[target].dtype)
        arrays = [np.ascontiguousarray(transform(source.load(key))) for key, transform in sources]
        for (key, _), array in zip(sources[1:], arrays[1:], strict=True):
            if not np.array_equal(arrays[0], array):
                conflicts.append(f"{sources[0][0]} and {key} both fill {target} but differ")
        out[target] = arrays[0].astype(want)
        bar.update(1)
    bar.close()
    if conflicts:
        raise ConversionError(_bullets("conflicting aliases; nothing was written", conflicts))
    log.info("table %s: %d tensors converted, %d ignored", table.name, len(out), len(ignored))
    return out


def load_arrays(module: nnx.Module, arrays: Mapping[str, np.ndarray]) -> nnx.Module:
    """Puts converted arrays into ``module``'s parameters (paths as produced by :func:`convert`)."""
    state = nnx.state(module, nnx.Param)
    flat = nnx.to_flat_state(state)
    paths = {"/".join(map(str, p)) for p, _ in flat}
    extra, absent = sorted(set(arrays) - paths), sorted(paths - set(arrays))
    if extra or absent:
        raise ConversionError("arrays do not match the model:\n" + "\n".join(
            s for s in (_bullets("unknown paths", extra) if extra else "",
                        _bullets("missing paths", absent) if absent else "") if s))
    for path, var in flat:
        var.set_value(jax.numpy.asarray(arrays["/".join(map(str, path))]))
    nnx.update(module, nnx.from_flat_state(flat))
    return module
