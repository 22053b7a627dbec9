#!/usr/bin/env python3
"""No source file over 600 lines outside tests/: a file that grows past it is split by concern (docs/design.md).
Prints each file over the limit and exits 1; exits 0 when there is none.

usage: size-check.py SOURCE_DIR [LIMIT]
"""
import pathlib
import sys

SOURCES = {".cpp", ".hpp", ".cu", ".cuh", ".h", ".py"}
ROOTS = ["core", "kernels", "comm", "memory", "parallel", "runtime", "tools", "python", "examples", "scripts"]


def too_long(root: pathlib.Path, limit: int):
    out = []
    for top in ROOTS:
        for f in sorted((root / top).rglob("*")):
            if f.is_file() and (f.suffix in SOURCES or (top == "scripts" and not f.suffix)):
                n = f.read_text(errors="replace").count("\n")
                if n > limit:
                    out.append((n, f.relative_to(root).as_posix()))
    return out


if __name__ == "__main__":
    root = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else ".").resolve()
    limit = int(sys.argv[2]) if len(sys.argv) > 2 else 600
    bad = too_long(root, limit)
    for n, f in bad:
        print(f"{f}: {n} lines (limit {limit})")
    print(f"size-check: {len(bad)} source file(s) over {limit} lines")
    sys.exit(1 if bad else 0)
