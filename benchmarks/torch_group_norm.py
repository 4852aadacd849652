#!/usr/bin/python3
"""PyTorch side of benchmarks/bench_group_norm.cpp: F.group_norm (+ F.silu) at
the same shapes (NCHW), forward and forward+backward, median wall time.

    /usr/bin/python3 benchmarks/torch_group_norm.py [threads]      (default 2)
"""
import statistics
import sys
import time

import torch
import torch.nn.functional as F

torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 2)
SHAPES = [(128, 16, 32, 8, 1), (128, 8, 64, 8, 1), (8, 32, 128, 32, 1), (8, 16, 256, 32, 1), (8, 16, 256, 32, 0)]


def bench(fn, seconds=2.0, warm=3):
    for _ in range(warm):
        fn()
    ts, t0 = [], time.perf_counter()
    while time.perf_counter() - t0 < seconds or len(ts) < 5:
        a = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - a)
    return statistics.median(ts)


for N, HW, C, G, silu in SHAPES:
    x = torch.randn(N, C, HW, HW, requires_grad=True)
    w = torch.randn(C, requires_grad=True)
    b = torch.randn(C, requires_grad=True)

    def f():
        y = F.group_norm(x, G, w, b, 1e-6)
        return F.silu(y) if silu else y

    def fwd():
        with torch.no_grad():
            f()

    def fwd_bwd():
        x.grad = w.grad = b.grad = None
        f().sum().backward()

    print(f"N:{N}/HW:{HW}/C:{C}/G:{G}/silu:{silu}  forward {bench(fwd) * 1e3:.3f} ms  "
          f"forward+backward {bench(fwd_bwd) * 1e3:.3f} ms", flush=True)
