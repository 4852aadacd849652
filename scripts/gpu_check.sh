#!/usr/bin/env bash
# scripts/gpu_check.sh: on a machine with an NVIDIA GPU, in one go: build everything with CUDA for
# that GPU, run the test suite natively, run the GPU benchmarks, and print a short report (a
# Markdown block for docs/gpu-status.md). Run it from anywhere; it works in the repository root.
#
# Installs nothing (the GPU machine may have no network): missing dependencies are named with
# their Debian packages, and the script goes on with what it can build (no Catch2: no tests; no
# Google Benchmark: no benchmarks; no CLI11: no examples).
#
# Steps, ordered so that a run cut short by the time budget still has the GPU results:
#   1. configure build-gpu/ (Release, DIFFUSE_CUDA=ON, CMAKE_CUDA_ARCHITECTURES=native)
#   2. build the CUDA targets (test_kernels_cuda, test_cuda_memory, test_backend_ops_cuda,
#      test_backend_models_cuda, bench_kernels_cuda)
#   3. run the CUDA tests (ctest -L cuda), 4. run the GPU benchmarks
#   5. build everything else, 6. run the whole suite (ctest)
# Writes build-gpu/gpu_check.log (everything) and build-gpu/gpu_check_report.md (the report).
# shellcheck disable=SC2016  # the bash -c '...' scripts expand their own arguments
set -uo pipefail

usage() {
  cat <<'USAGE'
Usage: scripts/gpu_check.sh [options]

  --budget SECONDS   wall-clock budget for the whole run (default 540; 0: none). Each step
                     gets what is left; a step cut by the budget is reported as cut.
  --jobs N           build jobs and ctest -j (default: nproc)
  --build-dir DIR    build directory (default: build-gpu)
  --cuda-only        only the CUDA targets: steps 1-4 (the quickest useful run)
  --no-bench         skip the benchmarks
  --out DIR          also copy the log, the report and ctest's logs into DIR
  -h, --help         this text

Environment: DIFFUSE_CMAKE_ARGS  extra arguments for the configure step (as for run.sh)
Exit status: 0 when every step that ran passed and the CUDA tests ran (not skipped), else 1.
USAGE
}

BUDGET=540
JOBS=$(nproc 2>/dev/null || echo 2)
BUILD_DIR=build-gpu
CUDA_ONLY=0
BENCH=1
OUT_DIR=""
while [[ $# -gt 0 ]]; do
  case $1 in
    --budget) BUDGET=${2:?--budget needs a number of seconds}; shift 2 ;;
    --jobs) JOBS=${2:?--jobs needs a number}; shift 2 ;;
    --build-dir) BUILD_DIR=${2:?--build-dir needs a directory}; shift 2 ;;
    --cuda-only) CUDA_ONLY=1; shift ;;
    --no-bench) BENCH=0; shift ;;
    --out) OUT_DIR=${2:?--out needs a directory}; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) printf 'gpu_check.sh: unknown option "%s" (see --help)\n' "$1" >&2; exit 2 ;;
  esac
done
[[ $BUDGET =~ ^[0-9]+$ ]] || { echo "gpu_check.sh: --budget must be a whole number of seconds" >&2; exit 2; }
[[ $JOBS =~ ^[1-9][0-9]*$ ]] || { echo "gpu_check.sh: --jobs must be a positive number" >&2; exit 2; }

# ---------------------------------------------------------------- a GPU, or refuse
if ! command -v nvidia-smi >/dev/null 2>&1; then
  echo "gpu_check.sh: refusing: no GPU (nvidia-smi not found); this script is for a machine with an NVIDIA GPU - on the CPU use ./run.sh test" >&2
  exit 1
fi
SMI_L=$(nvidia-smi -L 2>&1)
if ! grep -qE '^GPU [0-9]+:' <<<"$SMI_L"; then
  echo "gpu_check.sh: refusing: no GPU (nvidia-smi -L lists none: $(head -n 1 <<<"$SMI_L"))" >&2
  exit 1
