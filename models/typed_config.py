"""The one strict loader of typed configuration: plain data (parsed YAML, ``--set``) -> frozen dataclasses.

Every configuration of the project -- the model (:mod:`models.config`), a run
(``orchestrator/train/config.py``) and a sweep spec (``orchestrator/spec.py``) -- is a tree of
frozen dataclasses with type annotations, read by :func:`section_from_dict`. One set of rules:

* **Keys**: an unknown key fails and the message lists the allowed ones; a missing key takes the
  field's default; ``null`` is only accepted where the annotation allows ``None``.
* **Coercion** (the same for files and ``--set``): ``int`` accepts only integers (``3.0`` and
  ``"3"`` are refused, ``true`` too); ``float`` accepts integers and floats (``3`` -> ``3.0``,
  never strings: ``orchestrator.yamlio`` reads ``1e-3`` as a float already); ``str`` accepts only
  strings; ``bool`` only ``true``/``false``; ``Literal`` only its values; a ``tuple`` is written as
  a list; a nested dataclass as a mapping. A class may read its own plain form with a
  ``from_config_value(value, path, source)`` classmethod (e.g. a mixer given as a name).
* **Errors**: one :class:`ConfigError` (also a ``ValueError``), one line
  ``<source>: <dotted.key.path>: <what is wrong>; <what is allowed>``, where the source is the
  file (or ``--set key=value``). Checks a section makes itself (``__post_init__``) raise
  ``ValueError`` naming their field; the loader prefixes the source and the section's path.
* **Merging**: :func:`deep_merge` (mappings merge key by key, anything else replaces) and
  :func:`set_path` (one dotted key) are the only ways configurations are combined.

:class:`UserError` is the base of every error caused by what a user wrote or set up (a bad file,
an unreachable service): every command-line entry point catches it, prints one line and exits
with code 2. It lives here because ``models`` may not import ``orchestrator``;
``orchestrator.errors`` re-exports it with the orchestrator's own error classes.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal


class UserError(Exception):
    """A mistake in the user's input or setup. The message is one line: where, what, the fix."""


class ConfigError(UserError, ValueError):
    """A configuration value or file is wrong: ``<source>: <key.path>: <problem>; <allowed>``."""


# --------------------------------------------------------------------------------------------
# small checks
# --------------------------------------------------------------------------------------------


def is_int(value: object) -> bool:
    """An integer that is not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: object) -> bool:
    """A finite int or float that is not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def describe(value: object) -> str:
    """``type value`` for messages, e.g. ``str '576'``."""
    return f"{type(value).__name__} {value!r}"


def where(source: str | None, path: str) -> str:
    """``source: path`` (either may be empty)."""
    return ": ".join(part for part in (source, path) if part)


def fail(source: str | None, path: str, message: str) -> ConfigError:
    """The error for ``path`` in ``source``, as one line."""
    return ConfigError(" ".join(f"{where(source, path)}: {message}".split()))


def type_name(hint: Any) -> str:
    """A readable name of a type annotation (``'a' | 'b'``, ``integer or null``)."""
    origin = typing.get_origin(hint)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(hint))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(type_name(a) for a in typing.get_args(hint))
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false", type(None): "null"}
    if hint in names:
        return names[hint]
    if origin in (tuple, list):
        return "a list"
    if origin in (dict, Mapping) or dataclasses.is_dataclass(hint):
        return "a mapping"
    return getattr(hint, "__name__", str(hint))


# --------------------------------------------------------------------------------------------
# coercion
# --------------------------------------------------------------------------------------------


