#!/usr/bin/env python3
"""PyTorch's peer of `mpirun -np N train_mnist`: the reference MNIST16 U-Net trained with
DistributedDataParallel on N CPU processes (gloo), the same step as the library's loop (t and eps
drawn, MSE to eps, backward with DDP's bucketed all-reduce, gradient clipping at 1, Adam, an EMA of
the weights), the whole batch shared out over the ranks. Prints images/s of the whole batch.

  /usr/bin/python3 scripts/torch_ddp_mnist.py [--ranks 2] [--batch 128] [--steps 40] [--threads 1]
                                               [--reference DIR]

DIR holds torch_reference.py (default: ../shared/reference, or this script's folder). With
--ranks 1 it trains one process without DDP (the single-process baseline).
"""
import argparse
import os
import sys
import time


def worker(rank, a):
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch_reference import Schedule, mnist_unet

    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    if a.ranks > 1:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(a.port))
        dist.init_process_group("gloo", rank=rank, world_size=a.ranks)
    model = mnist_unet()
    net = torch.nn.parallel.DistributedDataParallel(model) if a.ranks > 1 else model
    sched = Schedule(200)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    ema = [p.detach().clone() for p in model.parameters()]
    b = a.batch // a.ranks
    x0 = torch.randn(b, 1, 16, 16)

    def step():
        t = torch.randint(0, sched.T, (b,))
        eps = torch.randn_like(x0)
        loss = F.mse_loss(net(sched.q_sample(x0, t, eps), t), eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            torch._foreach_mul_(ema, 0.999)
            torch._foreach_add_(ema, list(model.parameters()), alpha=0.001)

    for _ in range(3):
        step()
    if a.ranks > 1:
        dist.barrier()
    t0 = time.perf_counter()
    for _ in range(a.steps):
        step()
    if a.ranks > 1:
        dist.barrier()
    dt = time.perf_counter() - t0
    if rank == 0:
        print(f"torch {torch.__version__}: MNIST16 U-Net, {a.ranks} rank(s) x {a.threads} thread(s), batch {a.batch} "
              f"({b} per rank): {a.steps * a.batch / dt:.0f} images/s, {dt / a.steps * 1e3:.1f} ms per step")
    if a.ranks > 1:
        dist.destroy_process_group()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    p.add_argument("--port", type=int, default=29517)
    p.add_argument("--reference", default=None, help="folder of torch_reference.py")
    a = p.parse_args()
    if a.batch % a.ranks:
        sys.exit(f"torch_ddp_mnist.py: batch {a.batch} does not divide among {a.ranks} ranks")
    here = os.path.dirname(os.path.abspath(__file__))
    for d in [a.reference, os.path.join(here, "..", "..", "shared", "reference"), here]:
        if d and os.path.exists(os.path.join(d, "torch_reference.py")):
            sys.path.insert(0, d)
            break
    else:
        sys.exit("torch_ddp_mnist.py: torch_reference.py not found (give --reference DIR)")
    if a.ranks == 1:
        worker(0, a)
    else:
        import torch.multiprocessing as mp
        mp.spawn(worker, args=(a,), nprocs=a.ranks, join=True)


if __name__ == "__main__":
    main()
