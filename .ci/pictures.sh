#!/usr/bin/env bash
# Refresh the README's pictures from the tests that take them:
#   docs/monitor.png     the monitor page over a live loopback swarm (tests/swarm/test_monitor_swarm.py)
#   docs/tray-menu.png   the tray menu under Xvfb + trayer (tests/agent/test_agent_tray_gui.py)
# The test suite itself writes only to temporary folders: these tests save their screenshots to
# $COROLLA_MONITOR_SCREENSHOT and $COROLLA_TRAY_SCREENSHOT, else to their temp dir. This script
# points both into docs/ and runs just those two test files (a few minutes on 2 cores); review the
# pictures (git diff --stat docs/) and commit them yourself.
# Needs the venv CI builds (.venv, see .ci/run) and the system packages of .ci/system-deps.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_WAIT_POLICY=PASSIVE OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false
export COROLLA_MONITOR_SCREENSHOT="$PWD/docs/monitor.png"
export COROLLA_TRAY_SCREENSHOT="$PWD/docs/tray-menu.png"
# The whole monitor file: its generation test runs first, so the picture shows tokens served per server.
.venv/bin/python -m pytest -q -p no:cacheprovider tests/swarm/test_monitor_swarm.py tests/agent/test_agent_tray_gui.py
git status --short docs/