def coerce(value: Any, hint: Any, path: str, source: str | None) -> Any:
    """``value`` checked against (and converted to) the annotation ``hint`` by the module's rules.

    Raises:
        ConfigError: naming ``source``, ``path`` and the expected type or values.
    """
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None:
            if type(None) in args:
                return None
            raise fail(source, path, f"must not be null; expected {type_name(hint)}")
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(value, arg, path, source)
            except ConfigError:
                continue
        raise fail(source, path, f"expected {type_name(hint)}, got {describe(value)}")
    if value is None:
        raise fail(source, path, f"must not be null; expected {type_name(hint)}")
    if origin is Literal:
        if not any(value == a and type(value) is type(a) for a in args):
            raise fail(source, path, f"{value!r} is not allowed; allowed values: {', '.join(map(str, args))}")
        return value
    if hasattr(hint, "from_config_value"):
        return hint.from_config_value(value, path, source)
    if dataclasses.is_dataclass(hint):
        return value if isinstance(value, hint) else _build(hint, value, path, source)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise fail(source, path, f"expected a list, got {describe(value)}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(coerce(v, args[0], f"{path}[{i}]", source) for i, v in enumerate(value))
        if len(value) != len(args):
            raise fail(source, path, f"expected a list of {len(args)} values, got {len(value)}")
        return tuple(coerce(v, a, f"{path}[{i}]", source) for i, (v, a) in enumerate(zip(value, args)))
    if origin in (dict, Mapping) or hint in (dict, Mapping):
        key_type, value_type = args or (Any, Any)
        if not isinstance(value, Mapping):
            raise fail(source, path, f"expected a mapping, got {describe(value)}")
        return {
            coerce(k, key_type, f"{path}.{k}", source): coerce(v, value_type, f"{path}.{k}", source)
            for k, v in value.items()
        }
    checks = {int: is_int, float: is_number, str: lambda v: isinstance(v, str), bool: lambda v: isinstance(v, bool)}
    if hint in checks:
        if not checks[hint](value):
            raise fail(source, path, f"expected {type_name(hint)}, got {describe(value)}")
        return float(value) if hint is float else value
    raise TypeError(f"no conversion for {hint!r} at {path}")  # pragma: no cover - a programming error


def _build(cls: type, data: Any, path: str, source: str | None) -> Any:
    """``cls`` from the mapping ``data``; structural errors as ConfigError, the section's own
    ``ValueError`` passed up unchanged (the outermost :func:`section_from_dict` prefixes it)."""
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise fail(source, path or "the top level", f"expected a mapping of keys, got {describe(data)}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        dotted = f"{path}.{key}" if path else str(key)
        if key not in names:
            raise fail(source, dotted, f"unknown key; allowed keys: {', '.join(sorted(names))}")
        kwargs[key] = coerce(value, hints[key], dotted, source)
    return cls(**kwargs)


def section_from_dict(cls: type, data: Any, *, source: str | None = None, path: str = "") -> Any:
    """Build the dataclass ``cls`` (and every nested one) from plain ``data``, strictly.

    Args:
        cls: a dataclass with annotated fields.
        data: a mapping (e.g. a YAML section); ``None`` means all defaults.
        source: the file (or ``--set ...``) named in errors.
        path: the dotted key of this section, named in errors.

    Raises:
        ConfigError: an unknown key, a value of the wrong type, or a value the section refuses.
    """
    try:
        return _build(cls, data, path, source)
    except ConfigError:
        raise
    except (TypeError, ValueError) as err:
        message = str(err)  # a check that names its own full key ("sweep.num_trials: ...") is not prefixed
        raise fail(source, "" if message.startswith(f"{path}.") else path, message) from None


# --------------------------------------------------------------------------------------------
# merging and dotted paths
# --------------------------------------------------------------------------------------------


def deep_merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``over`` merged in: mappings merge key by key, any other value replaces.

    Neither argument is modified; the result shares no mutable values with them.
    """
    out = copy.deepcopy(dict(base))
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def set_path(data: Mapping[str, Any], path: str, value: Any, *, source: str | None = None) -> dict[str, Any]:
    """A copy of ``data`` with the dotted ``path`` set to ``value`` (missing sections are created).

    Raises:
        ConfigError: ``path`` is empty or runs through a value that is not a section.
    """
    parts = path.split(".") if isinstance(path, str) else [""]
    if not all(parts):
        raise fail(source, str(path), "expected a dotted key such as pretrain.steps")
    out = copy.deepcopy(dict(data))
    node = out
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            raise fail(source, path, f"{'.'.join(parts[:i + 1])} holds a value ({child!r}), not a section")
        node = child
    node[parts[-1]] = copy.deepcopy(value)
    return out


def get_path(data: Mapping[str, Any], path: str, default: Any = None) -> Any:
    """The value at the dotted ``path`` of nested mappings, or ``default``."""
    node: Any = data
    for part in path.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return default
        node = node[part]
    return node


__all__ = [
    "ConfigError",
    "UserError",
    "coerce",
    "deep_merge",
    "describe",
    "fail",
    "get_path",
    "is_int",
    "is_number",
    "section_from_dict",
    "set_path",
    "type_name",
    "where",
]
