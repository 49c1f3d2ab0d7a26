#!/usr/bin/env bash
# Download every file of locks/<image>.txt into DIR, each checked against the lock's sha256 hashes
# (pip download --require-hashes), for an offline image build:
#
#   scripts/wheelhouse.sh trainer /path/to/wheelhouse [PYTHON_VERSION]
#   podman build -v /path/to/wheelhouse:/wheelhouse:ro -f trainer_image/Dockerfile ...
#
# Wheels are chosen for Linux x86_64 (manylinux) and PYTHON_VERSION (default 3.11, the bookworm
# bases; 3.12 for the Ubuntu 24.04 CUDA base). sdist-only packages (DeepSpeed) are downloaded as
# sdists; the image build compiles them. pip's HTTP cache makes a second download of the same
# files local. The image build checks the hashes again when it installs.
set -euo pipefail
cd "$(dirname "$0")/.."
image="${1:?usage: $0 operator|trainer DIR [PYTHON_VERSION]}"
dir="${2:?usage: $0 operator|trainer DIR [PYTHON_VERSION]}"
pyver="${3:-3.11}"
lock="locks/$image.txt"
[[ -f "$lock" ]] || { echo "no $lock" >&2; exit 1; }
PYTHON="${PYTHON:-$(command -v python3.11 || command -v python3)}"
mkdir -p "$dir"

platforms=()
for minor in $(seq 39 -1 5); do platforms+=(--platform "manylinux_2_${minor}_x86_64"); done
platforms+=(--platform manylinux2014_x86_64 --platform manylinux2010_x86_64 --platform manylinux1_x86_64 \
  --platform linux_x86_64)
sdists="$(awk '$1 ~ /^deepspeed==/ {print $1}' "$lock")"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
grep -v '^deepspeed==' "$lock" >"$tmp/wheels.txt"
grep '^deepspeed==' "$lock" >"$tmp/sdists.txt" || true

"$PYTHON" -m pip download --quiet --disable-pip-version-check --require-hashes --no-deps \
  --only-binary=:all: --implementation cp --python-version "$pyver" "${platforms[@]}" \
  -d "$dir" -r "$tmp/wheels.txt"
if [[ -s "$tmp/sdists.txt" ]]; then
  # an sdist: pip download prepares its metadata (build isolation, from PyPI); --no-binary keeps it an sdist
  "$PYTHON" -m pip download --quiet --disable-pip-version-check --require-hashes --no-deps \
    --no-binary=:all: -d "$dir" -r "$tmp/sdists.txt"
fi
echo "$dir: $(ls "$dir" | wc -l) files, $(du -sh "$dir" | cut -f1) ($image, Python $pyver${sdists:+; sdists: $sdists})"
