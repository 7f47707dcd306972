#!/usr/bin/env bash
# One call on the lent GPU machine (the `device` tool): build ltkernels from source with its CUDA kernels, run the
# tests with the GPU visible, run compute-sanitizer memcheck over the ops' CUDA tests (where the machine supports
# it), run `ltk bench --device cuda`, and leave everything under $OUT (8 files at most, no sub-folders):
#   summary.txt  environment, missing packages, each stage's result (also printed last)
#   build.log  tests.log  sanitizer.log  bench.log
#   <gpu>-<date>.json / .md / .png   the benchmark results: copy them to bench/results/, then `ltk bench readme`
#
#   device run:  bash tools/gpu_validate.sh                      (timeout_s 600; the script keeps to ~555 s)
#   locally:     OUT=/tmp/v LTK_VALIDATE_STAGES=bench bash tools/gpu_validate.sh
#
# One call holds ~9 minutes: the build (~1-3 min on 16 cores), the tests (<= 150 s) and memcheck (<= 90 s) leave the
# benchmarks what remains; `ltk bench --budget` keeps the figures of every bench file that finished. For the full
# benchmark figures make a second call straight after (the machine keeps the build while warm, so the rebuild is
# incremental): `LTK_VALIDATE_STAGES=build,bench bash tools/gpu_validate.sh`.
#
# That machine has no network: nothing is installed from a registry. Python packages it lacks are reported in
# summary.txt and the stages needing them are skipped. Knobs (environment):
#   LTK_VALIDATE_BUDGET=555         seconds for the whole script
#   LTK_VALIDATE_STAGES=build,tests,sanitizer,bench
#   LTK_VALIDATE_TESTS="tests"      what the test stage runs (with -m "not slow")
#   LTK_SANITIZE_K=cuda             -k expression for the memcheck run over tests/test_<op>.py
#   LTK_BENCH_ARGS=""               extra `ltk bench` arguments, e.g. "--quick" or "-k roi_align"
#   TORCH_CUDA_ARCH_LIST=9.0        the architectures built (Hopper: H100, H200)
set -uo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
OUT="${OUT:-$root/build/gpu-validate}"
mkdir -p "$OUT"
python="${PYTHON:-python3}"
budget="${LTK_VALIDATE_BUDGET:-555}"
stages=",${LTK_VALIDATE_STAGES:-build,tests,sanitizer,bench},"
t0=$SECONDS
left() { echo $(( budget - (SECONDS - t0) )); }
summary="$OUT/summary.txt"
: >"$summary"
say() { echo "$*" | tee -a "$summary"; }
results=()
result() { results+=("$(printf '%-10s %s' "$1" "$2")"); echo "== $1: $2" >&2; }
want() { [[ "$stages" == *",$1,"* ]]; }
# Seconds a stage may take: at most $1, and never more than what is left minus $2 kept for later stages.
allot() { local a=$(( $(left) - $2 )); (( a > $1 )) && a=$1; (( a < 20 )) && a=20; echo $a; }  # never 0: no limit

export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 LTK_CUDA="${LTK_CUDA:-ON}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}"
for d in /usr/local/cuda/bin /usr/local/cuda-*/bin; do [ -d "$d" ] && case ":$PATH:" in *":$d:"*) ;; *) PATH="$PATH:$d";; esac; done
export PATH

# ---- environment ------------------------------------------------------------------------------------------------
{
  echo "# ltkernels GPU validation, $(date -u +%Y-%m-%dT%H:%M:%SZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
  echo "## host: $(uname -srm), $(nproc) CPUs"
  echo "## nvidia-smi"; nvidia-smi 2>/dev/null || echo "nvidia-smi: not available"
  echo "## tools"
  for t in nvcc cmake ninja compute-sanitizer; do
    if command -v "$t" >/dev/null; then echo "$t: $("$t" --version 2>&1 | grep -iE 'release|version|^[0-9]' | tail -1)"; else echo "$t: MISSING"; fi
  done
} >>"$summary" 2>&1
"$python" - >>"$summary" 2>&1 <<'EOF'
import importlib.util, platform
print(f"## python {platform.python_version()} ({__import__('sys').executable})")
try:
    import torch
    print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), cuda available: {torch.cuda.is_available()}")
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        print(f"GPU: {p.name}, {p.multi_processor_count} SMs, {p.total_memory / 2**30:.0f} GiB, "
              f"L2 {getattr(p, 'L2_cache_size', 0) / 2**20:.0f} MiB, capability {p.major}.{p.minor}")
