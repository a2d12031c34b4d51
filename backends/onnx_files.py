"""Atomic file writing for the ONNX export: a staging directory moved into place on success, and
the size of a model with its external data."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path


class _Staging:
    """A temporary directory next to ``final`` where files are written under their final names,
    then moved into place by :meth:`commit` (same filesystem, so ``os.replace`` is atomic)."""

    def __init__(self, final: Path) -> None:
        self.final = final
        final.parent.mkdir(parents=True, exist_ok=True)
        self.dir = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
        self.path = self.dir / final.name

    def commit(self) -> None:
        # companions first (external data), the model file last
        for f in sorted(self.dir.iterdir(), key=lambda p: p.name == self.final.name):
            os.replace(f, self.final.parent / f.name)
        self.cleanup()

    def cleanup(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def _atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual mode
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _file_size(model_path: Path) -> int:
    """Size of a model file plus the external-data files it references."""
    import onnx

    size = model_path.stat().st_size
    try:
        m = onnx.load(str(model_path), load_external_data=False)
    except Exception:
        return size
    seen = set()
    for init in m.graph.initializer:
        for entry in init.external_data:
            if entry.key == "location" and entry.value not in seen:
                seen.add(entry.value)
                p = model_path.parent / entry.value
                if p.exists():
                    size += p.stat().st_size
    return size
