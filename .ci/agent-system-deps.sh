#!/usr/bin/env bash
# Debian packages needed by the tray agent and its tests (tests/agent), run as root by CI
# before the pip installs. Debian 12 names; do NOT add dbus-x11 (GTK would then auto-launch
# D-Bus daemons that outlive the tests).
set -euo pipefail

packages=(
    # PyGObject<3.51 builds from source against these
    libgirepository1.0-dev libcairo2-dev pkg-config gcc python3-dev
    # GTK runtime for pystray's gtk backend
    gir1.2-gtk-3.0
    # the GUI test: virtual X server, a tray host that works without a window manager,
    # a session bus, input and window tools, screenshots
    xvfb trayer dbus-daemon xdotool x11-utils imagemagick
)

export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${packages[@]}"