except Exception as err:  # noqa: BLE001
    print(f"torch: cannot import ({err})")
needs = {"build": ["torch", "scikit_build_core", "pybind11"], "tests": ["pytest", "numpy", "torchvision"],
         "bench": ["pytest_benchmark", "matplotlib", "torchvision"], "optional": ["lvis", "pycocotools", "triton"]}
for stage, mods in needs.items():
    missing = [m for m in mods if importlib.util.find_spec(m) is None]
    print(f"python packages for {stage}: " + (f"MISSING {' '.join(missing)}" if missing else "all present"))
    if missing:
        print(f"MISSING_{stage}={','.join(missing)}")
EOF
cat "$summary" >&2
missing() { grep -q "^MISSING_$1=" "$summary"; }
has_cuda() { "$python" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; }
has_cuda || say "WARNING: torch sees no CUDA device: the CUDA tests skip and the benchmarks run nothing on CUDA"

# ---- build ------------------------------------------------------------------------------------------------------
import_check() { (cd /tmp && "$python" -c "import ltkernels as l; print('ltkernels', l.__version__, l.build_info()); import sys; sys.exit(0 if l.has_cuda_kernels() else 3)"); }
if want build; then
  if missing build; then
    result build "SKIPPED (missing build packages)"
  else
    t=$(allot 270 240)
    echo "## pip install --no-build-isolation --no-deps --no-index -e . (TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST, ${t}s)" >"$OUT/build.log"
    s=$SECONDS
    timeout -k 10 "$t" "$python" -m pip install --no-build-isolation --no-deps --no-index --disable-pip-version-check \
      -v -e . >>"$OUT/build.log" 2>&1
    rc=$?
    if [ $rc -eq 0 ] && import_check >>"$OUT/build.log" 2>&1; then
      result build "ok: editable install in $((SECONDS - s)) s ($(import_check 2>/dev/null | tail -1 | cut -c1-160))"
    else
      # Fallback: the developer build of every op, loaded through LTKERNELS_LIBRARY with the checkout on the
      # path (ltkernels.models resolves through a link to models/, as the installed package maps it).
      echo "## pip install failed (exit $rc): tools/dev_build.sh fallback" >>"$OUT/build.log"
      t=$(allot 240 200)
      if lib=$(PYTHON="$python" timeout -k 10 "$t" tools/dev_build.sh all --cuda 2>>"$OUT/build.log"); then
        export LTKERNELS_LIBRARY="$lib" PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
        [ -e ltkernels/models ] || ln -s ../models ltkernels/models
        if import_check >>"$OUT/build.log" 2>&1; then result build "ok: dev build $lib (pip install failed: exit $rc)"
        else result build "FAILED: dev build does not import with CUDA kernels (see build.log)"; fi
      else
        result build "FAILED: pip install exit $rc, dev build failed too (see build.log)"
      fi
    fi
  fi
fi
built() { import_check >/dev/null 2>&1; }

# ---- tests --------------------------------------------------------------------------------------------------------
if want tests; then
  if missing tests && ! "$python" -c "import pytest" 2>/dev/null; then
    result tests "SKIPPED (pytest missing)"
  elif ! built; then
    result tests "SKIPPED (ltkernels with CUDA kernels does not import)"
  else
    t=$(allot 150 200)
    # shellcheck disable=SC2086
    timeout -k 10 "$t" "$python" -m pytest ${LTK_VALIDATE_TESTS:-tests} -m "not slow" -q -rfEs -p no:cacheprovider \
      --durations=10 >"$OUT/tests.log" 2>&1
    rc=$?
    line=$(grep -E "^(=+ )?[0-9]+ (passed|failed)|[0-9]+ (passed|failed|error)" "$OUT/tests.log" | tail -1)
    case $rc in
      0) result tests "ok: ${line:-passed}" ;;
      124|137) result tests "TIMED OUT after ${t}s: ${line:-see tests.log}" ;;
      *) result tests "FAILED (exit $rc): ${line:-see tests.log}" ;;
    esac
  fi
