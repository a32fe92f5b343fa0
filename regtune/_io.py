"""Reading YAML as people write it, and atomic writes: a results file is written whole under a temporary name, then
renamed over the old one.

A crash, a kill or a full disk mid-write leaves the previous file (or none), never a truncated one. The temporary
name is unique per writer, so processes writing the same file at once (the shards of a grid writing its split
manifests or its report) each replace it whole: the last rename wins, no one reads a mix.
"""

from __future__ import annotations

import json
import os
import re
import secrets
from pathlib import Path
from typing import Any

import yaml

__all__ = ["atomic_write_bytes", "atomic_write_json", "atomic_write_text", "load_yaml"]


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, reading ``1e-3`` as the number YAML 1.2 (and everyone typing it) means: PyYAML follows
    YAML 1.1, whose floats need a dot (``1.0e-3``), and would hand the string ``"1e-3"`` to a learning rate."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def load_yaml(text: str) -> Any:
    """Safe YAML (no object construction) with YAML 1.2's exponent floats: ``load_yaml("1e-3") == 0.001``."""
    return yaml.load(text, Loader=_Loader)


def _atomic_write(path: str | Path, data: str | bytes) -> Path:
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")  # umask's mode, unlike mkstemp
    try:
        with open(tmp, "xb") if isinstance(data, bytes) else open(tmp, "x", newline="") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (a unique ``<path>.<random>.tmp`` beside it, then `os.replace`)."""
    return _atomic_write(path, text)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """`atomic_write_text` for binary content (a PNG, a serialised tensor)."""
    return _atomic_write(path, data)


def atomic_write_json(path: str | Path, payload: Any) -> Path:
    """`atomic_write_text` of ``payload`` as indented JSON."""
    return atomic_write_text(path, json.dumps(payload, indent=2))
