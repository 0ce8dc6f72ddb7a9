#!/usr/bin/env bash
# Install headless Chromium and its WebDriver from Debian's packages, for the browser test of the pages
# we generate (tests/test_viz_browser.py). Needs apt-get and root (or password-less sudo); prints why not
# and exits 1 otherwise, and the test then skips with that reason.
set -euo pipefail
if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then
  exit 0
fi
if ! command -v apt-get >/dev/null; then
  echo "apt-get is not available on this machine: install Chromium and chromedriver yourself" >&2
  exit 1
fi
SUDO=""
if [ "$(id -u)" != 0 ]; then
  if sudo -n true 2>/dev/null; then SUDO="sudo -n"; else
    echo "installing chromium needs root: run 'sudo apt-get install chromium chromium-driver'" >&2
    exit 1
  fi
fi
$SUDO apt-get update -qq >/dev/null
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium chromium-driver >/dev/null
