#!/usr/bin/env bash
# A developer's fast loop: build only some ops into build/dev-<name>/ without touching the installed package, then
# point the package at that library:  LTKERNELS_LIBRARY=$(tools/dev_build.sh nms) python -m pytest tests/test_nms.py
#   tools/dev_build.sh OP[,OP...]|all [--cuda] [--emu]   (prints the library's path on stdout)
# --cuda adds the CUDA kernels (nvcc); --emu their CPU emulation beside the library (the package finds it there).
set -euo pipefail
ops="${1:?usage: tools/dev_build.sh OP[,OP...] [--cuda] [--emu]}"
shift
cuda=OFF; emu=OFF
for flag in "$@"; do
  case "$flag" in
    --cuda) cuda=ON ;;
    --emu) emu=ON ;;
    *) echo "dev_build.sh: unknown flag $flag (--cuda, --emu)" >&2; exit 2 ;;
  esac
done
root="$(cd "$(dirname "$0")/.." && pwd)"
dir="$root/build/dev-${ops//,/-}$([ $cuda = ON ] && echo -cuda || true)$([ $emu = ON ] && echo -emu || true)"
python="${PYTHON:-python}"
op_list="${ops//,/;}"; [ "$ops" = all ] && op_list=""
cmake -S "$root" -B "$dir" -G Ninja -DLTK_CUDA=$cuda -DLTK_CUDA_EMU=$emu -DLTK_OPS="$op_list" \
  -DPython_EXECUTABLE="$(command -v "$python")" -DSKBUILD_PROJECT_VERSION=0.1.0 >&2
cmake --build "$dir" >&2
ls "$dir"/_C.*so
