"""PyTorch reference for tests/test_unet.cpp: the DDPM U-Net exactly as the
project's reference defines it (copied from ../shared/reference/torch_reference.py,
classes ResBlock, AttnBlock, Downsample, Upsample, UNet; NCHW).

    unet_ref.py forward CFG IN OUT   IN: weights (the reference's names), "x" NCHW,
                                     "t" int32, "gy" (upstream gradient, NCHW).
                                     OUT: "out" and "grad.NAME" for every parameter
    unet_ref.py init CFG SEED X W R  a fresh reference model (torch.manual_seed(SEED),
                                     its own init): W its state dict, R its output
                                     "out" on "x", "t" from X
Several jobs may follow one another in one launch (`forward CFG IN OUT init CFG SEED X W R ...`):
starting torch costs a second or two, so each test runs python once.
CFG is JSON: ch, ch_mult, num_res_blocks, attn_resolutions, dropout, groups,
resolution, mid_attn, attn_only_first, in_ch, out_ch. Dropout runs in eval mode.
"""
import json
import math
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

import safetensors_io as st


EMB_DTYPE = torch.float32  # float64 for the double-precision comparison (set per job by run())


def timestep_embedding(t, dim):
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=EMB_DTYPE) / (half - 1))
    args = t.to(EMB_DTYPE)[:, None] * freqs[None, :]
    return torch.cat([torch.sin(args), torch.cos(args)], dim=1)



# ----------------------------------------------------------------------------- UNet
class ResBlock(nn.Module):
    def __init__(self, cin, cout, temb_dim, groups, dropout):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin, eps=1e-6)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.temb_proj = nn.Linear(temb_dim, cout)
        self.norm2 = nn.GroupNorm(groups, cout, eps=1e-6)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        nn.init.zeros_(self.conv2.weight); nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x, temb):
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.temb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class AttnBlock(nn.Module):
    def __init__(self, c, groups):
        super().__init__()
        self.norm = nn.GroupNorm(groups, c, eps=1e-6)
        self.q = nn.Conv2d(c, c, 1)
        self.k = nn.Conv2d(c, c, 1)
        self.v = nn.Conv2d(c, c, 1)
        self.proj = nn.Conv2d(c, c, 1)
        nn.init.zeros_(self.proj.weight); nn.init.zeros_(self.proj.bias)

    def forward(self, x):
        B, C, H, W = x.shape
        h = self.norm(x)
        q = self.q(h).reshape(B, C, H * W).permute(0, 2, 1)        # [B, HW, C]
        k = self.k(h).reshape(B, C, H * W)                           # [B, C, HW]
        v = self.v(h).reshape(B, C, H * W)                           # [B, C, HW]
        w = torch.softmax(torch.bmm(q, k) * (C ** -0.5), dim=-1)     # [B, HWq, HWk]
        h = torch.bmm(v, w.permute(0, 2, 1)).reshape(B, C, H, W)     # [B, C, HWq]
        return x + self.proj(h)


