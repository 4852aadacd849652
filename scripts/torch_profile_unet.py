#!/usr/bin/env python3
"""Where PyTorch's U-Net train step spends its GPU time, by kernel: the peer of
`bench_unet_cuda --profile` (our time by op kind), for comparing the two op by op.

    python3 scripts/torch_profile_unet.py [--reference DIR] [--model cifar|mnist] [--batch 128]
                                          [--modes fp32,tf32] [--steps 5] [--top 25]

DIR holds torch_reference.py (default: ../shared/reference, or this script's folder). The step is
the one torch_gpu_reference.py times (channels_last, fused Adam). Needs a CUDA device.
"""
import argparse
import os
import sys


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    here = os.path.dirname(os.path.abspath(__file__))
    p.add_argument("--reference", default=None, help="folder with torch_reference.py")
    p.add_argument("--model", default="cifar", choices=["cifar", "mnist"])
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--modes", default="fp32,tf32")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--top", type=int, default=25)
    a = p.parse_args()
    for d in [a.reference, os.path.join(here, "..", "..", "shared", "reference"), here]:
        if d and os.path.exists(os.path.join(d, "torch_reference.py")):
            sys.path.insert(0, d)
            break
    else:
        sys.exit("torch_profile_unet.py: torch_reference.py not found (use --reference DIR)")
    import torch
    import torch.nn.functional as F
    from torch.profiler import ProfilerActivity, profile
    from torch_reference import Schedule, cifar_unet, mnist_unet

    if not torch.cuda.is_available():
        sys.exit("torch_profile_unet.py: no CUDA device visible to PyTorch")
    dev = torch.device("cuda")
    torch.manual_seed(0)
    for mode in a.modes.split(","):
        torch.backends.cuda.matmul.allow_tf32 = mode == "tf32"
        torch.backends.cudnn.allow_tf32 = mode == "tf32"
        model = (cifar_unet() if a.model == "cifar" else mnist_unet()).to(dev).to(memory_format=torch.channels_last)
        sched = Schedule(1000 if a.model == "cifar" else 200)
        for k in ("betas", "alphas", "sqrt_abar", "sqrt_1m_abar"):
            setattr(sched, k, getattr(sched, k).to(dev))
        opt = torch.optim.Adam(model.parameters(), lr=2e-4, fused=True)
        res, ch = (32, 3) if a.model == "cifar" else (16, 1)
        x0 = torch.randn(a.batch, ch, res, res, device=dev).to(memory_format=torch.channels_last)

        def step():
            t = torch.randint(0, sched.T, (a.batch,), device=dev)
            eps = torch.randn_like(x0)
            loss = F.mse_loss(model(sched.q_sample(x0, t, eps), t), eps)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        for _ in range(5):
            step()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(a.steps):
                step()
            torch.cuda.synchronize()
        events = prof.key_averages()

        def dev_us(e):  # device_time_total since torch 2.4, cuda_time_total before
            return getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        total = sum(dev_us(e) for e in events) / a.steps / 1e3
        print(f"\n== torch {torch.__version__} {a.model} {mode} batch {a.batch}: {total:.2f} ms/step of GPU kernels")
        rows = sorted(events, key=lambda e: -dev_us(e))[: a.top]
        for e in rows:
            ms = dev_us(e) / a.steps / 1e3
            print(f"{ms:9.3f} ms {e.count / a.steps:7.1f}x  {e.key[:110]}")


if __name__ == "__main__":
    main()