fi

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
mkdir -p "$BUILD_DIR" || exit 1
BUILD_DIR=$(cd "$BUILD_DIR" && pwd)
LOG=$BUILD_DIR/gpu_check.log
REPORT=$BUILD_DIR/gpu_check_report.md
: >"$LOG"
exec > >(tee -a "$LOG") 2>&1

say() { printf '\n==> [%4ds] %s\n' "$SECONDS" "$*"; }

# Seconds left of the budget, minus a reserve for later steps (a large number without a budget).
left() {
  local reserve=${1:-0}
  if [[ $BUDGET -eq 0 ]]; then echo 999999; else echo $((BUDGET - SECONDS - reserve)); fi
}

# run_step VAR CAP RESERVE cmd...: runs cmd under a timeout of min(CAP, time left - RESERVE) and
# sets VAR to "ok (Ns)", "FAILED (exit N, Ns)", "cut by the time budget after Ns" or "not run (no time left)".
run_step() {
  local var=$1 cap=$2 reserve=$3 limit start rc
  shift 3
  limit=$(left "$reserve")
  [[ $cap -gt 0 && $cap -lt $limit ]] && limit=$cap
  if [[ $limit -lt 5 ]]; then
    printf -v "$var" '%s' "not run (no time left)"
    echo "(skipped: no time left in the budget)"
    return 1
  fi
  start=$SECONDS
  timeout -k 10 "$limit" "$@"   # (not --foreground: the whole process group, compilers included, is stopped)
  rc=$?
  if [[ $rc -eq 0 ]]; then
    printf -v "$var" 'ok (%ds)' $((SECONDS - start))
  elif [[ $rc -eq 124 || $rc -eq 137 ]]; then
    printf -v "$var" 'cut by the time budget after %ds' $((SECONDS - start))
  else
    printf -v "$var" 'FAILED (exit %d, %ds)' "$rc" $((SECONDS - start))
  fi
  return "$rc"
}

OVERALL=0
GPU_LINES=$(sed -E 's/ \(UUID: [^)]*\)//' <<<"$SMI_L")
GPU_INFO=$(nvidia-smi --query-gpu=driver_version,memory.total,compute_cap --format=csv,noheader 2>/dev/null | head -n 1)
say "GPU"
echo "$SMI_L"
[[ -n $GPU_INFO ]] && echo "driver, memory, compute capability: $GPU_INFO"

# ---------------------------------------------------------------- toolchain
NVCC=$(command -v nvcc 2>/dev/null || true)
[[ -z $NVCC && -x /usr/local/cuda/bin/nvcc ]] && NVCC=/usr/local/cuda/bin/nvcc
say "toolchain"
if [[ -z $NVCC ]]; then
  echo "gpu_check.sh: no nvcc on PATH or in /usr/local/cuda/bin: install the CUDA toolkit; nothing to build" >&2
  exit 1
fi
NVCC_VERSION=$("$NVCC" --version | grep -E 'release' | sed -E 's/.*release ([^,]*), (V[^ ]*).*/\1 (\2)/')
echo "nvcc: $NVCC, $("$NVCC" --version | grep -E 'release')"
command -v cmake >/dev/null 2>&1 || { echo "gpu_check.sh: cmake not found (Debian: cmake); nothing to build" >&2; exit 1; }
CMAKE_VERSION=$(cmake --version | head -n 1 | awk '{print $3}')
CXX_VERSION=$( (${CXX:-c++} --version 2>/dev/null || echo unknown) | head -n 1)
echo "cmake $CMAKE_VERSION; C++ compiler: $CXX_VERSION"
COMMIT=$(git rev-parse --short HEAD 2>/dev/null || echo "not a git checkout")
if [[ $COMMIT != "not a git checkout" ]] && [[ -n $(git status --porcelain 2>/dev/null | head -n 1) ]]; then
  COMMIT="$COMMIT + uncommitted changes"
fi

