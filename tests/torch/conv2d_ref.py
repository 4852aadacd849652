"""PyTorch reference for tests/test_conv2d.cpp: for every case prefix c0., c1., ... reads x
[N,C,H,W], w, b, the upstream gradient gy and opt = (stride_h, stride_w, pad_h, pad_w); writes
<prefix>y = F.conv2d(x, w, b) and the gradients of sum(y * gy): <prefix>dx, dw, db."""
import sys

import torch
import torch.nn.functional as F

import safetensors_io as st

torch.set_num_threads(1)
d = st.load(sys.argv[1])
res = {}
for k in sorted({name.split(".")[0] + "." for name in d}):
    x, w, b = (d[k + n].clone().requires_grad_(True) for n in ("x", "w", "b"))
    sh, sw, ph, pw = (int(v) for v in d[k + "opt"])
    y = F.conv2d(x, w, b, stride=(sh, sw), padding=(ph, pw))
    (y * d[k + "gy"]).sum().backward()
    res.update({k + "y": y, k + "dx": x.grad, k + "dw": w.grad, k + "db": b.grad})
st.save(res, sys.argv[2])
