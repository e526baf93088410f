"""Fault injection for the reliability tests: a handler that SIGKILLs its own training process at one chosen point.

A bundle run takes it through its config (``"kill": {"_target_": "tests.faults.KillAt", ...}`` added to the
trainer's handlers), so the run is the user's ``python -m monai.bundle run`` in every other respect. Points count
absolute training progress (the trainer's epoch and iteration survive a resume), so one sequence of points can be
walked by a chain of runs, each resuming where the one before was killed.
"""

from __future__ import annotations

import io
import os
import signal
import sys

import torch
from ignite.engine import Engine, Events

CHECKPOINT_PHASES = ("writing", "renaming", "cleaning")


def die() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


class KillAt:
    """``point`` is one of
    ``["iteration", n]``: after the trainer's global iteration n;
    ``["validation", epoch]``: after the first batch of that epoch's validation;
    ``["checkpoint", epoch, phase]``: inside the write of that epoch's training checkpoint: ``writing`` (half its
    bytes on disk), ``renaming`` (complete, not yet renamed into place), ``cleaning`` (renamed, the previous one
    not yet deleted);
    ``["best", epoch]``: inside the write of ``model.pt`` after that epoch's validation (half its bytes on disk).
    """

    def __init__(self, point, evaluator: Engine | None = None):
        self.point, self.evaluator = list(point), evaluator

    def attach(self, engine: Engine) -> None:
        kind = self.point[0]
        if kind == "iteration":
            engine.add_event_handler(Events.ITERATION_COMPLETED(once=int(self.point[1])), lambda _: die())
        elif kind == "validation":
            def arm(evaluator: Engine) -> None:
                if evaluator.state.epoch == int(self.point[1]):
                    die()
            self.evaluator.add_event_handler(Events.ITERATION_COMPLETED(once=1), arm)  # every validation run
        elif kind in ("checkpoint", "best"):
            self._patch_writes(engine)
        else:
            raise ValueError(f"unknown kill point {self.point}")

    def _patch_writes(self, engine: Engine) -> None:
        kind, epoch = self.point[0], int(self.point[1])
        phase = self.point[2] if kind == "checkpoint" else "writing"
        real_save, real_replace = torch.save, os.replace
        is_target = (lambda name: f"epoch={epoch}.pt" in name) if kind == "checkpoint" else (
            lambda name: "model.pt" in name and engine.state.epoch == epoch)

        def save(obj, f, *args, **kwargs):
            name = getattr(f, "name", str(f))
            if phase == "writing" and is_target(str(name)):
                buffer = io.BytesIO()
                real_save(obj, buffer, *args, **kwargs)
                data = buffer.getvalue()
                f.write(data[: len(data) // 2])
                f.flush()
                os.fsync(f.fileno())
                die()
            return real_save(obj, f, *args, **kwargs)

        def replace(src, dst, *args, **kwargs):
            if phase == "renaming" and is_target(str(dst)):
                die()
            real_replace(src, dst, *args, **kwargs)
            if phase == "cleaning" and is_target(str(dst)):
                die()

        torch.save, os.replace = save, replace
