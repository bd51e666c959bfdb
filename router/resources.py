"""Finds the files shipped beside the code: the JSON Schemas and the embedded default config.

From a checkout (or an editable install) they sit at the top of the repository; from a wheel
they are installed as data files under `<prefix>/share/event-router/`.
"""

from __future__ import annotations

import sys
from pathlib import Path

_CHECKOUT = Path(__file__).resolve().parent.parent
_INSTALLED = Path(sys.prefix) / "share" / "event-router"


def _first_existing(relative: str) -> Path:
    for base in (_CHECKOUT, _INSTALLED):
        candidate = base / relative
        if candidate.exists():
            return candidate
    return _CHECKOUT / relative


def schemas_dir() -> Path:
    """The directory that holds event.schema.json, config.schema.json and catalog/."""
    return _first_existing("schemas")


def default_config_path() -> Path:
    """The embedded default config: one file target that receives every event."""
    return _first_existing("config/router.yaml")
