#!/bin/sh
# Container entrypoint: everything is decided by `trainlib launch` (see launchers/launch.py);
# `trainlib env` prints the same decisions without starting anything.
set -e
if command -v trainlib >/dev/null 2>&1; then
    exec trainlib launch "$@"
fi
exec python3 -m trainlib.cli launch "$@"
