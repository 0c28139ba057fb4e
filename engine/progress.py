"""Progress reporting: long loops call `progress(stage, done, total)` instead of printing.

The CLI turns these calls into progress bars; library users may pass any callable or nothing.
"""

from __future__ import annotations

from typing import Callable

Progress = Callable[[str, int, int], None]


def no_progress(stage: str, done: int, total: int) -> None:
    """The default callback: report nothing."""