# ---------------------------------------------------------------- dependencies (probe, never install)
say "dependencies (nothing is installed)"
PROBE=$BUILD_DIR/_probe
mkdir -p "$PROBE/src"
cat >"$PROBE/src/CMakeLists.txt" <<'CMAKE'
cmake_minimum_required(VERSION 3.25)
project(diffuse_gpu_check_probe LANGUAGES CXX)
find_package(Eigen3 3.4 QUIET NO_MODULE)
find_package(nlohmann_json 3 QUIET)
find_package(ZLIB QUIET)
find_package(LibArchive 3 QUIET)
find_package(Catch2 2 QUIET)
find_package(benchmark QUIET)
find_package(CLI11 QUIET CONFIG)
find_path(PROBE_STB stb_image_write.h PATH_SUFFIXES stb NO_CACHE)
find_path(PROBE_MINIZIP_INC minizip/unzip.h NO_CACHE)
find_library(PROBE_MINIZIP_LIB minizip NO_CACHE)
foreach(p Eigen3 nlohmann_json ZLIB LibArchive Catch2 benchmark CLI11)
  if(${p}_FOUND)
    message(STATUS "PROBE ${p}=1")
  else()
    message(STATUS "PROBE ${p}=0")
  endif()
endforeach()
if(PROBE_STB)
  message(STATUS "PROBE stb=1")
else()
  message(STATUS "PROBE stb=0")
endif()
if(PROBE_MINIZIP_INC AND PROBE_MINIZIP_LIB)
  message(STATUS "PROBE minizip=1")
else()
  message(STATUS "PROBE minizip=0")
endif()
CMAKE
PROBE_OUT=$(cmake -S "$PROBE/src" -B "$PROBE/build" 2>&1)
have() { grep -q "PROBE $1=1" <<<"$PROBE_OUT"; }
declare -A DEBIAN=([Eigen3]=libeigen3-dev [nlohmann_json]=nlohmann-json3-dev [ZLIB]=zlib1g-dev [LibArchive]=libarchive-dev
                   [stb]=libstb-dev [minizip]=libminizip-dev [Catch2]=catch2 [benchmark]=libbenchmark-dev [CLI11]=libcli11-dev)
MISSING=()
for p in Eigen3 nlohmann_json ZLIB LibArchive stb minizip; do
  have "$p" || MISSING+=("$p (${DEBIAN[$p]})")
