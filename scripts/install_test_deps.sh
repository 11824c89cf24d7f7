#!/usr/bin/env bash
# System packages the test suite uses beyond pip: Debian's `chromium` and `chromium-driver`, for
# tests/test_console.py (the server's console pages in a real headless browser).
# Installs them with apt-get when they are missing and this runs as root on a Debian-like system; otherwise
# it says what is missing and exits 0, and those tests skip, naming why. Never downloads a browser by itself.
set -euo pipefail
if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  export DEBIAN_FRONTEND=noninteractive
  if apt-get update -qq && apt-get install -y -qq chromium chromium-driver >/dev/null; then
    echo "install_test_deps: installed $(chromium --version 2>/dev/null | head -1)"
  else  # no registry reachable: the browser tests skip, saying so, and the rest of the suite still runs
    echo "install_test_deps: apt-get could not install chromium chromium-driver; tests/test_console.py will skip" >&2
  fi
else
  echo "install_test_deps: chromium/chromedriver are missing and apt-get cannot run here (needs root);" \
       "tests/test_console.py will skip. Install them with: apt-get install chromium chromium-driver" >&2
fi
