"""Two builds of diffuse (before and after a change) against PyTorch on the CPU, interleaved.

    /usr/bin/python3 benchmarks/compare_versions.py --before OLD/build --after build [--rounds 3]

Each round runs, in this order, bench_2d of the old build, of the new build, benchmarks/torch_toy.py,
then bench_unet of the old build, of the new, and benchmarks/torch_unet.py (2 threads each), so a
noisy host's slow periods spread over all three. Prints each round's times and the range of the
ratios PyTorch time / diffuse time for both builds over the rounds: the numbers docs/performance.md
reports. Takes about 6 minutes a round on 2 cores.
"""
import argparse
import json
import os
import re
import subprocess
import sys

here = os.path.dirname(os.path.abspath(__file__))
ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("--before", required=True, help="build directory of the old version")
ap.add_argument("--after", required=True, help="build directory of the new version")
ap.add_argument("--rounds", type=int, default=3)
ap.add_argument("--threads", type=int, default=2)
args = ap.parse_args()
env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))


def bench(build, name):
    exe = os.path.join(build, "benchmarks", name)
    if not os.access(exe, os.X_OK):
        sys.exit(f"compare_versions: error: no {exe} (build the {name} target there)")
    out = subprocess.run([exe, "--benchmark_format=json"], env=env, check=True, capture_output=True, text=True).stdout
    return {b["name"].split("/")[0]: b["real_time"] for b in json.loads(out)["benchmarks"]}


def torch(script, pattern):
    out = subprocess.run([sys.executable, os.path.join(here, script), str(args.threads)], check=True,
                         capture_output=True, text=True).stdout
    m = re.search(pattern, out)
    if not m:
        sys.exit(f"compare_versions: error: unexpected output of {script}: {out}")
    return [float(g) for g in m.groups()]


# (label, diffuse benchmark, its unit factor to ms, PyTorch's value to ms)
rows = [("toy 2-D train step (ms)", "BM_Toy2D_TrainStep"), ("toy 2-D sampling 2000x200 (ms)", "BM_Toy2D_Sample2000x200"),
        ("MNIST16 train step b128 (ms)", "BM_MNIST16_TrainStep"), ("MNIST16 forward b64 no grad (ms)", "BM_MNIST16_ForwardNoGrad"),
        ("MNIST16 sampling 64x200 (ms)", "BM_MNIST16_Sample64x200"), ("CIFAR-10 forward+backward b8 (ms)", "BM_CIFAR10_ForwardBackward")]
ratios = {r[0]: ([], []) for r in rows}
for r in range(args.rounds):
    old2, new2 = bench(args.before, "bench_2d"), bench(args.after, "bench_2d")
    t_step, t_sample = torch("torch_toy.py", r"train step ([0-9.]+) ms .* sample 2000x200 ([0-9.]+) ms")
    oldu, newu = bench(args.before, "bench_unet"), bench(args.after, "bench_unet")
    t_train, t_fwd, t_samp, t_cifar = torch(
        "torch_unet.py", r"train step b128 ([0-9.]+) ms, forward b64 no-grad ([0-9.]+) ms, sample 64x200 ([0-9.]+) s, "
        r"CIFAR10 fwd\+bwd b8 ([0-9.]+) ms")
    theirs = [t_step, t_sample, t_train, t_fwd, t_samp * 1e3, t_cifar]
    print(f"round {r + 1}:")
    for (label, name), pt in zip(rows, theirs):
        o = (old2 if name.startswith("BM_Toy") else oldu)[name]
        n = (new2 if name.startswith("BM_Toy") else newu)[name]
        ratios[label][0].append(pt / o)
        ratios[label][1].append(pt / n)
        print(f"  {label:36s} before {o:9.2f}  after {n:9.2f}  PyTorch {pt:9.2f}  ratio before {pt / o:.2f}x  "
              f"after {pt / n:.2f}x", flush=True)
print(f"over {args.rounds} rounds, PyTorch time / diffuse time (min-max):")
for label, (b, a) in ratios.items():
    print(f"  {label:36s} before {min(b):.2f}-{max(b):.2f}x  after {min(a):.2f}-{max(a):.2f}x")
