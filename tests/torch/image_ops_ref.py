"""PyTorch reference for the image-op parity test (tests/test_image_ops.cpp).

Reads IN with, for each case i < ncases (prefix "case{i}."; images NCHW, float32):
  x [N,C,H,W], weight [C], bias [C], r [N,C,H,W], r_up [N,C,2H,2W], params (F64: groups, eps)
and writes OUT with, per case and for act in ("plain", "silu"):
  case{i}.{act}.out           y = GroupNorm(groups, C, eps)(x), then SiLU for "silu"
  case{i}.{act}.grad.x        d sum(y * r) / d x
  case{i}.{act}.grad.weight   ... / d weight
  case{i}.{act}.grad.bias     ... / d bias
  case{i}.up.out              F.interpolate(x, scale_factor=2, mode="nearest")
  case{i}.up.grad.x           d sum(up * r_up) / d x
"""
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

import safetensors_io as st


def main(inp, out):
    torch.set_num_threads(1)
    d = st.load(inp)
    res = {}
    for i in range(int(d["ncases"][0])):
        k = f"case{i}."
        x0, r = d[k + "x"], d[k + "r"]
        groups, eps = int(d[k + "params"][0]), float(d[k + "params"][1])
        for act in ("plain", "silu"):
            x = x0.clone().requires_grad_(True)
            gn = nn.GroupNorm(groups, x.shape[1], eps=eps)
            with torch.no_grad():
                gn.weight.copy_(d[k + "weight"])
                gn.bias.copy_(d[k + "bias"])
            y = gn(x)
            if act == "silu":
                y = F.silu(y)
            (y * r).sum().backward()
            res[f"{k}{act}.out"] = y
            res[f"{k}{act}.grad.x"] = x.grad
            res[f"{k}{act}.grad.weight"] = gn.weight.grad
            res[f"{k}{act}.grad.bias"] = gn.bias.grad
        x = x0.clone().requires_grad_(True)
        up = F.interpolate(x, scale_factor=2, mode="nearest")
        (up * d[k + "r_up"]).sum().backward()
        res[k + "up.out"] = up
        res[k + "up.grad.x"] = x.grad
    st.save(res, out)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
