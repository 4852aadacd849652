#!/usr/bin/env bash
# scripts/objective_table.sh: do v-prediction or min-SNR-gamma weighting train the default MNIST
# model to the same quality in fewer steps than eps prediction? (issue 19, docs/results.md)
#
#   scripts/objective_table.sh [--out out/objectives] [--steps 3000] [--every 750] [--n 500]
#                              [--runs "eps:0 v:0 eps:5"] [--sampler dpm++3m] [--sample-steps 20]
#
# Needs a build (build/examples: train_mnist, mnist_classifier; or set B=build-dir/examples).
# Makes what is missing: data/mnist (scripts/get_mnist.sh) and the LeNet judge
# data/mnist/lenet16.safetensors (mnist_classifier train, ~2 min on 2 cores). Then for each run
# PREDICTION:GAMMA trains train_mnist's defaults with --prediction PREDICTION --min-snr GAMMA
# (0: off), and every --every steps samples N images with the EMA weights (guidance 0.3, the
# sampler given) and scores them: conditional accuracy and FD-LeNet, logged in the run's
# train_log.csv. Writes OUT/table.md (a row per run and evaluation step) and OUT/<run>/.
# About 19 minutes per run on 2 cores (16 of them training).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=out/objectives
STEPS=3000
EVERY=750
N=500
RUNS="eps:0 v:0 eps:5"
SAMPLER=dpm++3m
SAMPLE_STEPS=20
while [[ $# -gt 0 ]]; do
  case $1 in
    --out) OUT=${2:?}; shift 2 ;;
    --steps) STEPS=${2:?}; shift 2 ;;
    --every) EVERY=${2:?}; shift 2 ;;
    --n) N=${2:?}; shift 2 ;;
    --runs) RUNS=${2:?}; shift 2 ;;
    --sampler) SAMPLER=${2:?}; shift 2 ;;
    --sample-steps) SAMPLE_STEPS=${2:?}; shift 2 ;;
    -h|--help) sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "objective_table.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
B=${B:-build/examples}
for t in train_mnist mnist_classifier; do
  [[ -x $B/$t ]] || { echo "objective_table.sh: $B/$t is missing; build first (./run.sh build)" >&2; exit 1; }
done
[[ -f data/mnist/train-images-idx3-ubyte.gz ]] || scripts/get_mnist.sh
[[ -f data/mnist/lenet16.safetensors ]] || $B/mnist_classifier train --data data/mnist
mkdir -p "$OUT"
{
  echo "| prediction | min-SNR gamma | step | train time | conditional accuracy | FD-LeNet |"
  echo "|---|---|---|---|---|---|"
} > "$OUT"/table.md
for r in $RUNS; do
  IFS=: read -r p g <<< "$r"
  d="$OUT/${p}_minsnr${g}"
  if [[ ! -f $d/train_log.csv ]] || ! grep -q "^$STEPS," "$d/train_log.csv"; then
    rm -rf "$d"
    $B/train_mnist --out "$d" --steps "$STEPS" --prediction "$p" --min-snr "$g" --eval-every "$EVERY" \
      --eval-samples "$N" --sampler "$SAMPLER" --sample-steps "$SAMPLE_STEPS" --samples 0 > "$d.log" 2>&1
  fi
  # train_log.csv: step,...,elapsed_s,...,accuracy,fd_lenet (the evaluation columns filled at their steps)
  awk -F, -v p="$p" -v g="$g" 'NR == 1 { for (i = 1; i <= NF; ++i) c[$i] = i; next }
    $c["accuracy"] != "" { printf "| %s | %s | %s | %.0f s | %s | %s |\n", p, g, $c["step"], $c["elapsed_s"], $c["accuracy"], $c["fd_lenet"] }' \
    "$d/train_log.csv" | tee -a "$OUT"/table.md
done
