#!/usr/bin/env bash
# Runs a command that writes a JSON file, then checks a Python expression over its contents (j), so a CLI test
# passes on the numbers it produced, not on a banner printed whatever they are. A FILE ending in .csv is read
# as a list of rows (dicts keyed by the header, numbers converted).
# usage: json-check.sh FILE EXPRESSION command [args...]
set -uo pipefail
file=$1 expr=$2
shift 2
rm -f "$file"
"$@" || { echo "json-check: the command failed ($?)"; exit 1; }
python3 - "$file" "$expr" <<'PY'
import csv, json, math, sys
path, expr = sys.argv[1], sys.argv[2]


def number(text):
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            return text


if path.endswith(".csv"):
    j = [{k: number(v) for k, v in row.items()} for row in csv.DictReader(open(path))]
else:
    j = json.load(open(path))
ok = eval(expr, {"math": math, "j": j})
print(f"json-check: {expr} -> {ok}")
sys.exit(0 if ok else 1)
PY
