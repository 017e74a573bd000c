"""Reading configuration YAML: files and ``--set key.path=value`` strings, strictly.

* YAML 1.2 numbers: PyYAML follows YAML 1.1, where a float needs a dot and a signed exponent
  (``1.0e-3``); learning rates written the way everyone writes them (``1e-3``) would silently
  become strings. :class:`Loader` reads them as floats.
* A key given twice in one mapping is an error (PyYAML silently keeps the last one).
* A missing, unreadable or binary file, bad YAML, or a top level that is not a mapping is one
  :class:`~models.typed_config.ConfigError` line naming the file.

The typed side (types, defaults, merging, dotted paths) is :mod:`models.typed_config`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

from models.typed_config import ConfigError, UserError, set_path


class Loader(yaml.SafeLoader):
    """``yaml.SafeLoader`` with the YAML 1.2 float pattern that refuses duplicate keys."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, Any] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                duplicate = key in seen
            except TypeError:  # an unhashable key: PyYAML's own error follows
                continue
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping", node.start_mark,
                    f"found the key {key!r} twice (first on line {seen[key].line + 1})", key_node.start_mark,
                )
            seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def load_yaml(text: str) -> Any:
    """Parse YAML text safely with YAML 1.2 floats; a duplicate key raises ``yaml.YAMLError``."""
    return yaml.load(text, Loader=Loader)  # noqa: S506 - a SafeLoader subclass


def _yaml_problem(err: yaml.YAMLError) -> str:
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or str(err)
    at = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
    return " ".join(f"{problem}{at}".split())[:300]


def read_yaml_mapping(path: str | Path, *, what: str = "config file", hint: str = "") -> dict[str, Any]:
    """The top-level mapping of the YAML file ``path`` (an empty file is ``{}``).

    Raises:
        ConfigError: one line naming the file: missing, unreadable, not UTF-8 text, not valid
            YAML (duplicate keys included), or not a mapping at the top.
    """
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such {what}{hint}") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a folder, not a {what}") from None
    except OSError as err:
        raise ConfigError(f"{path}: cannot read the {what} ({err.strerror})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not a text file (byte {err.start} is not UTF-8); give a YAML {what}") from None
    try:
        data = load_yaml(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {_yaml_problem(err)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top, got {type(data).__name__}")
    return data


def parse_set(text: str, *, example: str = "pretrain.steps=100") -> tuple[str, Any]:
    """``key.path=value`` (a ``--set``) -> ``("key.path", value)``; the value is YAML (``3``,
    ``1e-3``, ``true``, ``[a, b]``, ``{values: [1, 2]}``, ``null``), empty means ``""``.

    Raises:
        ConfigError: no ``=``, an empty key, or a value that is not valid YAML.
    """
    key, sep, raw = str(text).partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {text!r}: expected key.path=value, e.g. {example}")
    try:
        value = load_yaml(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"--set {text!r}: the value is not valid YAML: {_yaml_problem(err)}") from None
    return key.strip(), value


def apply_sets(data: dict[str, Any], overrides: Sequence[str], *, example: str = "pretrain.steps=100",
               setter: Callable[..., dict[str, Any]] = set_path) -> dict[str, Any]:
    """``data`` with each ``--set key.path=value`` applied in order (``setter``: the dotted-path setter)."""
    for text in overrides:
        key, value = parse_set(text, example=example)
        data = setter(data, key, value, source=f"--set {text}")
    return data


def blame_set(err: UserError, source: str, overrides: Sequence[str]) -> UserError:
    """``err`` (about ``source``) named after the ``--set`` that wrote its key, when one did.

    ``spec.yaml: sweep.num_trials: must be >= 1`` after ``--set sweep.num_trials=0`` becomes
    ``--set sweep.num_trials=0: sweep.num_trials: must be >= 1`` (also ``spec.yaml:
    resources.workers=9: ...`` from the preflight); an error about a key no ``--set`` touched
    keeps naming the file. The error keeps its class.
    """
    message = str(err)
    if not message.startswith(f"{source}: "):
        return err
    rest = message[len(source) + 2:]
    key = rest.split(": ", 1)[0].split("=", 1)[0]
    for text in reversed(overrides):
        written = str(text).partition("=")[0].strip()
        inside = key == written or key.startswith((f"{written}.", f"{written}["))
        above = written.startswith(f"{key}.") and written[len(key) + 1:] in rest
        if inside or above:
            return type(err)(f"--set {text}: {rest}")
    return err
