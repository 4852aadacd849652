"""PyTorch reference for the pooling and loss parity test (tests/test_pool.cpp).

Reads IN with (images NCHW, float32):
  ncases (F64 [1]); for each case i < ncases (prefix "case{i}."):
    x [N,C,H,W], r [N,C,OH,OW] (d loss / d output),
    params (F64: op (0 max, 1 avg), kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w,
            ceil_mode, count_include_pad)
  gap.x [N,C,H,W], gap.r [N,C]
  ls.x [R,K], ls.r [R,K]
  nce (F64 [1]); for each j < nce: ce{j}.logits [N,K] (F32), ce{j}.labels [N] (I64)
and writes OUT with:
  case{i}.out, case{i}.grad.x       y = F.max_pool2d / F.avg_pool2d(x, ...), d sum(y * r) / d x
  gap.out, gap.grad.x               y = x.mean((2, 3)), d sum(y * r) / d x
  ls.out, ls.grad.x                 y = F.log_softmax(x, -1), d sum(y * r) / d x
  ce{j}.loss [1], ce{j}.grad        F.cross_entropy(logits, labels), d loss / d logits
  ce{j}.argmax (I64)                logits.argmax(1)
"""
import sys

import torch
import torch.nn.functional as F

import safetensors_io as st


def main(inp, out):
    torch.set_num_threads(1)
    d = st.load(inp)
    res = {}
    for i in range(int(d["ncases"][0])):
        k = f"case{i}."
        p = [int(v) for v in d[k + "params"].tolist()]
        op, kernel, stride, pad = p[0], (p[1], p[2]), (p[3], p[4]), (p[5], p[6])
        ceil_mode, count_include_pad = bool(p[7]), bool(p[8])
        x = d[k + "x"].clone().requires_grad_(True)
        if op == 0:
            y = F.max_pool2d(x, kernel, stride, pad, ceil_mode=ceil_mode)
        else:
            y = F.avg_pool2d(x, kernel, stride, pad, ceil_mode=ceil_mode, count_include_pad=count_include_pad)
        (y * d[k + "r"]).sum().backward()
        res[k + "out"] = y
        res[k + "grad.x"] = x.grad

    x = d["gap.x"].clone().requires_grad_(True)
    y = x.mean((2, 3))
    (y * d["gap.r"]).sum().backward()
    res["gap.out"], res["gap.grad.x"] = y, x.grad

    x = d["ls.x"].clone().requires_grad_(True)
    y = F.log_softmax(x, -1)
    (y * d["ls.r"]).sum().backward()
    res["ls.out"], res["ls.grad.x"] = y, x.grad

    for j in range(int(d["nce"][0])):
        k = f"ce{j}."
        z = d[k + "logits"].clone().requires_grad_(True)
        loss = F.cross_entropy(z, d[k + "labels"])
        loss.backward()
        res[k + "loss"] = loss.reshape(1)
        res[k + "grad"] = z.grad
        res[k + "argmax"] = d[k + "logits"].argmax(1)
    st.save(res, out)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
