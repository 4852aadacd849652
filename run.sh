#!/usr/bin/env bash
# diffuse: one entry point for setup, build, tests and the demo.
set -euo pipefail

usage() {
  cat <<'USAGE'
Usage: ./run.sh <command> [args...]

  deps [--mpi|--test]  install missing Debian packages (--mpi: also Open MPI, with which
                       the trainers run as data-parallel ranks under mpirun; --test: that
                       and the PyTorch reference used by the tests); uses sudo when not root
  build                deps --mpi + configure build/ (Release) + build everything
  test                 deps --test + build + ctest
  sanitize             deps --test + build the readers', writers' and trainer's tests with
                       AddressSanitizer and UndefinedBehaviorSanitizer (build-sanitize/)
                       and run them; any report fails (CI runs it after test)
  demo [flags...]      deps + configure build-demo/ + build train_2d alone, then
                       build-demo/examples/train_2d --out out/2d [flags...]
  -h, --help           this text

Environment:
  DIFFUSE_BUILD_DIR    build directory of build and test (default: build)
  DIFFUSE_DEMO_BUILD_DIR  build directory of demo (default: build-demo); CUDA only when
                       nvidia-smi lists a GPU, and then for that GPU's architecture alone
  DIFFUSE_REQUIRE_ALL_TESTS  test: 1 (the default once deps has checked every package) fails a
                       test that would skip for want of torch, numpy, scipy or Fashion-MNIST;
                       0 lets it skip
  DIFFUSE_CMAKE_ARGS   extra arguments for the cmake configure step,
                       e.g. "-DDIFFUSE_CUDA=OFF"
  CI                   when set, CUDA code is built for sm_80 only and the CPU benchmarks
                       are not built (CI's time limit)
USAGE
}

cd "$(dirname "${BASH_SOURCE[0]}")"

BUILD_DIR=${DIFFUSE_BUILD_DIR:-build}
JOBS=$(nproc 2>/dev/null || echo 2)

BASE_PKGS=(build-essential cmake libeigen3-dev catch2 libbenchmark-dev nlohmann-json3-dev
           libstb-dev zlib1g-dev libminizip-dev libarchive-dev libcli11-dev libturbojpeg0-dev
           ninja-build)
MPI_PKGS=(libopenmpi-dev openmpi-bin)  # data parallelism (docs/distributed.md); not needed by the demo
TEST_PKGS=(python3-torch python3-torchvision python3-numpy python3-scipy libopenblas0-openmp dataset-fashion-mnist
           doxygen)

say() { printf '==> %s\n' "$*"; }
die() { printf 'run.sh: %s\n' "$*" >&2; exit 1; }

deps() {
  local pkgs=("${BASE_PKGS[@]}")
  if [[ ${1:-} == --test ]]; then
    pkgs+=("${MPI_PKGS[@]}" "${TEST_PKGS[@]}")
  elif [[ ${1:-} == --mpi ]]; then
    pkgs+=("${MPI_PKGS[@]}")
  elif [[ $# -gt 0 ]]; then
    die "deps: unknown argument '$1'"
  fi
  say "deps: checking ${#pkgs[@]} Debian packages"
  if ! command -v dpkg-query >/dev/null 2>&1; then
    say "deps: dpkg-query not found (not Debian?) - install these yourself: ${pkgs[*]}"
    return 0
  fi
  local missing=() p status
  for p in "${pkgs[@]}"; do
    status=$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true)
    [[ $status == "install ok installed" ]] || missing+=("$p")
  done
  if [[ ${#missing[@]} -eq 0 ]]; then
    say "deps: all present"
    DEPS_VERIFIED=1
    return 0
  fi
  local sudo=()
  if [[ $(id -u) -ne 0 ]]; then
    command -v sudo >/dev/null 2>&1 || die "deps: not root and no sudo; install: ${missing[*]}"
    sudo=(sudo)
  fi
  say "deps: installing ${missing[*]}"
  "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update
  "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}"
  DEPS_VERIFIED=1
}

# Ninja for a new build tree: it compiles a target's files while the libraries it links are still
# being built (Make waits for them: the sanitizer build took 513 s with Make, 296 s with Ninja on
# 2 cores). A tree configured before keeps its generator (CMake refuses to switch).
generator_args() {
  [[ -f $1/CMakeCache.txt ]] && return 0
  command -v ninja >/dev/null 2>&1 && printf '%s\n' -G Ninja
  return 0
}

configure_and_build() {
  local args=(-S . -B "$BUILD_DIR" -DCMAKE_BUILD_TYPE=Release)
  mapfile -t gen < <(generator_args "$BUILD_DIR")
  args+=("${gen[@]}")
  if [[ -n ${CI:-} ]]; then
    # CI has 2 cores and 20 minutes: one CUDA architecture, and of the benchmarks only the GPU
    # ones (nvcc must compile them; the CPU ones are built by `./run.sh build`).
    args+=(-DCMAKE_CUDA_ARCHITECTURES=80 -DDIFFUSE_BUILD_CPU_BENCHMARKS=OFF)
  fi
  if [[ -n ${DIFFUSE_CMAKE_ARGS:-} ]]; then
    # shellcheck disable=SC2206  # word splitting intended
    args+=(${DIFFUSE_CMAKE_ARGS})
  fi
  say "configure: cmake ${args[*]}"
  cmake "${args[@]}"
  say "build: cmake --build $BUILD_DIR -j$JOBS"
  cmake --build "$BUILD_DIR" -j"$JOBS"
}

# The demo's build: the train_2d target alone, in its own tree (so that `build` and `test` keep
# their full configuration), without the tests, benchmarks and docs, and with CUDA only for a
# GPU this machine has (nvcc for two architectures would triple the build time for nothing).
demo_build() {
  local dir=${DIFFUSE_DEMO_BUILD_DIR:-build-demo}
  local args=(-S . -B "$dir" -DCMAKE_BUILD_TYPE=Release -DDIFFUSE_BUILD_TESTS=OFF
              -DDIFFUSE_BUILD_BENCHMARKS=OFF -DDIFFUSE_BUILD_DOCS=OFF)
  mapfile -t gen < <(generator_args "$dir")
  args+=("${gen[@]}")
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q '^GPU'; then
    args+=(-DDIFFUSE_CUDA=AUTO -DCMAKE_CUDA_ARCHITECTURES=native)
  else
    args+=(-DDIFFUSE_CUDA=OFF)
  fi
  if [[ -n ${DIFFUSE_CMAKE_ARGS:-} ]]; then
    # shellcheck disable=SC2206  # word splitting intended
    args+=(${DIFFUSE_CMAKE_ARGS})
  fi
  say "configure: cmake ${args[*]}"
  mkdir -p "$dir"
  cmake "${args[@]}" >"$dir/configure.log" 2>&1 || { cat "$dir/configure.log" >&2; die "demo: configure failed (log above)"; }
  grep -E 'CUDA' "$dir/configure.log" | sed 's/^-- /    /' || true
  say "build: cmake --build $dir --target train_2d -j$JOBS"
  cmake --build "$dir" --target train_2d -j"$JOBS"
  DEMO_EXE=$dir/examples/train_2d
}

cmd=${1:-}
[[ $# -gt 0 ]] && shift
case $cmd in
  deps)
    deps "$@"
    ;;
  build)
    [[ $# -eq 0 ]] || die "build takes no arguments"
    deps --mpi
    configure_and_build
    ;;
  test)
    [[ $# -eq 0 ]] || die "test takes no arguments"
    start=$SECONDS
    deps --test
    configure_and_build
    # Every reference a test needs is installed: a test that skips for want of one fails instead
    # (tests/skip.hpp). Set DIFFUSE_REQUIRE_ALL_TESTS=0 to let such tests skip.
    if [[ ${DEPS_VERIFIED:-0} == 1 && -z ${DIFFUSE_REQUIRE_ALL_TESTS+x} ]]; then
      export DIFFUSE_REQUIRE_ALL_TESTS=1
    fi
    # The consumer tests hold a RESOURCE_LOCK, so they never overlap each other.
    say "test: ctest --test-dir $BUILD_DIR --output-on-failure -j$JOBS"
    built=$SECONDS
    ctest --test-dir "$BUILD_DIR" --output-on-failure -j"$JOBS"
    say "test: deps and build $((built - start)) s, ctest $((SECONDS - built)) s"
    ;;
  sanitize)
    [[ $# -eq 0 ]] || die "sanitize takes no arguments"
    start=$SECONDS
    deps --test
    # The tests of every reader and writer (IDX and gzip, npy/npz, image folders and CIFAR-10,
    # safetensors and checkpoints, FID statistics, atomic writes), the training loop and the
    # thread pool, built with ASan + UBSan at -O1 (assertions on): the code is the library's
    # float instantiations too, compiled in this tree with the same flags.
    dir=${DIFFUSE_SANITIZE_BUILD_DIR:-build-sanitize}
    san="-fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer"
    targets=(test_idx test_npy test_image_data test_atomic_file test_diffusion test_frechet test_trainer test_parallel
             fuzz_corpus)
    say "sanitize: configure $dir"
    mapfile -t gen < <(generator_args "$dir")
    cmake -S . -B "$dir" "${gen[@]}" -DCMAKE_BUILD_TYPE=Release -DCMAKE_CXX_FLAGS_RELEASE="-O1 -g" -DCMAKE_CXX_FLAGS="$san" \
          -DCMAKE_EXE_LINKER_FLAGS="-fsanitize=address,undefined" -DDIFFUSE_CUDA=OFF -DDIFFUSE_BUILD_BENCHMARKS=OFF \
          -DDIFFUSE_BUILD_EXAMPLES=OFF -DDIFFUSE_BUILD_DOCS=OFF -DDIFFUSE_NATIVE=OFF >/dev/null
    say "sanitize: build ${targets[*]}"
    cmake --build "$dir" -j"$JOBS" --target "${targets[@]}"
    export ASAN_OPTIONS=detect_leaks=1:abort_on_error=0:exitcode=23 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
    [[ ${DEPS_VERIFIED:-0} == 1 && -z ${DIFFUSE_REQUIRE_ALL_TESTS+x} ]] && export DIFFUSE_REQUIRE_ALL_TESTS=1
    failed=()
    for t in "${targets[@]}"; do
      [[ $t == fuzz_corpus ]] && continue
      say "sanitize: $t"
      "$dir/tests/$t" || failed+=("$t")
    done
    for c in tests/corpus/*/; do  # every fuzz input kept, through its reader
      r=$(basename "$c")
      say "sanitize: fuzz corpus $r"
      "$dir/tests/fuzz_corpus" "$r" "$c" > /dev/null || failed+=("fuzz_corpus $r")
    done
    ((${#failed[@]} == 0)) || die "sanitize: reports or failures in ${failed[*]}"
    say "sanitize: ${#targets[@]} test programs clean under ASan + UBSan in $((SECONDS - start)) s"
    ;;
  demo)
    start=$SECONDS
    deps
    demo_build
    [[ -x $DEMO_EXE ]] || die "demo: $DEMO_EXE was not built (is examples/train_2d.cpp there?)"
    out=out/2d has_out=0 args=("$@")
    for ((i = 0; i < ${#args[@]}; ++i)); do
      case ${args[i]} in
        -h|--help) exec "$DEMO_EXE" --help ;;
        --out) out=${args[i + 1]:-} has_out=1 ;;
        --out=*) out=${args[i]#--out=} has_out=1 ;;
      esac
    done
    ((has_out)) || args=(--out "$out" "${args[@]}")
    mkdir -p "$out"
    say "demo: $DEMO_EXE ${args[*]}"
    "$DEMO_EXE" "${args[@]}"
    say "demo: done in $((SECONDS - start)) s. Pictures: $out/samples.png (data | samples), $out/process.png (x_T to x_0); points: $out/samples.csv"
    ;;
  -h|--help|help)
    usage
    ;;
  "")
    usage >&2
    exit 2
    ;;
  *)
    printf 'run.sh: unknown command "%s"\n\n' "$cmd" >&2
    usage >&2
    exit 2
    ;;
esac
