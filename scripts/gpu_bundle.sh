#!/usr/bin/env bash
# scripts/gpu_bundle.sh: build the GPU tests and benchmarks HERE (a machine with nvcc, cuBLAS,
# cuDNN and the project's Debian dependencies, no GPU needed) for one architecture, and pack them
# with a runner into a folder to copy to a GPU machine that cannot build the project itself (the
# lent GPU machines have the CUDA libraries and a driver but not Catch2 or stb, and no network).
#
#   scripts/gpu_bundle.sh [--arch 90] [--out build-gpubin] [--jobs N]
#   ... copy the folder to the GPU machine, then there:
#   build-gpubin/run.sh [OUTDIR]        # tests, then benchmarks; logs and summary.txt in OUTDIR
#
# What it packs: test_kernels_cuda, test_cuda_memory, test_cuda_unet (the CUDA tests: every kernel
# against the CPU backend, device memory, the whole U-Net train step against the CPU model),
# bench_kernels_cuda, bench_unet_cuda, libbenchmark (the GPU machine may lack it), train_mnist with
# the MNIST files of data/mnist when there (20 steps on the CPU and on the GPU, same seed: the
# progress lines' losses should agree), and the PyTorch peer script from ../shared/reference. scripts/gpu_check.sh is the one-step
# alternative where the GPU machine can build everything.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ARCH=90
OUT=build-gpubin
JOBS=$(nproc 2>/dev/null || echo 2)
while [[ $# -gt 0 ]]; do
  case $1 in
    --arch) ARCH=${2:?}; shift 2 ;;
    --out) OUT=${2:?}; shift 2 ;;
    --jobs) JOBS=${2:?}; shift 2 ;;
    -h|--help) sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu_bundle.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
BUILD=build-gpu-sm$ARCH
TARGETS=(test_kernels_cuda test_cuda_memory test_cuda_unet bench_kernels_cuda bench_unet_cuda train_mnist)
cmake -S . -B "$BUILD" -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_ARCHITECTURES="$ARCH" -DDIFFUSE_NATIVE=OFF >/dev/null
cmake --build "$BUILD" -j"$JOBS" --target "${TARGETS[@]}"
rm -rf "$OUT"
mkdir -p "$OUT"
cp "$BUILD"/tests/test_kernels_cuda "$BUILD"/tests/test_cuda_memory "$BUILD"/tests/test_cuda_unet "$OUT"/
cp "$BUILD"/benchmarks/bench_kernels_cuda "$BUILD"/benchmarks/bench_unet_cuda "$BUILD"/examples/train_mnist "$OUT"/
if compgen -G "data/mnist/*-ubyte.gz" >/dev/null; then  # scripts/get_mnist.sh made them: train_mnist cpu vs cuda
  mkdir -p "$OUT"/mnist
  cp data/mnist/*-ubyte.gz "$OUT"/mnist/
fi
lib=$(ldd "$OUT"/bench_unet_cuda | awk '/libbenchmark/ {print $3}')
[[ -n $lib ]] && cp "$lib" "$OUT"/
for f in torch_gpu_reference.py torch_reference.py; do
  [[ -f ../shared/reference/$f ]] && cp "../shared/reference/$f" "$OUT"/
done
cat > "$OUT"/run.sh <<'RUN'
#!/bin/bash
# Runs the bundled GPU tests and benchmarks (built by scripts/gpu_bundle.sh); logs into $1 or ./logs.
cd "$(dirname "$0")"
LOG=${1:-logs}
mkdir -p "$LOG"
export LD_LIBRARY_PATH=$PWD:${LD_LIBRARY_PATH:-}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$LOG"/summary.txt
step() {  # log-name command...
  local name=$1 s=$EPOCHREALTIME rc
  shift
  timeout 300 "$@" > "$LOG/$name.log" 2>&1; rc=$?
  echo "$name: rc=$rc, $(awk "BEGIN{printf \"%.1f\", $EPOCHREALTIME - $s}") s: $(tail -n 1 "$LOG/$name.log" | head -c 160)" | tee -a "$LOG"/summary.txt
}
for t in test_kernels_cuda test_cuda_memory test_cuda_unet; do step "$t" ./"$t" -r compact; done
step bench_unet_cuda ./bench_unet_cuda --benchmark_counters_tabular=true
step bench_kernels_cuda ./bench_kernels_cuda --benchmark_min_time=0.05
if [[ -d mnist ]]; then
  common=(--data mnist --samples 0 --seed 3 --warmup 5 --save-every 0 --steps 20 --log-every 5)
  step train_mnist_cpu ./train_mnist --device cpu "${common[@]}" --out "$LOG"/train_cpu
  step train_mnist_cuda ./train_mnist --device cuda "${common[@]}" --out "$LOG"/train_cuda
  grep -h "^step" "$LOG"/train_mnist_cpu.log "$LOG"/train_mnist_cuda.log | tee -a "$LOG"/summary.txt
fi
if [[ -f torch_gpu_reference.py ]] && python3 -c "import torch" 2>/dev/null; then
  step torch_unet_mnist python3 torch_gpu_reference.py unet --model mnist --batch 128 --modes fp32,tf32 --iters 10
  step torch_unet_cifar python3 torch_gpu_reference.py unet --model cifar --batch 128 --modes fp32,tf32 --iters 5
fi
RUN
chmod +x "$OUT"/run.sh
du -sh "$OUT"
echo "gpu_bundle.sh: copy $OUT to the GPU machine and run $OUT/run.sh there"
