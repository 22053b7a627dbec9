#!/usr/bin/env bash
# Runs a command that must be refused: passes when it exits with CODE and its standard error matches REGEX
# (the message names the bad flag), fails otherwise, printing what came out.
# usage: expect-error.sh CODE REGEX command [args...]
code=$1 regex=$2
shift 2
err=$("$@" 2>&1 >/dev/null)
rc=$?
echo "$err"
if [ "$rc" -ne "$code" ]; then echo "expect-error: exit code $rc, wanted $code"; exit 1; fi
if ! grep -Eq -- "$regex" <<<"$err"; then echo "expect-error: stderr does not match /$regex/"; exit 1; fi
