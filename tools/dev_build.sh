#!/usr/bin/env bash
# A developer's fast loop: build only some ops into build/dev-<name>/ without touching the installed package, then
# point the package at that library:  LTKERNELS_LIBRARY=$(tools/dev_build.sh nms) python -m pytest tests/test_nms.py
#   tools/dev_build.sh OP[,OP...] [--cuda]     (CPU only unless --cuda; prints the library's path on stdout)
set -euo pipefail
ops="${1:?usage: tools/dev_build.sh OP[,OP...] [--cuda]}"
cuda=OFF; [ "${2:-}" = "--cuda" ] && cuda=ON
root="$(cd "$(dirname "$0")/.." && pwd)"
dir="$root/build/dev-${ops//,/-}$([ $cuda = ON ] && echo -cuda || true)"
python="${PYTHON:-python}"
cmake -S "$root" -B "$dir" -G Ninja -DLTK_CUDA=$cuda -DLTK_OPS="${ops//,/;}" \
  -DPython_EXECUTABLE="$(command -v "$python")" -DSKBUILD_PROJECT_VERSION=0.1.0 >&2
cmake --build "$dir" >&2
ls "$dir"/_C*.so