done
if [[ ${#MISSING[@]} -gt 0 ]]; then
  echo "$PROBE_OUT"
  echo "gpu_check.sh: cannot configure diffuse, missing: ${MISSING[*]}" >&2
  exit 1
fi
TESTS=ON; BENCHES=ON; EXAMPLES=ON
have Catch2 || { TESTS=OFF; MISSING+=("Catch2 v2 (catch2): no tests"); }
have benchmark || { BENCHES=OFF; MISSING+=("Google Benchmark (libbenchmark-dev): no benchmarks"); }
have CLI11 || { EXAMPLES=OFF; MISSING+=("CLI11 (libcli11-dev): no examples and their end-to-end tests"); }
if [[ ${#MISSING[@]} -gt 0 ]]; then
  printf 'not found, going on without: %s\n' "${MISSING[@]}"
else
  echo "all found: Eigen3, nlohmann_json, zlib, libarchive, stb, minizip, Catch2, Google Benchmark, CLI11"
fi

# ---------------------------------------------------------------- 1. configure
say "1. configure $BUILD_DIR"
CONFIG_ARGS=(-S . -B "$BUILD_DIR" -DCMAKE_BUILD_TYPE=Release -DDIFFUSE_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=native
             "-DDIFFUSE_BUILD_TESTS=$TESTS" "-DDIFFUSE_BUILD_BENCHMARKS=$BENCHES" "-DDIFFUSE_BUILD_EXAMPLES=$EXAMPLES")
if [[ -n ${DIFFUSE_CMAKE_ARGS:-} ]]; then
  # shellcheck disable=SC2206  # word splitting intended
  CONFIG_ARGS+=(${DIFFUSE_CMAKE_ARGS})
fi
echo "cmake ${CONFIG_ARGS[*]}"
CONFIGURE_LOG=$BUILD_DIR/gpu_check_configure.log
run_step CONFIGURE 0 30 bash -c 'log=$1; shift; cmake "$@" 2>&1 | tee "$log"; exit ${PIPESTATUS[0]}' \
  _ "$CONFIGURE_LOG" "${CONFIG_ARGS[@]}"
CUDA_LINE=$(grep -E 'diffuse: CUDA (enabled|disabled)|diffuse: nvcc not found' "$CONFIGURE_LOG" 2>/dev/null | tail -n 1 | sed -E 's/^-- //')
LIBS_LINE=$(grep -E 'diffuse: CUDA libraries' "$CONFIGURE_LOG" 2>/dev/null | tail -n 1 | sed -E 's/^-- diffuse: CUDA libraries: //')
TORCH_LINE=$(grep -E 'diffuse: (PyTorch reference|no python3 can import torch)' "$CONFIGURE_LOG" 2>/dev/null | tail -n 1 | sed -E 's/^-- diffuse: //')

BUILD_CUDA="not run"; CUDA_TESTS="not run"; BENCH_RESULT="not run"; BUILD_ALL="not run"; SUITE="not run"
KERNELS_CUDA="not run"; CUDA_MEMORY="not run"; SUITE_SUMMARY=""; SUITE_FAILED=""; BENCH_LINES=""
test_status() {  # the status ctest printed for test $2 in file $1
  grep -E "Test +#[0-9]+: $2 " "$1" 2>/dev/null | tail -n 1 | sed -E "s/.*Test +#[0-9]+: $2 \.* *//; s/\*\*\*//; s/ +/ /g"
}

if [[ $CONFIGURE == ok* ]]; then
  # -------------------------------------------------------------- 2. CUDA targets
  CUDA_TARGETS=()
  [[ $TESTS == ON ]] && CUDA_TARGETS+=(test_kernels_cuda test_cuda_memory test_backend_ops_cuda test_backend_models_cuda)
  [[ $BENCHES == ON && $BENCH -eq 1 ]] && CUDA_TARGETS+=(bench_kernels_cuda)
  if [[ ${#CUDA_TARGETS[@]} -gt 0 ]]; then
    say "2. build the CUDA targets: ${CUDA_TARGETS[*]}"
    run_step BUILD_CUDA 0 30 cmake --build "$BUILD_DIR" -j"$JOBS" --target "${CUDA_TARGETS[@]}" || OVERALL=1
  else
    BUILD_CUDA="nothing to build (no Catch2, no benchmarks)"
  fi

  # -------------------------------------------------------------- 3. CUDA tests
  if [[ $TESTS == ON && $BUILD_CUDA == ok* ]]; then
    say "3. CUDA tests: ctest -L cuda"
    CUDA_CTEST=$BUILD_DIR/gpu_check_ctest_cuda.log
    run_step CUDA_TESTS 300 20 bash -c 'ctest --test-dir "$1" -L cuda -V 2>&1 | tee "$2"; exit ${PIPESTATUS[0]}' \
      _ "$BUILD_DIR" "$CUDA_CTEST" || OVERALL=1
    KERNELS_CUDA=$(test_status "$CUDA_CTEST" kernels_cuda)
    CUDA_MEMORY=$(test_status "$CUDA_CTEST" cuda_memory)
    if [[ $KERNELS_CUDA == Skipped* || $CUDA_MEMORY == Skipped* ]]; then
      CUDA_TESTS="$CUDA_TESTS, but SKIPPED: the test programs found no usable CUDA device ($(grep -m 1 -oE 'no CUDA device \([^)]*\)' "$CUDA_CTEST"))"
    fi
    [[ $KERNELS_CUDA == Passed* && $CUDA_MEMORY == Passed* ]] || OVERALL=1
  fi

  # -------------------------------------------------------------- 4. benchmarks
  if [[ $BENCH -eq 0 ]]; then
    BENCH_RESULT="skipped (--no-bench)"
  elif [[ $BENCHES == OFF ]]; then
    BENCH_RESULT="not built (no Google Benchmark)"
  elif [[ -x $BUILD_DIR/benchmarks/bench_kernels_cuda ]]; then
    say "4. GPU benchmarks: bench_kernels_cuda"
    BENCH_LOG=$BUILD_DIR/gpu_check_bench.log
    run_step BENCH_RESULT 180 20 bash -c '"$1" 2>&1 | tee "$2"; exit ${PIPESTATUS[0]}' \
      _ "$BUILD_DIR/benchmarks/bench_kernels_cuda" "$BENCH_LOG" || OVERALL=1
    BENCH_LINES=$(grep -E '^BM_' "$BENCH_LOG" 2>/dev/null | head -n 20)
    if [[ -z $BENCH_LINES ]]; then
      BENCH_RESULT="$BENCH_RESULT, but no results: $(head -n 1 "$BENCH_LOG" 2>/dev/null)"
      OVERALL=1
    fi
  else
    BENCH_RESULT="bench_kernels_cuda was not built"
  fi

  # -------------------------------------------------------------- 5. + 6. everything
  if [[ $CUDA_ONLY -eq 1 ]]; then
    BUILD_ALL="skipped (--cuda-only)"; SUITE="skipped (--cuda-only)"
  else
    say "5. build everything"
    # Keep going past a failing target (e.g. a .cu file), so the rest is still built and tested.
    KEEP_GOING=()
    case $(grep -E '^CMAKE_GENERATOR:' "$BUILD_DIR/CMakeCache.txt" | cut -d= -f2-) in
      Ninja*) KEEP_GOING=(-- -k 0) ;;
      *Makefiles*) KEEP_GOING=(-- -k) ;;
    esac
    # Leave at least 60 s of the budget for the test suite.
    if run_step BUILD_ALL 0 60 cmake --build "$BUILD_DIR" -j"$JOBS" "${KEEP_GOING[@]}"; then :; else OVERALL=1; fi
    if [[ $TESTS == ON ]]; then
      say "6. the whole test suite: ctest -j$JOBS"
      SUITE_LOG=$BUILD_DIR/gpu_check_ctest_all.log
      STOP=()
      if [[ $BUDGET -gt 0 ]]; then
        # No test starts in the last 20 s; the running ones are stopped by the step's timeout.
        STOP=(--stop-time "$(date -d "+$(( $(left 20) > 0 ? $(left 20) : 0 )) seconds" +%H:%M:%S)")
      fi
      run_step SUITE 0 5 bash -c 'ctest --test-dir "$1" --output-on-failure -j"$2" "${@:4}" 2>&1 | tee "$3"; exit ${PIPESTATUS[0]}' \
        _ "$BUILD_DIR" "$JOBS" "$SUITE_LOG" "${STOP[@]}" || OVERALL=1
      SUITE_SUMMARY=$(grep -E 'tests passed, [0-9]+ tests? failed out of' "$SUITE_LOG" | tail -n 1)
      FAILED_ALL=$(sed -n '/The following tests FAILED:/,$p' "$SUITE_LOG" | grep -E '^\s+[0-9]+ - ' | sed -E 's/^\s+[0-9]+ - //')
      # Catch programs that were not built show as <name>_NOT_BUILT-<hash>, others as (Not Run).
      N_NOT_BUILT=$(grep -c '_NOT_BUILT' <<<"$FAILED_ALL")
      NOT_RUN=$(grep -v '_NOT_BUILT' <<<"$FAILED_ALL" | grep -F '(Not Run)' | sed 's/ (Not Run)//' | paste -sd ',' -)
      SUITE_FAILED=$(grep -v '_NOT_BUILT' <<<"$FAILED_ALL" | grep -vF '(Not Run)' | head -n 20 | paste -sd ';' -)
      if [[ $N_NOT_BUILT -gt 0 || -n $NOT_RUN ]]; then
        SUITE_SUMMARY="$SUITE_SUMMARY; not built: $N_NOT_BUILT test programs${NOT_RUN:+ and $NOT_RUN}"
      fi
      SUITE_NOT_RUN=$(sed -n '/The following tests did not run:/,/^$/p' "$SUITE_LOG" | grep -E '^\s+[0-9]+ - ' | sed -E 's/^\s+[0-9]+ - //' | head -n 20 | paste -sd ';' -)
      [[ -n $SUITE_NOT_RUN ]] && SUITE_SUMMARY="$SUITE_SUMMARY; did not run: $SUITE_NOT_RUN"
      # The whole suite ran the CUDA tests again: report the later result if the early one is missing.
      [[ $KERNELS_CUDA == "not run" || -z $KERNELS_CUDA ]] && KERNELS_CUDA=$(test_status "$SUITE_LOG" kernels_cuda)
      [[ $CUDA_MEMORY == "not run" || -z $CUDA_MEMORY ]] && CUDA_MEMORY=$(test_status "$SUITE_LOG" cuda_memory)
    else
      SUITE="not built (no Catch2)"
    fi
  fi
else
  OVERALL=1
fi
[[ $TESTS == OFF ]] && OVERALL=1   # the CUDA tests could not run

# ---------------------------------------------------------------- report
{
  echo "### GPU check $(date -u +%Y-%m-%d) (scripts/gpu_check.sh, budget ${BUDGET}s, ${SECONDS}s used)"
  echo
  echo "| what | result |"
  echo "|---|---|"
  echo "| GPU | $(paste -sd ';' - <<<"$GPU_LINES")${GPU_INFO:+ (driver, memory, compute capability: $GPU_INFO)} |"
  echo "| toolchain | nvcc $NVCC_VERSION, CMake $CMAKE_VERSION, $CXX_VERSION |"
  echo "| source | $COMMIT |"
  echo "| configure | $CONFIGURE${CUDA_LINE:+; $CUDA_LINE}${LIBS_LINE:+; $LIBS_LINE} |"
  [[ -n $TORCH_LINE ]] && echo "| PyTorch reference | $TORCH_LINE |"
  echo "| build, CUDA targets | $BUILD_CUDA |"
  echo "| CUDA tests (ctest -L cuda) | $CUDA_TESTS |"
  echo "| kernels_cuda (ctest) | ${KERNELS_CUDA:-not in the ctest output} |"
  echo "| cuda_memory (ctest) | ${CUDA_MEMORY:-not in the ctest output} |"
  echo "| GPU benchmarks | $BENCH_RESULT |"
  echo "| build, everything | $BUILD_ALL |"
  echo "| whole suite (ctest) | $SUITE${SUITE_SUMMARY:+: $SUITE_SUMMARY}${SUITE_FAILED:+; FAILED: $SUITE_FAILED} |"
  [[ ${#MISSING[@]} -gt 0 ]] && echo "| not on this machine | $(printf '%s; ' "${MISSING[@]}" | sed 's/; $//') |"
  if [[ -n $BENCH_LINES ]]; then
    echo
    echo '```'
    echo "$BENCH_LINES"
    echo '```'
  fi
} >"$REPORT"

say "report ($REPORT; full log $LOG)"
echo
cat "$REPORT"
if [[ -n $OUT_DIR ]]; then
  mkdir -p "$OUT_DIR" && cp -f "$LOG" "$REPORT" "$BUILD_DIR"/gpu_check_*.log "$OUT_DIR"/ 2>/dev/null
  [[ -f $BUILD_DIR/Testing/Temporary/LastTest.log ]] && cp -f "$BUILD_DIR/Testing/Temporary/LastTest.log" "$OUT_DIR"/
fi
exit "$OVERALL"
