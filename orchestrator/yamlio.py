"""YAML loading with YAML 1.2 numbers: ``1e-3`` and ``1.25e6`` are floats, not strings.

PyYAML follows YAML 1.1, where a float needs a dot and a signed exponent (``1.0e-3``); learning
rates written the way everyone writes them would silently become strings.
"""

from __future__ import annotations

import re
from typing import Any

import yaml


class Loader(yaml.SafeLoader):
    """``yaml.SafeLoader`` with the YAML 1.2 float pattern."""


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
    """Parse YAML text safely with YAML 1.2 floats."""
    return yaml.load(text, Loader=Loader)  # noqa: S506 - a SafeLoader subclass
