#!/usr/bin/env bash
# scripts/fuzz.sh: libFuzzer on every reader (issue 21), each for a bounded time.
#
#   scripts/fuzz.sh [--seconds 60] [READER...]     all readers of tests/fuzz/readers.hpp, or those
#
# Builds tests/fuzz/fuzz_reader.cpp once with clang++-14 -fsanitize=fuzzer,address,
# undefined (Debian: clang-14, libclang-rt-14-dev; installed here with apt-get when missing and
# root), starts from tests/corpus/<reader>/ (the seeds and every input that ever failed), and
# runs with a 16 MB limit on one allocation (inputs are at most 4 KB: more is an allocation the
# file cannot justify, a finding), a 2 GB memory limit and 10 s per input (a hang is a finding). Every input that crashed, leaked,
# hung or allocated too much is copied into tests/corpus/<reader>/ (fix the reader, then commit
# it: ctest's fuzz_corpus_<reader> replays the corpus in every run). Work files: $FUZZ_DIR
# (default $TMPDIR/diffuse-fuzz). Exit status 1 when any reader had a finding.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
seconds=60
readers=()
while [[ $# -gt 0 ]]; do
  case $1 in
    --seconds) seconds=${2:?}; shift 2 ;;
    -h|--help) sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    -*) echo "fuzz.sh: unknown option '$1' (see --help)" >&2; exit 2 ;;
    *) readers+=("$1"); shift ;;
  esac
done
[[ $seconds =~ ^[0-9]+$ && $seconds -gt 0 ]] || { echo "fuzz.sh: --seconds: '$seconds': expected a whole number from 1 up" >&2; exit 2; }
cxx=clang++-14
rt=$(ls /usr/lib/llvm-14/lib/clang/*/lib/linux/libclang_rt.fuzzer-x86_64.a 2>/dev/null | head -n1 || true)
if ! command -v $cxx >/dev/null || [[ -z $rt ]]; then
  if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
    apt-get install -y -q clang-14 libclang-rt-14-dev >/dev/null
  else
    echo "fuzz.sh: needs clang++-14 and libFuzzer: apt install clang-14 libclang-rt-14-dev" >&2; exit 1
  fi
fi
if [[ ${#readers[@]} -eq 0 ]]; then
  for d in "$root"/tests/corpus/*/; do readers+=("$(basename "$d")"); done
fi
work=${FUZZ_DIR:-${TMPDIR:-/tmp}/diffuse-fuzz}
mkdir -p "$work"
flags=(-std=c++20 -O1 -g -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined
       -I"$root/include" -I/usr/include/eigen3 -I/usr/include/stb)
libs=(-larchive -lminizip -lz -lturbojpeg -lpthread)
exe=$work/fuzz_reader
echo "==> build $exe"
$cxx "${flags[@]}" "$root/tests/fuzz/fuzz_reader.cpp" -o "$exe" "${libs[@]}"
found=0
summary=()
for r in "${readers[@]}"; do
  corpus=$root/tests/corpus/$r
  [[ -d $corpus ]] || { echo "fuzz.sh: no tests/corpus/$r (readers: $(ls "$root/tests/corpus" | tr '\n' ' '))" >&2; exit 2; }
  mkdir -p "$work/corpus_$r" "$work/artifacts_$r"
  echo "==> $r: fuzz for $seconds s"
  set +e
  (cd "$work" && DIFFUSE_FUZZ_READER=$r ASAN_OPTIONS=detect_leaks=1 "$exe" -max_total_time="$seconds" -malloc_limit_mb=16 -rss_limit_mb=2048 \
     -timeout=10 -print_final_stats=1 -artifact_prefix="$work/artifacts_$r/" "$work/corpus_$r" "$corpus" \
     > "$work/$r.log" 2>&1)
  rc=$?
  set -e
  runs=$(grep -oE 'stat::number_of_executed_units: *[0-9]+' "$work/$r.log" | grep -oE '[0-9]+$' || echo "?")
  n=0
  for a in "$work/artifacts_$r"/*; do
    [[ -f $a ]] || continue
    cp "$a" "$corpus/$(basename "$a")"
    n=$((n + 1))
  done
  rm -f "$work/artifacts_$r"/*
  if [[ $rc -ne 0 || $n -gt 0 ]]; then
    found=1
    summary+=("$r: FINDING (exit $rc, $n inputs kept in tests/corpus/$r/; log $work/$r.log)")
  else
    summary+=("$r: $runs inputs in $seconds s, nothing found")
  fi
  echo "==> ${summary[-1]}"
done
echo "==> summary"
printf '  %s\n' "${summary[@]}"
exit $found
