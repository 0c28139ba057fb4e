"""Fault points: named places in build-index and query where a test can kill or pause the process.

The crash tests (tests/test_crash.py) run the real CLI in a process of its own with

    IDIA_FAULT="<point>:<n>:kill"           SIGKILL this process the n-th time <point> is reached
    IDIA_FAULT="<point>:<n>:sleep=<s>"      sleep s seconds there (to make a race happen on purpose)
    IDIA_FAULT="<point>:<n>:wait=<file>"    wait there until <file> exists (at most 10 minutes): the test
                                            lets the process go on once the other side of the race is done

(several, comma-separated). SIGKILL is the real thing: no `finally`, no atexit, no flush; exactly what
`kill -9` or the OOM killer does. Deterministic points make each test hit the moment it means to, which a
timer-based kill from outside cannot promise. Without IDIA_FAULT, `fault_point` costs one dict lookup.

Points (where they sit):
    build.encode.committed    a template's vectors and progress.json were committed (after some batches)
    build.template.indexed    a template's index file was written and progress.json says so
    build.data.published      the finished build directory was renamed to data-<id>, manifest not yet written
    build.manifest.written    manifest.json points at the new data; old data not yet removed
    query.index.opened        the index is open and its data directory locked for reading
    query.encode.committed    one batch of image embeddings was committed to the store
    query.search.chunk        one chunk of images was searched (all of its templates, or one template)
    query.report.staged       the report is complete in its temporary directory, not yet swapped in
"""

from __future__ import annotations

import os
import signal
import time
from collections import Counter

ENV = "IDIA_FAULT"

_hits: Counter[str] = Counter()
_parsed: tuple[str, dict[str, list[tuple[int, str]]]] | None = None


def _asked_faults() -> dict[str, list[tuple[int, str]]]:
    global _parsed
    raw = os.environ.get(ENV, "")
    if _parsed is None or _parsed[0] != raw:
        plan: dict[str, list[tuple[int, str]]] = {}
        for part in filter(None, (p.strip() for p in raw.split(","))):
            try:
                point, n, action = part.split(":", 2)
                plan.setdefault(point, []).append((int(n), action))
            except ValueError:
                raise ValueError(f"{ENV}={raw!r}: {part!r} is not <point>:<n>:<kill|sleep=<s>|wait=<file>>") from None
        _parsed = (raw, plan)
    return _parsed[1]


def fault_point(point: str) -> None:
    """Kill or pause here if IDIA_FAULT asks for it (see the module docstring); otherwise do nothing."""
    plan = _asked_faults()
    if point not in plan:
        return
    _hits[point] += 1
    for n, action in plan[point]:
        if _hits[point] != n:
            continue
        if action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif action.startswith("sleep="):
            time.sleep(float(action.split("=", 1)[1]))
        elif action.startswith("wait="):
            deadline = time.monotonic() + 600
            while not os.path.exists(action.split("=", 1)[1]) and time.monotonic() < deadline:
                time.sleep(0.01)
        else:
            raise ValueError(f"{ENV}: unknown action {action!r} at {point} (kill, sleep=<s> or wait=<file>)")
