#!/usr/bin/env bash
# scripts/sampler_table.sh: quality against network evaluations for every sampler, on the default
# MNIST checkpoint (issue 19's table in docs/results.md).
#
#   scripts/sampler_table.sh [--out out/sampler_table] [--n 500] [--guidance 0.3]
#                            [--runs "ddim:uniform:10 dpm++2m:uniform:20 ..."]
#
# Needs a build (build/examples: train_mnist, sample, mnist_classifier). Makes what is missing:
# data/mnist (scripts/get_mnist.sh), the LeNet judge data/mnist/lenet16.safetensors
# (mnist_classifier train, ~2.5 min on 2 cores) and the default checkpoint out/mnist
# (train_mnist with its defaults, ~18 min plus its own DDPM-200 samples, ~6 min: the baseline).
# Then for each run SAMPLER:SPACING:STEPS samples N images with guidance w and scores them:
# conditional accuracy and FD-LeNet (beside the floor the classifier prints), with the wall time.
# Writes OUT/table.md (markdown rows) and OUT/<run>/ (the samples and the score output).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=out/sampler_table
N=500
W=0.3
RUNS="ddim:uniform:10 ddim:uniform:20 ddim:uniform:50 euler-a:uniform:10 euler-a:uniform:20 euler-a:uniform:50
dpm++2m:uniform:10 dpm++2m:uniform:20 dpm++2m:uniform:50 dpm++2m:uniform:200 dpm++3m:uniform:10 dpm++3m:uniform:20
dpm++3m:uniform:50 dpm++2m:linspace:10 dpm++2m:linspace:20 dpm++2m:trailing:10 dpm++2m:trailing:20"
while [[ $# -gt 0 ]]; do
  case $1 in
    --out) OUT=${2:?}; shift 2 ;;
    --n) N=${2:?}; shift 2 ;;
    --guidance) W=${2:?}; shift 2 ;;
    --runs) RUNS=${2:?}; shift 2 ;;
    -h|--help) sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "sampler_table.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
B=build/examples
for t in train_mnist sample mnist_classifier; do
  [[ -x $B/$t ]] || { echo "sampler_table.sh: $B/$t is missing; build first (./run.sh build)" >&2; exit 1; }
done
[[ -f data/mnist/train-images-idx3-ubyte.gz ]] || scripts/get_mnist.sh
[[ -f data/mnist/lenet16.safetensors ]] || $B/mnist_classifier train --data data/mnist
CKPT=out/mnist/checkpoint.safetensors
if [[ ! -f $CKPT ]]; then
  /usr/bin/time -v $B/train_mnist --out out/mnist 2>&1 | tee out/mnist_train.log
fi
mkdir -p "$OUT"
score() {  # dir
  $B/mnist_classifier score --classifier data/mnist/lenet16.safetensors --samples "$1"/samples.npy \
    --labels "$1"/labels.npy --data data/mnist
}
{
  echo "| sampler | spacing | steps | sampling time ($N) | conditional accuracy | FD-LeNet | floor |"
  echo "|---|---|---|---|---|---|---|"
} > "$OUT"/table.md
for r in $RUNS; do
  IFS=: read -r s sp k <<< "$r"
  d="$OUT/${s}_${sp}_${k}"
  start=$EPOCHREALTIME
  $B/sample "$CKPT" -n "$N" --guidance "$W" --sampler "$s" --spacing "$sp" --steps "$k" --out "$d" > "$d.log" 2>&1
  secs=$(awk "BEGIN{printf \"%.0f\", $EPOCHREALTIME - $start}")
  score "$d" > "$d/score.txt" 2>&1
  acc=$(grep -oE "conditional accuracy: [0-9.]+" "$d/score.txt" | awk '{print $3}' | head -n1)
  fd=$(grep -oE "FD-LeNet: [0-9.]+" "$d/score.txt" | awk '{print $2}' | head -n1)
  floor=$(grep -oE "same N\): [0-9.]+" "$d/score.txt" | awk '{print $3}' | head -n1)
  echo "| $s | $sp | $k | $secs s | ${acc:-?} | ${fd:-?} | ${floor:-?} |" | tee -a "$OUT"/table.md
done
