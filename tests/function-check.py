#!/usr/bin/env python3
"""No function over 100 lines outside tests/ (C++, CUDA and Python): a function that grows past it is split by
concern, into named steps (docs/design.md). Prints each one over the limit with its file and first line and exits
1; exits 0 when there is none.

C++: a function is a braced block opened at namespace or class scope (not inside another function) whose head —
the text since the previous ';', '{' or '}' at that scope — has a parameter list and is not a namespace, class,
struct, union, enum or initializer. Lambdas and local classes count toward the function that holds them.
Comments, string and character literals and preprocessor lines are skipped. Python: every def, by its ast span.

usage: function-check.py SOURCE_DIR [LIMIT]
"""
import ast
import pathlib
import re
import sys

ROOTS = ["core", "kernels", "comm", "memory", "parallel", "runtime", "tools", "python", "examples"]
CXX = {".cpp", ".hpp", ".cu", ".cuh", ".h"}
SCOPE = re.compile(r"^\s*(template\s*<.*>\s*)?(namespace|class|struct|union|enum)\b|extern\s+\"C\"", re.S)


def code_of(text: str) -> str:
    """The text with comments and literals blanked (newlines kept, so line numbers hold)."""
    out, i, n = [], 0, len(text)
    while i < n:
        c = text[i]
        if text.startswith("//", i):
            j = text.find("\n", i)
            i = n if j < 0 else j
        elif text.startswith("/*", i):
            j = text.find("*/", i + 2)
            j = n if j < 0 else j + 2
            out.append("\n" * text.count("\n", i, j))
            i = j
        elif c == 'R' and text.startswith('R"', i):
            m = re.match(r'R"([^(]*)\(', text[i:])
            end = text.find(")" + m.group(1) + '"', i) if m else -1
            end = n if end < 0 else end + len(m.group(1)) + 2
            out.append('""' + "\n" * text.count("\n", i, end))
            i = end
        elif c in "\"'":
            j = i + 1
            while j < n and text[j] != c:
                j += 2 if text[j] == "\\" else 1
            out.append(c + c)
            i = j + 1
        else:
            out.append(c)
            i += 1
    return "".join(out)


def without_directives(code: str) -> str:
    """Preprocessor lines (with their continuations, as in a multi-line macro) blanked."""
    out, directive = [], False
    for line in code.split("\n"):
        directive = directive or line.lstrip().startswith("#")
        out.append("" if directive else line)
        directive = directive and line.rstrip().endswith("\\")
    return "\n".join(out)


def cxx_functions(text: str):
    """(name, first line, lines) of every function body at namespace or class scope."""
    code = without_directives(code_of(text))
    found, stack, head, line = [], [], [], 1  # stack: (kind, start line, name)
    for c in code:
        if c == "\n":
            line += 1
        in_function = any(k == "function" for k, _, _ in stack)
        if c == "{":
            h = "".join(head).strip()
            if in_function:
                kind = "block"
            elif SCOPE.search(h) or "(" not in h or h.endswith("=") or h.endswith(","):
                kind = "scope"
            else:
                kind = "function"
            name = re.findall(r"([~\w:]+)\s*\(", h)
            stack.append((kind, line, name[0] if name else "?"))
            head = []
        elif c == "}":
            if stack:
                kind, start, name = stack.pop()
                if kind == "function":
                    found.append((name, start, line - start + 1))
            head = []
        elif c == ";":
            head = []
        else:
            head.append(c)
    return found


def python_functions(text: str):
    out = []
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            out.append((node.name, node.lineno, node.end_lineno - node.lineno + 1))
    return out


def too_long(root: pathlib.Path, limit: int):
    bad = []
    for top in ROOTS:
        for f in sorted((root / top).rglob("*")):
            if not f.is_file() or (f.suffix not in CXX and f.suffix != ".py"):
                continue
            text = f.read_text(errors="replace")
            funcs = python_functions(text) if f.suffix == ".py" else cxx_functions(text)
            for name, start, n in funcs:
                if n > limit:
                    bad.append((n, f"{f.relative_to(root).as_posix()}:{start}", name))
    return sorted(bad, reverse=True)


if __name__ == "__main__":
    root = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else ".").resolve()
    limit = int(sys.argv[2]) if len(sys.argv) > 2 else 100
    bad = too_long(root, limit)
    for n, where, name in bad:
        print(f"{where}: {name} is {n} lines (limit {limit})")
    print(f"function-check: {len(bad)} function(s) over {limit} lines")
    sys.exit(1 if bad else 0)
