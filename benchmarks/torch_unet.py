#!/usr/bin/python3
"""PyTorch side of benchmarks/bench_unet.cpp, on the reference U-Net definitions
(tests/torch/unet_ref.py): MNIST16 (no attention) train step at batch 128 with
Adam, its forward at batch 64 without gradients, a whole DDPM sampling run of
64 images x 200 steps (clipped x0, fixed-large variance, as diffuse samples), CIFAR-10 forward+backward at
batch 8 (train mode, dropout 0.1). Median wall times; peak RSS at the end.

    /usr/bin/python3 benchmarks/torch_unet.py [threads]     (default 2)
"""
import os
import resource
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "torch"))
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import unet_ref  # noqa: E402

torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 2)


def bench(fn, seconds, warm):
    for _ in range(warm):
        fn()
    ts, t0 = [], time.perf_counter()
    while time.perf_counter() - t0 < seconds or len(ts) < 5:
        a = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - a)
    return statistics.median(ts)


def cfg(**kw):
    c = dict(in_ch=1, out_ch=1, ch=32, ch_mult=[1, 2, 2], num_res_blocks=2, attn_resolutions=[], dropout=0.0,
             groups=8, resolution=16, mid_attn=False, attn_only_first=False)
    c.update(kw)
    return c


def schedule(T):
    b = torch.linspace(1e-4 * 1000 / T, 0.02 * 1000 / T, T, dtype=torch.float64)
    abar = torch.cumprod(1 - b, 0)
    return abar.sqrt().float(), (1 - abar).sqrt().float()


torch.manual_seed(0)
m = unet_ref.build(cfg())
opt = torch.optim.Adam(m.parameters(), lr=2e-4)
sa, s1 = schedule(200)
x0 = torch.randn(128, 1, 16, 16)


def mnist_step():
    t = torch.randint(0, 200, (128,))
    e = torch.randn_like(x0)
    loss = F.mse_loss(m(sa[t].view(-1, 1, 1, 1) * x0 + s1[t].view(-1, 1, 1, 1) * e, t), e)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


train = bench(mnist_step, 10, 3)
m.eval()
x64, t64 = torch.randn(64, 1, 16, 16), torch.full((64,), 100)
with torch.no_grad():
    fwd = bench(lambda: m(x64, t64), 5, 2)


def ddpm_sample(model, T, shape):
    # The same update as diffuse's ddpm_step with clip_x0 and fixed-large variance.
    b = torch.linspace(1e-4 * 1000 / T, 0.02 * 1000 / T, T, dtype=torch.float64)
    a = 1 - b
    abar = torch.cumprod(a, 0)
    abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
    post_var = b * (1 - abar_prev) / (1 - abar)
    c1 = b * abar_prev.sqrt() / (1 - abar)
    c2 = (1 - abar_prev) * a.sqrt() / (1 - abar)
    x = torch.randn(shape)
    with torch.no_grad():
        for t in range(T - 1, -1, -1):
            eps = model(x, torch.full((shape[0],), t))
            x0 = ((x - (1 - abar[t]).sqrt().item() * eps) / abar[t].sqrt().item()).clamp(-1, 1)
            x = c1[t].item() * x0 + c2[t].item() * x
            if t > 0:
                var = b[t].item()
                x = x + var ** 0.5 * torch.randn_like(x)
    return x


a = time.perf_counter()
ddpm_sample(m, 200, (64, 1, 16, 16))
sample = time.perf_counter() - a

c = unet_ref.build(cfg(in_ch=3, out_ch=3, ch=128, ch_mult=[1, 2, 2, 2], attn_resolutions=[16], dropout=0.1,
                       groups=32, resolution=32, mid_attn=True)).train()
sa, s1 = schedule(1000)
xc = torch.randn(8, 3, 32, 32)


def cifar_step():
    t = torch.randint(0, 1000, (8,))
    e = torch.randn_like(xc)
    loss = F.mse_loss(c(sa[t].view(-1, 1, 1, 1) * xc + s1[t].view(-1, 1, 1, 1) * e, t), e)
    c.zero_grad(set_to_none=True)
    loss.backward()


cifar = bench(cifar_step, 15, 2)
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(f"torch {torch.__version__} threads {torch.get_num_threads()}: MNIST16 train step b128 {train * 1e3:.1f} ms, "
      f"forward b64 no-grad {fwd * 1e3:.1f} ms, sample 64x200 {sample:.2f} s, CIFAR10 fwd+bwd b8 {cifar * 1e3:.0f} ms, peak RSS {rss:.0f} MiB")
