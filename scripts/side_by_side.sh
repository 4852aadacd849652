#!/usr/bin/env bash
# Two trainings sharing the machine: wall time of train_2d alone and of two identical runs
# started together, for each build given, in interleaved rounds (docs/performance.md, "CPU
# threads that sleep"). Run it on an otherwise idle machine.
#   scripts/side_by_side.sh [--rounds N] [--steps N] LABEL=PATH/TO/train_2d [LABEL=ENV=VALUE,PATH ...]
# A build may carry environment settings: "gomp1000=GOMP_SPINCOUNT=1000,old/train_2d".
set -euo pipefail
rounds=3 steps=3000
while [[ $# -gt 0 && $1 == --* ]]; do
  case $1 in
    --rounds) rounds=$2; shift 2 ;;
    --steps) steps=$2; shift 2 ;;
    -h|--help) sed -n '2,6p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "side_by_side.sh: unknown flag $1" >&2; exit 2 ;;
  esac
done
[[ $# -gt 0 ]] || { echo "side_by_side.sh: give at least one LABEL=PATH/TO/train_2d" >&2; exit 2; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
now() { date +%s.%N; }
one() { env "${envs[@]}" "$bin" --steps "$steps" --samples 200 --log-every "$steps" --out "$work/$1" >/dev/null; }
for ((r = 1; r <= rounds; ++r)); do
  for spec in "$@"; do
    label=${spec%%=*} rest=${spec#*=} envs=()
    if [[ $rest == *,* ]]; then IFS=',' read -r -a parts <<<"$rest"; bin=${parts[-1]}; envs=("${parts[@]:0:${#parts[@]}-1}"); else bin=$rest; fi
    [[ -x $bin ]] || { echo "side_by_side.sh: $bin is not an executable" >&2; exit 2; }
    t0=$(now); one solo; t1=$(now)
    t2=$(now)
    ( one a; now >"$work/a.end" ) &
    one b; now >"$work/b.end"
    wait
    printf 'round %d  %-12s solo %6.2f s   side by side %6.2f s %6.2f s\n' "$r" "$label" \
      "$(bc <<<"$t1 - $t0")" "$(bc <<<"$(cat "$work/a.end") - $t2")" "$(bc <<<"$(cat "$work/b.end") - $t2")"
  done
done
