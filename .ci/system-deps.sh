#!/usr/bin/env bash
# Debian 12 packages for the tray agent and its tests (tests/agent) and for the monitor page's
# browser test, run as root by CI before the pip installs. Do NOT add dbus-x11: GTK would then
# auto-launch D-Bus daemons that outlive the tests.
set -euo pipefail

packages=(
    # PyGObject<3.51 is built from source against these
    libgirepository1.0-dev libcairo2-dev pkg-config gcc python3-dev
    # GTK 3 typelibs for pystray's gtk backend
    gir1.2-gtk-3.0
    # the GUI test: virtual X server, an XEmbed tray host that needs no window manager,
    # dbus-run-session (session bus for GTK), real mouse clicks
    xvfb trayer dbus-daemon xdotool
    # the monitor page's browser test (tests/swarm/test_monitor*.py): headless Chromium
    chromium chromium-driver
    # the NAT tests (tests/swarm/test_nat.py): network namespaces, veth pairs, a masquerading router
    iproute2 nftables
)

export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${packages[@]}"
