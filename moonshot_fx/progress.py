"""tqdm progress bars that cost nothing when switched off."""
from __future__ import annotations

from typing import Any, Callable, Iterable


def progress_bar(enabled: bool, desc: str, total: int | None = None) -> Callable[[Iterable[Any]], Iterable[Any]]:
    """A wrapper ``it -> it`` that shows a tqdm bar named ``desc`` when ``enabled`` (tqdm is
    imported only then); disabled, it returns the iterable unchanged."""
    if not enabled:
        return lambda it: it
    from tqdm.auto import tqdm

    return lambda it: tqdm(it, desc=desc, total=total, leave=False)
