#!/usr/bin/env bash
# Create the LeRobot venv (.bench/lerobot/.venv, git-ignored) for tests/test_convert_lerobot.py's
# acceptance test (LeRobot's own writer and loader as the peer) and scripts/bench_lerobot.py.
# lerobot 0.4.4 pins torch < 2.11 and needs torchvision, so it cannot share .venv. It is installed
# with --no-deps plus what its dataset, policy and training code import (the list of
# scripts/bench_lerobot.py), on its torch + torchvision pair, and torchcodec: LeRobot's loader
# decodes video with torchcodec, or with torchvision.io.VideoReader, which torchvision >= 0.24 no
# longer has. torchcodec loads the system's FFmpeg libraries, installed with apt-get when missing.
# Where that fails the venv is not created, the reason goes to .bench/lerobot/.venv.failed, and the
# acceptance test skips saying so; the rest of the suite is unaffected.
#   LEROBOT_VENV  where to create it (default .bench/lerobot/.venv)
#   PYTHON        interpreter to build it from (default python3)
set -uo pipefail
cd "$(dirname "$0")/.."
VENV=${LEROBOT_VENV:-.bench/lerobot/.venv}
PYTHON=${PYTHON:-python3}
FAILED="$VENV.failed"
CHECK="import lerobot.datasets.lerobot_dataset, torchcodec.decoders"
if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "$CHECK" 2>/dev/null; then
  exit 0
fi
log=$(mktemp)
fail() {
  rm -rf "$VENV"
  mkdir -p "$(dirname "$FAILED")"
  { echo "setup_lerobot_venv failed $(date -u +%FT%TZ) at: $1"; tail -n 5 "$log"; } >"$FAILED"
  rm -f "$log"
  echo "setup_lerobot_venv: could not create $VENV (see $FAILED); the LeRobot test will skip" >&2
  exit 1
}
start=$(date +%s)
rm -rf "$VENV" "$FAILED"
if ! ldconfig -p | grep -q "libavcodec\.so"; then
  # FFmpeg 5.1's shared libraries (Debian 12); torchcodec supports FFmpeg 4 to 7.
  { apt-get update -q && apt-get install -y -q --no-install-recommends libavcodec59 libavformat59 \
    libavutil57 libswscale6 libswresample4 libavfilter8 libavdevice59; } >>"$log" 2>&1 \
    || fail "apt-get install of the FFmpeg libraries"
fi
# The torch + torchvision pair of scripts/bench_lerobot.py (the CPU torch 2.13 of .venv fails with
# PyPI's torchvision 0.28: "operator torchvision::nms does not exist").
TORCH=(torch==2.14.1 torchvision==0.29.1)
DEPS=("datasets>=4.0.0,<5.0.0" "diffusers>=0.27.2,<0.36.0" "huggingface-hub>=0.34.2,<0.36.0"
  "accelerate>=1.10.0,<2.0.0" "einops>=0.8.0,<0.9.0" draccus==0.10.0 "packaging>=24.2,<26.0"
  "termcolor>=2.4.0,<4.0.0" "deepdiff>=7.0.1,<9.0.0" "jsonlines>=4.0.0,<5.0.0" "av>=15.0.0,<16.0.0"
  "gymnasium>=1.1.1,<2.0.0" "opencv-python-headless>=4.9.0,<4.13.0" "imageio>=2.34.0,<3.0.0"
  "pyserial>=3.5,<4.0" torchcodec==0.14.0)
PIP=("$VENV/bin/python" -m pip install -q --disable-pip-version-check)
"$PYTHON" -m venv "$VENV" >>"$log" 2>&1 || fail "python -m venv"
"${PIP[@]}" "${TORCH[@]}" >>"$log" 2>&1 || fail "pip install ${TORCH[*]}"
"${PIP[@]}" --no-deps lerobot==0.4.4 >>"$log" 2>&1 || fail "pip install lerobot==0.4.4"
"${PIP[@]}" "${DEPS[@]}" "${TORCH[@]}" >>"$log" 2>&1 || fail "pip install lerobot's dependencies"
"$VENV/bin/python" -c "$CHECK" >>"$log" 2>&1 || fail "import check ($CHECK)"
rm -f "$log"
echo "setup_lerobot_venv: $VENV ready (lerobot 0.4.4) in $(($(date +%s) - start)) s"