class Downsample(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2, padding=1)

    def forward(self, x):
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class UNet(nn.Module):
    def __init__(self, in_ch, out_ch, ch, ch_mult, num_res_blocks, attn_resolutions, dropout,
                 groups, resolution, mid_attn=True, attn_only_first=False, num_classes=0):
        super().__init__()
        self.ch, self.L, self.nrb = ch, len(ch_mult), num_res_blocks
        tdim = 4 * ch
        self.temb = nn.Sequential(nn.Linear(ch, tdim), nn.SiLU(), nn.Linear(tdim, tdim))
        # Class conditioning (not in the shared reference; diffuse's definition, written
        # out here to test it): a learned vector per class added to the time embedding,
        # row num_classes being the "null" class of classifier-free guidance.
        self.class_emb = nn.Embedding(num_classes + 1, tdim) if num_classes > 0 else None
        self.conv_in = nn.Conv2d(in_ch, ch, 3, padding=1)
        attn_budget = [1 if attn_only_first else 10 ** 9]

        def attn(c, r):
            if r in attn_resolutions and attn_budget[0] > 0:
                attn_budget[0] -= 1
                return AttnBlock(c, groups)
            return nn.Identity()

        hs_ch, cur, r = [ch], ch, resolution
        self.down = nn.ModuleList()      # L*nrb entries of [ResBlock, Attn|Identity]
        self.downsample = nn.ModuleList()
        for i, m in enumerate(ch_mult):
            for _ in range(num_res_blocks):
                self.down.append(nn.ModuleList([ResBlock(cur, ch * m, tdim, groups, dropout), attn(ch * m, r)]))
                cur = ch * m
                hs_ch.append(cur)
            if i != self.L - 1:
                self.downsample.append(Downsample(cur))
                hs_ch.append(cur)
                r //= 2
        self.mid1 = ResBlock(cur, cur, tdim, groups, dropout)
        self.mid_attn = AttnBlock(cur, groups) if mid_attn else nn.Identity()
        self.mid2 = ResBlock(cur, cur, tdim, groups, dropout)
        self.up = nn.ModuleList()        # L*(nrb+1) entries, in execution order
        self.upsample = nn.ModuleList()
        for i in reversed(range(self.L)):
            for _ in range(num_res_blocks + 1):
                cin = cur + hs_ch.pop()
                self.up.append(nn.ModuleList([ResBlock(cin, ch * ch_mult[i], tdim, groups, dropout),
                                              attn(ch * ch_mult[i], r)]))
                cur = ch * ch_mult[i]
            if i != 0:
                self.upsample.append(Upsample(cur))
                r *= 2
        assert not hs_ch
        self.norm_out = nn.GroupNorm(groups, cur, eps=1e-6)
        self.conv_out = nn.Conv2d(cur, out_ch, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight); nn.init.zeros_(self.conv_out.bias)

    def forward(self, x, t, y=None):
        temb = self.temb(timestep_embedding(t, self.ch))
        if self.class_emb is not None:
            temb = temb + self.class_emb(y)
        hs = [self.conv_in(x)]
        k = 0
        for i in range(self.L):
            for _ in range(self.nrb):
                res, at = self.down[k]; k += 1
                hs.append(at(res(hs[-1], temb)))
            if i != self.L - 1:
                hs.append(self.downsample[i](hs[-1]))
        h = self.mid2(self.mid_attn(self.mid1(hs[-1], temb)), temb)
        k, u = 0, 0
        for i in reversed(range(self.L)):
            for _ in range(self.nrb + 1):
                res, at = self.up[k]; k += 1
                h = at(res(torch.cat([h, hs.pop()], dim=1), temb))
            if i != 0:
                h = self.upsample[u](h); u += 1
        return self.conv_out(F.silu(self.norm_out(h)))



def build(cfg):
    return UNet(cfg["in_ch"], cfg["out_ch"], cfg["ch"], tuple(cfg["ch_mult"]), cfg["num_res_blocks"],
                tuple(cfg["attn_resolutions"]), cfg["dropout"], cfg["groups"], cfg["resolution"],
                mid_attn=cfg["mid_attn"], attn_only_first=cfg["attn_only_first"],
                num_classes=cfg.get("num_classes", 0))


def run(mode, args):
    global EMB_DTYPE
    EMB_DTYPE = torch.float32
    cfg = json.loads(args[0])
    if mode == "forward":
        d = st.load(args[1])
        model = build(cfg).eval()
        if d["x"].dtype == torch.float64:  # the double-precision comparison: the embedding too
            model = model.double()
            EMB_DTYPE = torch.float64
        model.load_state_dict({k: v for k, v in d.items() if k not in ("x", "t", "y", "gy")}, strict=True)
        out = model(d["x"], d["t"].long(), d["y"].long() if "y" in d else None)
        (out * d["gy"]).sum().backward()
        res = {"out": out}
        for name, p in model.named_parameters():
            res["grad." + name] = p.grad
        st.save(res, args[2])
    elif mode == "init":
        torch.manual_seed(int(args[1]))
        model = build(cfg).eval()
        d = st.load(args[2])
        with torch.no_grad():
            # The reference zero-initialises conv2, proj and conv_out; give them
            # values so the comparison exercises every layer.
            for name, p in model.named_parameters():
                if name.endswith(("conv2.weight", "proj.weight", "conv_out.weight")):
                    p.normal_(0, 0.05)
            out = model(d["x"], d["t"].long(), d["y"].long() if "y" in d else None)
        st.save(dict(model.state_dict()), args[3])
        st.save({"out": out}, args[4])


def main():
    torch.set_num_threads(2)
    argv = sys.argv[1:]
    nargs = {"forward": 3, "init": 5}
    while argv:
        mode = argv[0]
        if mode not in nargs or len(argv) < 1 + nargs[mode]:
            sys.exit("unet_ref.py: expected forward CFG IN OUT or init CFG SEED X W R, got " + " ".join(argv[:2]))
        run(mode, argv[1:1 + nargs[mode]])
        argv = argv[1 + nargs[mode]:]


if __name__ == "__main__":
    main()
