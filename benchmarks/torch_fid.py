#!/usr/bin/python3
"""PyTorch side of benchmarks/bench_fid.cpp: pytorch-fid's InceptionV3 (built
from torchvision's blocks by tests/torch/inception_ref.py, random weights) on
batches of 32x32 images in [0, 1], resize to 299 included, eval mode, no_grad.
Median wall time over >= 5 s per batch size; images/s.

    /usr/bin/python3 benchmarks/torch_fid.py [threads]      (default 2)
"""
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "torch"))
import inception_ref  # noqa: E402

torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 2)
net = inception_ref.fid_inception().eval()
for B in (1, 50):
    x = torch.rand(B, 3, 32, 32)

    def fwd():
        with torch.no_grad():
            inception_ref.pool_features(net, x)

    for _ in range(2):
        fwd()
    ts, t0 = [], time.perf_counter()
    while time.perf_counter() - t0 < 5.0 or len(ts) < 3:
        a = time.perf_counter()
        fwd()
        ts.append(time.perf_counter() - a)
    m = statistics.median(ts)
    print(f"torch FID Inception batch {B}: {m * 1e3:.1f} ms  {B / m:.2f} images/s")