fi

# ---- compute-sanitizer memcheck -------------------------------------------------------------------------------------
if want sanitizer; then
  files=$(ls tests/test_roi_align.py tests/test_nms.py tests/test_group_softmax.py tests/test_equalized_focal_loss.py 2>/dev/null | tr '\n' ' ')
  if ! command -v compute-sanitizer >/dev/null; then
    result sanitizer "SKIPPED (no compute-sanitizer on this machine)"
  elif ! has_cuda || ! built || [ -z "$files" ]; then
    result sanitizer "SKIPPED (no CUDA device, no CUDA build, or no op tests)"
  else
    t=$(allot 90 150)
    # Without the caching allocator every tensor is its own allocation, so an out-of-bounds access is caught
    # instead of landing in a neighbouring cached block.
    # shellcheck disable=SC2086
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout -k 10 "$t" compute-sanitizer --tool memcheck --error-exitcode 99 \
      --target-processes all "$python" -m pytest $files -k "${LTK_SANITIZE_K:-cuda}" -m "not slow" -q -x \
      -p no:cacheprovider >"$OUT/sanitizer.log" 2>&1
    rc=$?
    errs=$(grep -E "ERROR SUMMARY: [0-9]+ error" "$OUT/sanitizer.log" | tail -1)
    line=$(grep -E "[0-9]+ (passed|failed|error)" "$OUT/sanitizer.log" | tail -1)
    if grep -qiE "device not supported|not supported on this" "$OUT/sanitizer.log"; then
      result sanitizer "SKIPPED (compute-sanitizer does not support this device/runtime)"
    else
      case $rc in
        0) result sanitizer "ok: ${errs:-no errors} (${line:-?}) over $files-k ${LTK_SANITIZE_K:-cuda}" ;;
        99) result sanitizer "MEMCHECK ERRORS: ${errs} (see sanitizer.log)" ;;
        124|137) result sanitizer "TIMED OUT after ${t}s (${line:-no summary}; see sanitizer.log for how far it got)" ;;
        *) result sanitizer "FAILED (exit $rc): ${errs:-} ${line:-see sanitizer.log}" ;;
      esac
    fi
  fi
fi

# ---- benchmarks -------------------------------------------------------------------------------------------------------
if want bench; then
  if missing bench; then
    result bench "SKIPPED ($(grep '^MISSING_bench=' "$summary" | cut -d= -f2) missing)"
  elif ! built; then
    result bench "SKIPPED (ltkernels with CUDA kernels does not import)"
  else
    b=$(( $(left) - 25 ))
    if (( b < 30 )); then
      result bench "SKIPPED (only $(left) s left of the budget; rerun with LTK_VALIDATE_STAGES=bench)"
    else
      # shellcheck disable=SC2086
      timeout -k 10 $((b + 15)) "$python" -m ltkernels.models.benchmarking --device "${LTK_BENCH_DEVICE:-cuda}" \
        --budget "$b" --out "$OUT" ${LTK_BENCH_ARGS:-} >"$OUT/bench.log" 2>&1
      rc=$?
      made=$(cd "$OUT" && ls -- *.json 2>/dev/null | tr '\n' ' ')
      case $rc in
        0) result bench "ok: ${made:-no results file}" ;;
        *) result bench "exit $rc: ${made:-no results file} ($(grep -E 'not run|stopped|exit code' "$OUT/bench.log" | tr '\n' ';' | cut -c1-300))" ;;
      esac
    fi
  fi
fi

# ---- summary (printed last: the device tool returns the end of the output) --------------------------------------
{
  echo "## stages ($((SECONDS - t0)) s)"
  printf '%s\n' "${results[@]}"
  echo "## files in \$OUT: $(cd "$OUT" && ls | tr '\n' ' ')"
  echo "## next: copy \$OUT/*.json *.md *.png to bench/results/, run \`ltk bench readme\`, commit"
} >>"$summary"
sed -n '/^## stages/,$p' "$summary"
md=$(ls "$OUT"/*.md 2>/dev/null | head -1)
[ -n "$md" ] && { echo; sed -n '/^| op/,$p' "$md"; }
[[ " ${results[*]} " == *FAILED* || " ${results[*]} " == *"MEMCHECK ERRORS"* ]] && exit 1
exit 0
