#!/usr/bin/env bash
# Install Debian's chromium for tests/results/test_report.py (the HTML report is checked in a real
# headless browser). Idempotent: does nothing when /usr/bin/chromium exists. Needs root (CI);
# without root or apt it says so and exits 0: the browser test then skips with a visible reason.
set -euo pipefail
if [ -x /usr/bin/chromium ]; then
    echo "ci_browser: $(/usr/bin/chromium --version 2>/dev/null || echo chromium) already installed"
    exit 0
fi
if [ "$(id -u)" != "0" ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "ci_browser: not root or no apt-get; chromium not installed (the browser test will be skipped)" >&2
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq chromium >/dev/null
/usr/bin/chromium --version
