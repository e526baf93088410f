"""Benchmark results as Markdown sections of a documentation page, rewritten by the command that measures them.

A page (``docs/benchmarks/networks.md``) holds prose written by hand and sections written by commands. A section
is delimited by HTML comments naming its key; a run replaces its own section (same key: same measurement
setting) and leaves everything else as it is, so the page always shows the latest figures of each setting and
its history is in git. Each section states the command that wrote it, the date and the machine.
"""

from __future__ import annotations

import datetime
import os
import platform
import re
import shlex
from pathlib import Path

import torch

from ...preprocessing.io import atomic_path

__all__ = ["machine", "markdown_table", "write_section", "command_line"]


def machine(device: str = "cpu") -> str:
    """``AMD EPYC 7B13, 2 cores, torch 2.13.0`` (or the GPU's name): what the figures were measured on."""
    if device.startswith("cuda") and torch.cuda.is_available():
        where = torch.cuda.get_device_name(torch.device(device))
    else:
        where = platform.processor() or platform.machine()
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    where = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
        where = f"{where}, {len(os.sched_getaffinity(0))} cores"
    return f"{where}, torch {torch.__version__}"


def command_line(program: str, argv: list[str], drop: tuple[str, ...] = ("--markdown",)) -> str:
    """The command as a reader reruns it, without the options that only say where results go."""
    words, skip = [], False
    for word in argv:
        if skip:
            skip = False
            continue
        if word in drop:
            skip = True
            continue
        if any(word.startswith(f"{d}=") for d in drop):
            continue
        words.append(shlex.quote(word))
    return " ".join([program, *words])


def markdown_table(header: list[str], rows: list[list[str]], align: str | None = None) -> str:
    """``align``: one character per column, ``l`` or ``r`` (default: first left, the rest right)."""
    align = align or "l" + "r" * (len(header) - 1)
    rule = ["---" if a == "l" else "---:" for a in align]
    return "\n".join("| " + " | ".join(cells) + " |" for cells in [header, rule, *rows])


def write_section(page: str | os.PathLike, key: str, title: str, command: str, body: str,
                  page_title: str = "Benchmarks", device: str = "cpu") -> Path:
    """Put ``body`` under ``### title`` into ``page``'s section ``key`` (replacing it, or appended), atomically;
    the section is stamped with the command, the date and the machine (``device``: what the figures ran on)."""
    page = Path(page)
    begin, end = f"<!-- section: {key} -->", f"<!-- end of section: {key} -->"
    stamp = f"`{command}`  \n{datetime.date.today().isoformat()}, {machine(device)}"
    section = f"{begin}\n### {title}\n\n{stamp}\n\n{body.strip()}\n{end}"
    text = page.read_text() if page.is_file() else f"# {page_title}\n"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: section, text)
    else:
        text = text.rstrip("\n") + f"\n\n{section}\n"
    page.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(page) as tmp:
        Path(tmp).write_text(text if text.endswith("\n") else text + "\n")
    return page
