"""No process a test starts outlives it: on Ctrl-C, on a failure and at the end of the run, every descendant of the
pytest process is killed (a pytest plugin, loaded by ``conftest.py``; ``-p tests.processes`` elsewhere).

Ctrl-C reaches the whole foreground process group, but a child may ignore it (a pool worker, a server), hold a
pipe pytest waits on, or be left behind when pytest kills only its direct child: the first Ctrl-C therefore kills
every descendant before pytest handles the interrupt.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

# multiprocessing's helper servers live for the whole run and are started again when needed
HELPERS = (b"multiprocessing.forkserver", b"multiprocessing.resource_tracker")


def descendants(pid: int | None = None) -> list[int]:
    """Every living descendant of ``pid`` (default: this process), parents before their children."""
    pid = os.getpid() if pid is None else pid
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, queue = [], [pid]
    while queue:
        for child in children.get(queue.pop(0), []):
            found.append(child)
            queue.append(child)
    return found


def _is_helper(pid: int) -> bool:
    try:
        return any(h in Path(f"/proc/{pid}/cmdline").read_bytes() for h in HELPERS)
    except OSError:
        return False


def kill(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def pytest_configure(config) -> None:
    previous = signal.getsignal(signal.SIGINT)

    def interrupted(signum, frame):
        kill(descendants())
        if callable(previous):
            previous(signum, frame)
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, interrupted)


@pytest.fixture(autouse=True)
def _no_process_outlives_its_test():
    before = set(descendants())
    yield
    kill([pid for pid in descendants() if pid not in before and not _is_helper(pid)])


def pytest_sessionfinish(session, exitstatus) -> None:
    kill(descendants())
