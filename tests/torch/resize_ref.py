"""PyTorch reference for the resize parity test (tests/test_idx.cpp).

Reads IN with, for each case NAME:
  NAME.x     [N,H,W,C] float32, NHWC (the C++ layout)
  NAME.size  I32 [out_h, out_w]
  NAME.mode  I32 [0] area or [1] bilinear
and writes OUT with NAME.out [N,out_h,out_w,C]: F.interpolate(x, size, mode="area")
or F.interpolate(x, size, mode="bilinear", align_corners=False) on the NCHW view of
the NHWC data (channels-last memory, as in C++), and NAME.out_nchw: the same on a
contiguous NCHW copy (PyTorch's other CPU kernel; equal to a rounding).
"""
import sys

import torch
import torch.nn.functional as F

import safetensors_io as st


def main(inp, out):
    torch.set_num_threads(1)
    d = st.load(inp)
    res = {}
    for name in sorted(k[:-2] for k in d if k.endswith(".x")):
        x = d[name + ".x"].permute(0, 3, 1, 2)
        size = tuple(int(v) for v in d[name + ".size"])
        for suffix, xin in ((".out", x), (".out_nchw", x.contiguous())):
            if int(d[name + ".mode"][0]) == 0:
                y = F.interpolate(xin, size=size, mode="area")
            else:
                y = F.interpolate(xin, size=size, mode="bilinear", align_corners=False)
            res[name + suffix] = y.permute(0, 2, 3, 1).contiguous()
    st.save(res, out)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
