"""PyTorch reference for tests/test_conv2d.cpp: reads x [N,C,H,W], w, b, the
upstream gradient gy and opt = (stride_h, stride_w, pad_h, pad_w); writes
y = F.conv2d(x, w, b) and the gradients of sum(y * gy): dx, dw, db."""
import sys

import torch
import torch.nn.functional as F

import safetensors_io as st

torch.set_num_threads(1)
d = st.load(sys.argv[1])
x, w, b = (d[k].clone().requires_grad_(True) for k in ("x", "w", "b"))
sh, sw, ph, pw = (int(v) for v in d["opt"])
y = F.conv2d(x, w, b, stride=(sh, sw), padding=(ph, pw))
(y * d["gy"]).sum().backward()
st.save({"y": y, "dx": x.grad, "dw": w.grad, "db": b.grad}, sys.argv[2])
