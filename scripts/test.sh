#!/usr/bin/env bash
# Install clipcount with its test dependencies, a headless Chromium for the web-page tests, and run the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install --quiet --disable-pip-version-check -e '.[test]'
# open_clip checks the CLIP activation tests against it; without --no-deps it would pull torchvision,
# which pins its own torch. The tests stand in for torchvision and skip when open_clip is missing.
python3 -m pip install --quiet --disable-pip-version-check --no-deps open_clip_torch ftfy wcwidth \
  || echo "note: open_clip not installed; its activation tests will be skipped" >&2
if ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else
    echo "note: no chromium found and no root apt-get; the browser tests will be skipped" >&2
  fi
fi
python3 -m pytest -q -p no:cacheprovider "$@"
