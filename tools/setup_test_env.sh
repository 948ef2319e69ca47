#!/usr/bin/env bash
# Everything the test suite needs, from the package registries only (idempotent; fast when present):
# torch's CPU wheel, tk with its dev and web extras, DeepSpeed from source without compiled ops (its isolated
# build would fetch another torch; tests/engine/test_deepspeed_cpu.py runs ZeRO-2/3 on two CPU processes),
# and from Debian tmux (tk chat is tested in a real terminal) and Chromium + its driver (tk web is tested in
# headless Chromium; no browser download).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q torch==2.13.0
python3 -m pip install -q -e ".[dev,web]"
python3 -m pip install -q --no-build-isolation deepspeed==0.19.8
if ! command -v tmux >/dev/null || ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq tmux chromium chromium-driver
fi
