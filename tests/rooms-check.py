#!/usr/bin/env python3
"""The house's arrows (docs/design.md): a room may include headers of the rooms below it and its own, never of a
room beside or above it. Prints every include that breaks the rule and exits 1; exits 0 when there is none.

usage: rooms-check.py SOURCE_DIR
"""
import pathlib
import re
import sys

BELOW_RUNTIME = {"core", "kernels", "memory", "comm", "parallel"}
# room -> the rooms it may include besides its own
ALLOWED = {
    "core": set(),
    "kernels": {"core"},
    "memory": {"core", "kernels"},
    "comm": {"core"},
    "parallel": {"core", "kernels", "memory", "comm"},
    "runtime/exec": BELOW_RUNTIME,
    "runtime/model": BELOW_RUNTIME | {"runtime/exec"},
    "runtime/sim": BELOW_RUNTIME | {"runtime/exec", "runtime/model"},
    "runtime/device": BELOW_RUNTIME | {"runtime/exec", "runtime/model"},
    "runtime/train": BELOW_RUNTIME | {"runtime/exec", "runtime/model", "runtime/sim", "runtime/device"},
}
# What sits on top of the library may include all of it.
TOP = {"tools", "python", "examples"}
ROOMS = sorted(ALLOWED, key=len, reverse=True)  # runtime/exec before runtime
INCLUDE = re.compile(r'^\s*#\s*include\s*[<"](?:duplex/)?([a-z_]+(?:/[a-z_]+)?)/[^">]*[">]', re.M)


def room_of(path: str):
    for room in ROOMS:
        if path == room or path.startswith(room + "/"):
            return room
    return None


def violations(root: pathlib.Path):
    out = []
    for f in sorted(root.rglob("*")):
        if f.suffix not in {".hpp", ".cpp", ".cu", ".cuh", ".h"} or not f.is_file():
            continue
        rel = f.relative_to(root).as_posix()
        if rel.split("/")[0] in TOP or rel.startswith(("build", "tests/", ".")):
            continue
        mine = room_of(rel)
        if mine is None:
            continue
        for m in INCLUDE.finditer(f.read_text(errors="replace")):
            target = room_of(m.group(1) + "/")
            if target is None or target == mine or target in ALLOWED[mine]:
                continue
            line = f.read_text(errors="replace")[: m.start()].count("\n") + 1
            out.append(f"{rel}:{line}: {mine} includes {m.group(0).strip()} from {target}, a room it may not use")
    return out


if __name__ == "__main__":
    root = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else ".").resolve()
    bad = violations(root)
    for b in bad:
        print(b)
    print(f"rooms-check: {len(bad)} include(s) against the arrows")
    sys.exit(1 if bad else 0)
