"""Shared helpers of the benchmark scripts: models, data, peak-RSS sampling, result files."""
from __future__ import annotations

import json
import os
import platform
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

#: where result files go; ``MOONSHOT_FX_RESULTS`` points elsewhere (the smoke tests do), and then
#: ``render.py`` leaves the README alone
DEFAULT_RESULTS = Path(__file__).resolve().parent / "results"
RESULTS = Path(os.environ.get("MOONSHOT_FX_RESULTS") or DEFAULT_RESULTS).resolve()


def rss_bytes() -> int:
    """Current resident set size of this process."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Context manager sampling RSS every ``interval`` s; ``.peak`` is the maximum seen (bytes)."""

    def __init__(self, interval: float = 0.02):
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(self.interval)

    def __enter__(self) -> "PeakRSS":
        self.start = rss_bytes()
        self.peak = self.start
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


def timed(fn: Callable[[], Any]) -> tuple[Any, float, int]:
    """Run ``fn``; returns (result, wall seconds, peak RSS bytes during the call)."""
    with PeakRSS() as mem:
        t = time.perf_counter()
        out = fn()
        wall = time.perf_counter() - t
    return out, wall, mem.peak


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    return {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "machine": platform.machine()}


def write_json(path: Path, data: Any) -> None:
    """Atomic write: temp file in the same folder, then rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def write_text(path: Path, text: str) -> None:
    """Atomic text write."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


@dataclass(frozen=True)
class MethodSpec:
    """A benchmark row label → sparsify arguments."""

    label: str
    method: str
    options: tuple[tuple[str, Any], ...] = ()

    def kwargs(self) -> dict[str, Any]:
        return dict(self.options)


def parse_method(label: str) -> MethodSpec:
    """``sparsegpt``, ``moonshot-sparsegpt``, ``moonshot-wanda-auto``, ``moonshot-sparsegpt-a0.5``, ``moonshot-wanda-weight``,
    ``moonshot-optima``, ``optima``, ``magnitude``, ``wanda``; a ``+bn`` suffix adds BatchNorm
    re-estimation (``recalibrate_norms=True``), and a label without it passes
    ``recalibrate_norms=False`` (the library's default re-estimates for BatchNorm models, and the
    rows without ``+bn`` are the plain method); a ``+region`` suffix (after ``+bn`` if both) adds
    ``reconstruct="region"``; an ``@group`` / ``@block`` suffix sets
    ``sequential_unit``."""
    extra: dict[str, Any] = {}
    core = label
    if "@" in core:
        core, unit = core.rsplit("@", 1)
        extra["sequential_unit"] = unit
    if core.endswith("+region"):  # region reconstruction after each block (SparsifyConfig.reconstruct)
        core = core[: -len("+region")]
        extra["reconstruct"] = "region"
    if core.endswith("+bn"):  # re-estimate BatchNorm statistics after pruning
        core = core[:-3]
        extra["recalibrate_norms"] = True
    else:
        extra["recalibrate_norms"] = False
    parts = core.split("-")
    if parts[0] != "moonshot":
        return MethodSpec(label, parts[0], tuple(sorted(extra.items())))
    base = parts[1] if len(parts) > 1 else "sparsegpt"
    opts: dict[str, Any] = {"base": base, **extra}
    for p in parts[2:]:
        if p == "auto":
            opts["alpha"] = "auto"
        elif p.startswith("a"):
            opts["alpha"] = float(p[1:])
        elif p in ("token", "row", "kron", "sample", "weight"):
            opts["fisher"] = p
        elif p == "tf":  # the true Fisher: labels drawn from the dense model
            opts["fisher_labels"] = "model"
        elif p.startswith("c") and p[1:].isdigit():  # row clusters: k equal blocks per site
            opts["row_clusters"] = int(p[1:])
    return MethodSpec(label, "moonshot", tuple(sorted(opts.items())))
