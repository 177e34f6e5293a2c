#!/usr/bin/env bash
# Rewrite constraints.txt from the venv CI's main run built (.venv): the tested set, pinned.
set -euo pipefail
cd "$(dirname "$0")/.."
{
    echo "# The tested set: every dependency at the version CI's main run and the README's commands install"
    echo "# (pip install -c constraints.txt ...). Regenerate after a dependency change with .ci/freeze.sh; CI's"
    echo "# second step (.ci/compat.sh) also proves the newest releases and the transformers floor."
    .venv/bin/python -m pip freeze --exclude-editable | grep -v -E '^(corolla(==| @)|#)' |
        sed -E 's/^torch==([0-9.]+)\+cpu$/torch==\1/'
} > constraints.txt.new
mv constraints.txt.new constraints.txt
