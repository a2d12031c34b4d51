"""Locating the shared data directory (real checkpoints and evaluation data).

The data lives outside the repository (``../shared/data`` relative to the project root) and
is never committed.  Set the environment variable ``MOONSHOT_FX_DATA`` to point elsewhere.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["DATA_ENV_VAR", "data_root", "data_file"]

DATA_ENV_VAR = "MOONSHOT_FX_DATA"

# moonshot_fx/data/paths.py -> parents[2] is the repository root that contains moonshot_fx/.
_REPO_ROOT = Path(__file__).resolve().parents[2]


def _candidates() -> list[Path]:
    return [Path.cwd() / ".." / "shared" / "data", _REPO_ROOT / ".." / "shared" / "data"]


def data_root() -> Path:
    """Return the directory holding the shared models and data sets.

    Resolution order: the ``MOONSHOT_FX_DATA`` environment variable if set (it must exist),
    else the first existing of ``$PWD/../shared/data`` and ``<repo root>/../shared/data``.

    Raises:
        FileNotFoundError: if no data directory can be found.
    """
    env = os.environ.get(DATA_ENV_VAR)
    if env:
        p = Path(env).expanduser()
        if not p.is_dir():
            raise FileNotFoundError(
                f"{DATA_ENV_VAR}={env!r} does not name an existing directory; point it at the "
                "shared data directory (the one containing lm/, text/ and vision/)."
            )
        return p.resolve()
    for c in _candidates():
        if c.is_dir():
            return c.resolve()
    tried = ", ".join(str(c) for c in _candidates())
    raise FileNotFoundError(
        f"Could not find the moonshot-fx data directory (tried {tried}). Set the environment "
        f"variable {DATA_ENV_VAR} to the directory containing lm/, text/ and vision/."
    )


def data_file(relpath: str | os.PathLike[str]) -> Path:
    """Return ``data_root() / relpath``, checking that the file exists.

    Raises:
        FileNotFoundError: if the data directory or the file is missing.
    """
    root = data_root()
    p = root / relpath
    if not p.exists():
        raise FileNotFoundError(
            f"Data file {relpath!s} not found under {root}. Check that the shared data set is "
            f"complete, or set {DATA_ENV_VAR} to a directory that contains it."
        )
    return p
