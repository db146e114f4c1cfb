"""Progress bars on stderr (tqdm), silent when disabled or when stderr is not wanted."""

from __future__ import annotations

import sys
from typing import Any


class Progress:
    def __init__(self, desc: str, total: int | None = None, initial: int = 0, unit: str = "it",
                 enabled: bool = True, **kw: Any):
        self._bar = None
        if enabled:
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, file=sys.stderr,
                             dynamic_ncols=True, mininterval=0.5, **kw)

    def update(self, n: int = 1, **postfix: Any) -> None:
        if self._bar is not None:
            self._bar.update(n)
            if postfix:
                self._bar.set_postfix(postfix, refresh=False)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
