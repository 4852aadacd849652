#!/usr/bin/python3
"""PyTorch side of benchmarks/bench_conv.cpp: the same convolution shapes,
forward and forward+backward, median wall time, GFLOP/s on the same count.

    /usr/bin/python3 benchmarks/torch_conv.py [threads]      (default 2)
"""
import statistics
import sys
import time

import torch
import torch.nn.functional as F

torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 2)
SHAPES = [(128, 16, 32, 32, 3, 1), (128, 8, 64, 64, 3, 1), (128, 16, 64, 32, 1, 1),
          (8, 32, 128, 128, 3, 1), (8, 16, 256, 256, 3, 1), (8, 32, 128, 128, 3, 2)]


def bench(fn, seconds=2.0, warm=3):
    for _ in range(warm):
        fn()
    ts, t0 = [], time.perf_counter()
    while time.perf_counter() - t0 < seconds or len(ts) < 5:
        a = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - a)
    return statistics.median(ts)


for N, HW, C, O, k, s in SHAPES:
    pad = k // 2
    x = torch.randn(N, C, HW, HW, requires_grad=True)
    w = torch.randn(O, C, k, k, requires_grad=True)
    b = torch.randn(O, requires_grad=True)
    Ho = (HW + 2 * pad - k) // s + 1
    flops = 2.0 * N * Ho * Ho * O * C * k * k

    def fwd():
        with torch.no_grad():
            F.conv2d(x, w, b, stride=s, padding=pad)

    def fwd_bwd():
        x.grad = w.grad = b.grad = None
        F.conv2d(x, w, b, stride=s, padding=pad).sum().backward()

    tf, tb = bench(fwd), bench(fwd_bwd)
    print(f"N:{N}/HW:{HW}/C:{C}/O:{O}/k:{k}/s:{s}  forward {tf * 1e3:.2f} ms ({flops / tf * 1e-9:.1f} GFLOP/s)  "
          f"forward+backward {tb * 1e3:.2f} ms ({3 * flops / tb * 1e-9:.1f} GFLOP/s)", flush=True)
