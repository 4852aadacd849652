#!/usr/bin/env bash
# Every shell script parses (bash -n), and so does the runner that scripts/gpu_bundle.sh writes
# for the GPU machine: a syntax error found there would cost a lent GPU's minutes.
set -euo pipefail
root=${1:?usage: scripts_syntax.sh SOURCE_DIR}
fail=0
for f in "$root"/scripts/*.sh "$root"/run.sh "$root"/.ci/run; do
  bash -n "$f" || { echo "scripts_syntax: $f does not parse"; fail=1; }
done
runner=$(sed -n '/^cat > "$OUT"\/run.sh <<.RUN.$/,/^RUN$/p' "$root/scripts/gpu_bundle.sh" | sed '1d;$d')
if [[ -z $runner ]]; then
  echo "scripts_syntax: the runner in scripts/gpu_bundle.sh was not found"
  fail=1
else
  bash -n <(printf '%s\n' "$runner") || { echo "scripts_syntax: the runner gpu_bundle.sh writes does not parse"; fail=1; }
fi
"$root/scripts/gpu_bundle.sh" --help > /dev/null || { echo "scripts_syntax: gpu_bundle.sh --help failed"; fail=1; }
((fail == 0)) && echo "scripts_syntax: all parse"
exit $fail
