#!/usr/bin/env bash
# scripts/gpu_bundle.sh: build the GPU tests and benchmarks HERE (a machine with nvcc, cuBLAS,
# cuDNN and the project's Debian dependencies, no GPU needed) for one architecture, and pack them
# with a runner into a folder to copy to a GPU machine that cannot build the project itself (the
# lent GPU machines have the CUDA libraries and a driver but not Catch2 or stb, and no network).
#
#   scripts/gpu_bundle.sh [--arch 90] [--out build-gpubin] [--jobs N]
#   ... copy the folder to the GPU machine, then there:
#   build-gpubin/run.sh [OUTDIR]        # tests, then benchmarks; logs and summary.txt in OUTDIR
#   BUDGET=900 build-gpubin/run.sh ...  # steps start until BUDGET seconds (default 480), most important first
#
# What it packs: test_kernels_cuda, test_cuda_memory, test_backend_ops_cuda, test_backend_models_cuda
# (the CUDA tests: every kernel and every op against the CPU backend, device memory, the library's
# models and one written in the test trained on both devices, data-parallel training with one
# rank over NCCL against the plain loop), bench_kernels_cuda, bench_unet_cuda
# (also --profile: device time by backend entry),
# libbenchmark (the GPU machine may lack it), train_2d (cpu vs cuda, resume across devices),
# train_mnist and sample with the MNIST files of data/mnist when there (20 steps on the CPU and on
# the GPU, same seed: the progress lines' losses should agree; then the GPU's checkpoint resumed
# on both, and sampled on both; the default run in fp32 and bf16 for quality), train_cifar10
# (paper preset: FP32, TF32, TF32 with the fused attention, BF16 with and without it; small preset), the PyTorch peer script from ../shared/reference (fp32, tf32, bf16
# autocast, bf16 + torch.compile) and
# scripts/torch_profile_unet.py (PyTorch's GPU time by kernel). scripts/gpu_check.sh is the
# one-step alternative where the GPU machine can build everything.
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
    -h|--help) sed -n '2,24p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu_bundle.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
BUILD=build-gpu-sm$ARCH
TARGETS=(test_kernels_cuda test_cuda_memory test_backend_ops_cuda test_backend_models_cuda bench_kernels_cuda bench_unet_cuda
         train_mnist sample train_2d fid train_cifar10)
# Without MPI: the GPU machine has no Open MPI to start ranks or to load libmpi from (data
# parallelism runs there with one rank: NCCL through SingleProcess, test_backend_models_cuda).
cmake -S . -B "$BUILD" -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_ARCHITECTURES="$ARCH" -DDIFFUSE_NATIVE=OFF \
      -DDIFFUSE_MPI=OFF >/dev/null
cmake --build "$BUILD" -j"$JOBS" --target "${TARGETS[@]}"
rm -rf "$OUT"
mkdir -p "$OUT"
cp "$BUILD"/tests/test_kernels_cuda "$BUILD"/tests/test_cuda_memory "$BUILD"/tests/test_backend_ops_cuda \
   "$BUILD"/tests/test_backend_models_cuda "$OUT"/
