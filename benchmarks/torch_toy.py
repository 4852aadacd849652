#!/usr/bin/python3
"""Times the PyTorch version of the toy 2-D model, for the side-by-side ratio in
docs/performance.md: train step (batch 1024, 3x128 hidden, SiLU, temb 128, T=200, Adam)
and sampling 2,000 points x 200 steps. Run with Debian's python3-torch; 2 threads.
Install libopenblas0-openmp first: with the reference libblas, Linear is 10-25x slower."""
import math, statistics, sys, time
import torch, torch.nn as nn

torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 2)
torch.manual_seed(0)

def temb(t, dim):
    half = dim // 2
    f = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / (half - 1))
    a = t.float()[:, None] * f[None, :]
    return torch.cat([torch.sin(a), torch.cos(a)], 1)

net = nn.Sequential(nn.Linear(130, 128), nn.SiLU(), nn.Linear(128, 128), nn.SiLU(),
                    nn.Linear(128, 128), nn.SiLU(), nn.Linear(128, 2))
model = lambda x, t: net(torch.cat([x, temb(t, 128)], 1))
T = 200
betas = torch.linspace(1e-4 * 1000 / T, 0.02 * 1000 / T, T, dtype=torch.float64)
abar = torch.cumprod(1 - betas, 0)
sa, s1 = abar.sqrt().float(), (1 - abar).sqrt().float()
opt = torch.optim.Adam(net.parameters(), lr=1e-3)

def data(n):
    k = torch.randint(0, 8, (n,)).float() * (2 * math.pi / 8)
    return torch.stack([k.cos(), k.sin()], 1) * 2 + 0.1 * torch.randn(n, 2)

def step():
    x0 = data(1024); t = torch.randint(0, T, (1024,)); e = torch.randn_like(x0)
    xt = sa[t][:, None] * x0 + s1[t][:, None] * e
    loss = ((model(xt, t) - e) ** 2).mean()
    opt.zero_grad(set_to_none=True); loss.backward(); opt.step()

def sample():
    with torch.no_grad():
        x = torch.randn(2000, 2)
        for t in reversed(range(T)):
            tt = torch.full((2000,), t, dtype=torch.long)
            x = (x - betas[t].float() / s1[t] * model(x, tt)) / (1 - betas[t].float()).sqrt()
            if t > 0: x = x + betas[t].float().sqrt() * torch.randn_like(x)

def bench(fn, seconds, warm):
    for _ in range(warm): fn()
    ts, t0 = [], time.perf_counter()
    while time.perf_counter() - t0 < seconds or len(ts) < 5:
        a = time.perf_counter(); fn(); ts.append(time.perf_counter() - a)
    return statistics.median(ts)

st = bench(step, 10, 20)
sm = bench(sample, 10, 1)
print(f"torch {torch.__version__} threads {torch.get_num_threads()}: train step {st*1e3:.3f} ms "
      f"({1/st:.0f} steps/s), sample 2000x200 {sm*1e3:.1f} ms")
