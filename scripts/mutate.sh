#!/usr/bin/env bash
# Mutation check: applies each deliberate bug of scripts/mutants.tsv, alone, to a copy of this
# working tree, builds the test program that should notice it, runs it, and reports whether the
# mutant was killed (the tests failed) or survived (they passed: a hole in the tests).
#
#   scripts/mutate.sh [ID...]       all mutants, or the ones named
#   MUTATE_DIR=/tmp/m scripts/mutate.sh   where the copy and its build live (default
#                                         $TMPDIR/diffuse-mutate: outside the source tree, whose
#                                         doxygen run would find a second copy of every image)
#
# The copy is configured once (Release, no CUDA toolchain needed: the kernels run through the
# emulation); each mutant then rebuilds only its test target, so a run of the whole list takes
# about a minute per mutant on 2 cores. The unmutated tests run first and must pass. Exit status:
# 0 when every mutant was killed, 1 when one survived, 2 when a mutant no longer applies (its
# "old" text is not found exactly once, or it does not compile) or the baseline fails.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
work=${MUTATE_DIR:-${TMPDIR:-/tmp}/diffuse-mutate}
src=$work/src
bld=$work/build
list=$root/scripts/mutants.tsv
jobs=${JOBS:-$(nproc)}
py=/usr/bin/python3; [ -x $py ] || py=python3

say() { printf '==> %s\n' "$*"; }

mkdir -p "$work"
say "copying the working tree to $src"
rm -rf "$src"
mkdir -p "$src"
(cd "$root" && git ls-files -co --exclude-standard -z | tar --null -T - -cf -) | tar -xf - -C "$src"
# Configured every time (quick once the cache exists): a test added since the last run needs it.
say "configuring $bld"
cmake -S "$src" -B "$bld" -DCMAKE_BUILD_TYPE=Release -DDIFFUSE_CUDA=OFF -DDIFFUSE_BUILD_CPU_BENCHMARKS=OFF \
      -DDIFFUSE_BUILD_DOCS=OFF > "$work/configure.log" 2>&1 || { cat "$work/configure.log"; exit 2; }

# apply FILE OLD NEW: replaces the one occurrence of OLD ("\n" = newline); fails unless exactly one.
apply() {
  "$py" - "$1" "$2" "$3" <<'PY'
import sys
path, old, new = sys.argv[1], sys.argv[2].replace("\\n", "\n"), sys.argv[3].replace("\\n", "\n")
s = open(path).read()
n = s.count(old)
if n != 1:
    sys.exit("found %d times in %s: %r" % (n, path, old))
open(path, "w").write(s.replace(old, new))
PY
}

# run TARGET FILTER LOG: builds the test program and runs it; 0 when it built and passed, 1 when
# it built and failed, 2 when it did not build.
run() {
  cmake --build "$bld" -j"$jobs" --target "$1" > "$3" 2>&1 || return 2
  local args=(); [ "$2" != "-" ] && args=("$2")
  (cd "$bld/tests" && DIFFUSE_REQUIRE_ALL_TESTS=1 timeout 900 "./$1" "${args[@]}") >> "$3" 2>&1 || return 1
}

want=" $* "
rows=()
while IFS= read -r line; do
  id=${line%%$'\t'*}
  [[ -z "$id" || "$id" == \#* ]] && continue
  [[ $# -gt 0 && "$want" != *" $id "* ]] && continue
  rows+=("$line")
done < "$list"
[ ${#rows[@]} -gt 0 ] || { say "no mutant matches: $*"; exit 2; }

# The copy keeps the source's mtimes (tar), so objects a previous run built from a mutated file
# can look newer than the restored file: touch the files the mutants change so the baseline and
# every mutant rebuild from what is really there.
for line in "${rows[@]}"; do
  IFS=$'\t' read -r id file _ <<< "$line"
  touch "$src/$file"
done

# The unmutated tests must pass, or every mutant would look killed.
declare -A base=()
for line in "${rows[@]}"; do
  IFS=$'\t' read -r id file old new target filter what <<< "$line"
  key="$target $filter"
  [ -n "${base[$key]:-}" ] && continue
  base[$key]=1
  say "baseline: $target ${filter/#-/(all cases)}"
  if ! run "$target" "$filter" "$work/baseline-$target.log"; then
    say "baseline: $target fails without any mutant (see $work/baseline-$target.log)"
    exit 2
  fi
done

killed=0 survived=0 stale=0
results=()
for line in "${rows[@]}"; do
  IFS=$'\t' read -r id file old new target filter what <<< "$line"
  cp "$root/$file" "$src/$file"  # every mutant starts from the unmutated file
  if ! msg=$(apply "$src/$file" "$old" "$new" 2>&1); then
    say "$id: does not apply ($msg)"
    results+=("$id	stale	$what")
    stale=$((stale + 1))
    continue
  fi
  say "$id: $what ($file) -> $target"
  rc=0
  run "$target" "$filter" "$work/$id.log" || rc=$?
  cp "$root/$file" "$src/$file"
  case $rc in
    0) verdict=survived; survived=$((survived + 1)) ;;
    1) verdict=killed; killed=$((killed + 1)) ;;
    *) verdict="stale (does not compile)"; stale=$((stale + 1)) ;;
  esac
  say "$id: $verdict"
  results+=("$id	$verdict	$what")
done

# Leave the copy unmutated and built, so the next run starts from a clean state.
echo
printf '%s\n' "${results[@]}" | column -t -s $'\t'
echo
say "$killed killed, $survived survived, $stale stale (logs in $work/<id>.log)"
[ "$stale" -gt 0 ] && exit 2
[ "$survived" -gt 0 ] && exit 1
exit 0
