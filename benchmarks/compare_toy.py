"""diffuse vs PyTorch on the toy 2-D model, interleaved on the same machine.

    /usr/bin/python3 benchmarks/compare_toy.py [--rounds 5] [--bench build/benchmarks/bench_2d]

Each round runs bench_2d (Google Benchmark, real time) and then
benchmarks/torch_toy.py (median step); alternating the two spreads a noisy
host's slow periods over both. Prints every round and the median of the
per-round ratios (PyTorch time / diffuse time), the number docs/performance.md reports.
"""
import argparse
import json
import os
import re
import statistics
import subprocess
import sys

here = os.path.dirname(os.path.abspath(__file__))
ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("--rounds", type=int, default=5)
ap.add_argument("--bench", default=os.path.join(here, "..", "build", "benchmarks", "bench_2d"))
ap.add_argument("--threads", type=int, default=2)
args = ap.parse_args()
if not os.access(args.bench, os.X_OK):
    sys.exit(f"compare_toy: error: no benchmark binary at {args.bench} (build the bench_2d target)")

train, sample = [], []
for r in range(args.rounds):
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    out = subprocess.run([args.bench, "--benchmark_min_time=3", "--benchmark_format=json"], env=env,
                         check=True, capture_output=True, text=True).stdout
    ours = {b["name"].split("/")[0]: b["real_time"] for b in json.loads(out)["benchmarks"]}  # ms
    out = subprocess.run([sys.executable, os.path.join(here, "torch_toy.py"), str(args.threads)], check=True,
                         capture_output=True, text=True).stdout
    m = re.search(r"train step ([0-9.]+) ms .* sample 2000x200 ([0-9.]+) ms", out)
    torch_step, torch_sample = float(m.group(1)), float(m.group(2))
    d_step, d_sample = ours["BM_Toy2D_TrainStep"], ours["BM_Toy2D_Sample2000x200"]
    train.append(torch_step / d_step)
    sample.append(torch_sample / d_sample)
    print(f"round {r + 1}: train step diffuse {d_step:.2f} ms, torch {torch_step:.2f} ms, ratio {train[-1]:.2f}x | "
          f"sample diffuse {d_sample:.0f} ms, torch {torch_sample:.0f} ms, ratio {sample[-1]:.2f}x", flush=True)
print(f"median ratio over {args.rounds} rounds: train step {statistics.median(train):.2f}x, "
      f"sampling {statistics.median(sample):.2f}x (PyTorch time / diffuse time)")