cp "$BUILD"/benchmarks/bench_kernels_cuda "$BUILD"/benchmarks/bench_unet_cuda "$BUILD"/examples/train_mnist "$BUILD"/examples/sample "$BUILD"/examples/train_2d "$BUILD"/examples/fid "$BUILD"/examples/train_cifar10 "$OUT"/
if compgen -G "data/mnist/*-ubyte.gz" >/dev/null; then  # scripts/get_mnist.sh made them: train_mnist cpu vs cuda
  mkdir -p "$OUT"/mnist
  cp data/mnist/*-ubyte.gz "$OUT"/mnist/
  cp data/mnist/lenet*.safetensors "$OUT"/mnist/ 2>/dev/null || true  # the scorer, when trained here
fi
lib=$(ldd "$OUT"/bench_unet_cuda | awk '/libbenchmark/ {print $3}')
[[ -n $lib ]] && cp "$lib" "$OUT"/
for l in libminizip libarchive libturbojpeg; do  # .npz, .tar.gz, JPEG: the GPU machine may lack them
  lib=$(ldd "$OUT"/fid | awk -v l="$l" '$0 ~ l {print $3}')
  [[ -n $lib ]] && cp "$lib" "$OUT"/
done
for f in torch_gpu_reference.py torch_reference.py; do
  [[ -f ../shared/reference/$f ]] && cp "../shared/reference/$f" "$OUT"/
done
cp scripts/torch_profile_unet.py "$OUT"/
# ../shared/reference/torch_reference.py makes the timestep embedding's freqs on the CPU, which
# fails for a model on a GPU; the bundled copy makes them on t's device (nothing else changes).
[[ -f $OUT/torch_reference.py ]] &&
  sed -i 's/torch.arange(half, dtype=torch.float32)/torch.arange(half, dtype=torch.float32, device=t.device)/' \
    "$OUT"/torch_reference.py
cat > "$OUT"/run.sh <<'RUN'
#!/bin/bash
# Runs the bundled GPU tests and benchmarks (built by scripts/gpu_bundle.sh); logs into $1 or ./logs.
cd "$(dirname "$0")"
LOG=${1:-logs}
mkdir -p "$LOG"
export LD_LIBRARY_PATH=$PWD:${LD_LIBRARY_PATH:-}
# NCCL (libnccl.so.2, linked by every CUDA program): the machine's, else PyTorch's wheel's.
if ! ldconfig -p | grep -q libnccl.so.2; then
  nccl=$(python3 -c "import nvidia.nccl, os; print(os.path.join(list(nvidia.nccl.__path__)[0], 'lib'))" 2>/dev/null)
  [[ -n $nccl ]] && export LD_LIBRARY_PATH=$nccl:$LD_LIBRARY_PATH
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$LOG"/summary.txt
ldd ./test_backend_models_cuda | grep -E "nccl|not found" | tee -a "$LOG"/summary.txt
# A lent machine gives a session about 15 minutes, one call at most 10: the steps run most
# important first (the native tests, then ours beside PyTorch's for issue 18's goals, then the
# profiles, then the trainers), and a step that would start after BUDGET seconds (default 480)
# is skipped with a line in summary.txt, so what ran always comes back.
BUDGET=${BUDGET:-480}
T0=$EPOCHREALTIME
step() {  # log-name command...
  local name=$1 s=$EPOCHREALTIME rc
  shift
  if awk "BEGIN{exit !($EPOCHREALTIME - $T0 > $BUDGET)}"; then
    echo "$name: skipped (past the ${BUDGET} s budget)" | tee -a "$LOG"/summary.txt
    return 0
  fi
  timeout 300 "$@" > "$LOG/$name.log" 2>&1; rc=$?
  echo "$name: rc=$rc, $(awk "BEGIN{printf \"%.1f\", $EPOCHREALTIME - $s}") s: $(tail -n 1 "$LOG/$name.log" | head -c 160)" | tee -a "$LOG"/summary.txt
}
for t in test_kernels_cuda test_cuda_memory test_backend_ops_cuda test_backend_models_cuda; do step "$t" ./"$t" -r compact; done
# Issue 18's comparison first: our train step (TF32 and bf16, timed convolutions, both attention
# kernels) and the library's whole loop, then PyTorch's fp32/tf32/bf16 autocast and bf16 +
# torch.compile on the same card; then ours again (the card's clocks drift: a second round).
key='BM_unet_train_step/[01]/128/[12]/1/[01]|BM_unet_train_loop'
have_torch=0
[[ -f torch_gpu_reference.py ]] && python3 -c "import torch" 2>/dev/null && have_torch=1
step bench_unet_key ./bench_unet_cuda --benchmark_counters_tabular=true --benchmark_filter="$key"
if ((have_torch)); then
  step torch_unet_mnist python3 torch_gpu_reference.py unet --model mnist --batch 128 --modes fp32,tf32,bf16 --iters 10
  step torch_unet_cifar python3 torch_gpu_reference.py unet --model cifar --batch 128 --modes fp32,tf32,bf16 --iters 5
  # What a PyTorch user would run: bf16 autocast with torch.compile (the goal of issue 18).
  step torch_unet_cifar_compile python3 torch_gpu_reference.py unet --model cifar --batch 128 --modes bf16-compile --iters 5
  step torch_unet_mnist_compile python3 torch_gpu_reference.py unet --model mnist --batch 128 --modes bf16-compile --iters 10
fi
step bench_unet_key_round2 ./bench_unet_cuda --benchmark_counters_tabular=true --benchmark_filter="$key"
step bench_unet_profile ./bench_unet_cuda --profile
((have_torch)) && step torch_profile_cifar python3 torch_profile_unet.py --model cifar --modes fp32,tf32
step bench_kernels_cuda ./bench_kernels_cuda --benchmark_min_time=0.05
((have_torch)) && step torch_kernels python3 torch_gpu_reference.py kernels
step bench_unet_cuda ./bench_unet_cuda --benchmark_counters_tabular=true --benchmark_filter="-$key"
if [[ -d mnist ]]; then
  common=(--data mnist --samples 0 --seed 3 --warmup 5 --save-every 0 --steps 20 --log-every 5)
  step train_mnist_cpu ./train_mnist --device cpu "${common[@]}" --out "$LOG"/train_cpu
  step train_mnist_cuda ./train_mnist --device cuda "${common[@]}" --out "$LOG"/train_cuda
  # The same run with the step captured into a CUDA graph (issue 18): the same losses (up to
  # cuDNN's run-to-run rounding), and the capture's message.
  step train_mnist_cuda_graph ./train_mnist --device cuda --cuda-graph "${common[@]}" --out "$LOG"/train_cuda_graph
  grep -h "^step\|cuda-graph" "$LOG"/train_mnist_cpu.log "$LOG"/train_mnist_cuda.log "$LOG"/train_mnist_cuda_graph.log | tee -a "$LOG"/summary.txt
  # The same checkpoint continues on either device: from the GPU's step 20 to 30 on each.
  more=(--data mnist --samples 0 --seed 3 --warmup 5 --save-every 0 --steps 30 --log-every 5)
  step resume_cuda ./train_mnist --device cuda "${more[@]}" --resume "$LOG"/train_cuda/checkpoint.safetensors --out "$LOG"/resume_cuda
  step resume_cpu ./train_mnist --device cpu "${more[@]}" --resume "$LOG"/train_cuda/checkpoint.safetensors --out "$LOG"/resume_cpu
  grep -h "^step" "$LOG"/resume_cuda.log "$LOG"/resume_cpu.log | tee -a "$LOG"/summary.txt
  # Issue 18's quality check: the default MNIST16 run (3,000 steps, 500 samples scored by LeNet
  # when mnist/lenet16.safetensors is there) in fp32 and in bf16, same seed.
  for p in fp32 bf16; do
    step mnist_quality_$p ./train_mnist --data mnist --device cuda --precision $p --seed 11 --out "$LOG"/mnist_$p
  done
  grep -h "accuracy\|FD\|img/s" "$LOG"/mnist_quality_*.log | tail -n 8 | tee -a "$LOG"/summary.txt
  # Sampling from that checkpoint with the network on either device: the same images.
  for d in cpu cuda; do
    step sample_$d ./sample "$LOG"/train_cuda/checkpoint.safetensors --device $d -n 20 --batch 20 --seed 5 --out "$LOG"/sample_$d
  done
  python3 -c "
import numpy as np, sys
a, b = (np.load(sys.argv[i]).astype(int) for i in (1, 2))
d = abs(a - b)
print(f'samples cpu vs cuda: {a.size} pixels, max |diff| {d.max()}, mean {d.mean():.4f}, differing by more than 2: {(d > 2).mean():.4%}')
" "$LOG"/sample_cpu/samples.npy "$LOG"/sample_cuda/samples.npy 2>&1 | tee -a "$LOG"/summary.txt
fi
# train_2d on either device, same seed; then the GPU's checkpoint continued on both.
t2d=(--steps 2000 --log-every 500 --seed 4)
step train_2d_cpu ./train_2d --device cpu "${t2d[@]}" --out "$LOG"/t2d_cpu
step train_2d_cuda ./train_2d --device cuda "${t2d[@]}" --out "$LOG"/t2d_cuda
grep -h "^step\|samples/floor" "$LOG"/train_2d_cpu.log "$LOG"/train_2d_cuda.log | tee -a "$LOG"/summary.txt
for d in cpu cuda; do
  step train_2d_resume_$d ./train_2d --device $d --steps 2500 --log-every 500 --seed 4 \
    --resume "$LOG"/t2d_cuda/checkpoint.safetensors --out "$LOG"/t2d_resume_$d
done
grep -h "^step   \+2500\|samples/floor" "$LOG"/train_2d_resume_cpu.log "$LOG"/train_2d_resume_cuda.log | tee -a "$LOG"/summary.txt
# train_cifar10's presets on the GPU (images/s in the progress lines), on random 32x32 images:
# no CIFAR-10 on the machine.
if python3 -c "import numpy" 2>/dev/null; then
  python3 -c "import numpy as np; np.save('$LOG/rand32.npy', np.random.default_rng(0).integers(0, 256, (2048, 32, 32, 3), dtype=np.uint8))"
  c10=(--data "$LOG"/rand32.npy --samples 0 --save-every 0 --log-every 20 --device cuda)
  step cifar10_paper_fp32 ./train_cifar10 --preset paper --steps 60 "${c10[@]}" --out "$LOG"/c10_paper
  step cifar10_paper_tf32 ./train_cifar10 --preset paper --steps 100 --tf32 "${c10[@]}" --out "$LOG"/c10_paper_tf32
  step cifar10_paper_tf32_flash ./train_cifar10 --preset paper --steps 100 --tf32 --attention flash "${c10[@]}" --out "$LOG"/c10_paper_flash
  step cifar10_paper_bf16 ./train_cifar10 --preset paper --steps 100 --precision bf16 "${c10[@]}" --out "$LOG"/c10_paper_bf16
  step cifar10_paper_bf16_flash ./train_cifar10 --preset paper --steps 100 --precision bf16 --attention flash "${c10[@]}" --out "$LOG"/c10_paper_bf16_flash
  step cifar10_small_tf32 ./train_cifar10 --preset small --steps 200 --tf32 "${c10[@]}" --out "$LOG"/c10_small_tf32
  grep -h "^step" "$LOG"/cifar10_*.log | tee -a "$LOG"/summary.txt
fi
RUN
chmod +x "$OUT"/run.sh
du -sh "$OUT"
echo "gpu_bundle.sh: copy $OUT to the GPU machine and run $OUT/run.sh there"
