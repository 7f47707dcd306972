#!/usr/bin/env bash
# Lint: ruff on the Python (rules in pyproject.toml) and clang-format on the C++ / CUDA (style in .clang-format).
# `tools/lint.sh --fix` rewrites the files instead of failing.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=.venv/bin
mapfile -t sources < <(find csrc \( -name '*.h' -o -name '*.cpp' -o -name '*.cu' -o -name '*.cuh' \) | sort)
if [ "${1:-}" = "--fix" ]; then
  "$bin/ruff" check --fix .
  "$bin/clang-format" -i "${sources[@]}"
else
  "$bin/ruff" check .
  "$bin/clang-format" --dry-run --Werror "${sources[@]}"
fi
