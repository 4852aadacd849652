"""torch.optim.Adam and AdamW over many steps, and an EMA with warm-up, for test_torch_parity.

Input (safetensors, float64): p.<k> the initial parameters, g.<s>.<k> the gradient of parameter k
at step s, opts = [lr, beta1, beta2, eps, weight_decay, ema_decay, steps]. For each mode (adam:
L2 added to the gradient; adamw: decoupled decay) the script runs `steps` steps from the same
start and writes <mode>.p.<k> (the weights), <mode>.m.<k> and <mode>.v.<k> (the moments, from
the optimiser's state) and <mode>.ema.<k>: shadow = d shadow + (1 - d) w after every step, with
d = min(decay, (1 + n) / (10 + n)) after n updates (diffusers' EMAModel warm-up).
"""
import sys

import torch

import safetensors_io as st


def main(inp, out):
    torch.set_num_threads(1)
    d = st.load(inp)
    lr, b1, b2, eps, wd, ema_decay, steps = d["opts"].tolist()
    steps = int(steps)
    names = sorted(k[2:] for k in d if k.startswith("p."))
    res = {}
    for mode, cls in (("adam", torch.optim.Adam), ("adamw", torch.optim.AdamW)):
        params = [d["p." + k].clone().requires_grad_(True) for k in names]
        opt = cls(params, lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd)
        ema = [p.detach().clone() for p in params]
        for s in range(steps):
            for p, k in zip(params, names):
                p.grad = d["g.%d.%s" % (s, k)].clone()
            opt.step()
            decay = min(ema_decay, (1.0 + s) / (10.0 + s))
            with torch.no_grad():
                for e, p in zip(ema, params):
                    e.mul_(decay).add_(p, alpha=1.0 - decay)
        for p, e, k in zip(params, ema, names):
            res["%s.p.%s" % (mode, k)] = p.detach()
            res["%s.m.%s" % (mode, k)] = opt.state[p]["exp_avg"]
            res["%s.v.%s" % (mode, k)] = opt.state[p]["exp_avg_sq"]
            res["%s.ema.%s" % (mode, k)] = e
    st.save(res, out)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
