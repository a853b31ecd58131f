"""Shared by the benchmark scripts: the machine line and the docs/benchmarks.md section."""

import datetime
import os
import platform
import socket
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def free_port():
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def machine():
    """'2026-11-21 on 2 cores (CPU model), Linux 6.x'."""
    cpu_model = next((l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                      if l.startswith("model name")), platform.processor())
    return (f"{datetime.date.today().isoformat()} on {os.cpu_count()} cores ({cpu_model}), "
            f"{platform.system()} {platform.release()}")


def write_section(marker, title, lines):
    """Replaces the text between <!-- MARKER:BEGIN --> and <!-- MARKER:END --> in
    docs/benchmarks.md, or appends it under `## title`; prints it."""
    begin, end = f"<!-- {marker}:BEGIN", f"<!-- {marker}:END -->"
    section = "\n".join([f"{begin} (written by scripts/bench) -->", *lines, end])
    doc = ROOT / "docs/benchmarks.md"
    text = doc.read_text() if doc.exists() else "# Benchmarks\n\nFigures written by `scripts/bench/*`; each section says how it was run.\n"
    if begin in text:
        head, rest = text.split(begin, 1)
        text = head + section + rest.split(end, 1)[1]
    else:
        text = text.rstrip() + f"\n\n## {title}\n\n" + section + "\n"
    doc.write_text(text)
    print(section)
