"""PyTorch reference for the attention parity test (tests/test_attention.cpp).

Reads IN with cases "c<i>.q", "c<i>.k", "c<i>.v" [N, L, C] (float32), the
upstream gradient "c<i>.g" [N, L, C] and "c<i>.heads" [1] int32, and writes OUT
with, per case:
  c<i>.out             softmax(Q K^T * d^-0.5, over keys) V per head (d = C / heads)
  c<i>.dq, .dk, .dv    gradients of sum(out * g)
With one head the formula is literally the reference AttnBlock's
(w = softmax(bmm(q, k) * C^-0.5); h = bmm(v, w^T)) on the [N, C, L] views.
"""
import sys

import torch

import safetensors_io as st


def attention(q, k, v, heads):
    N, L, C = q.shape
    if heads == 1:
        # shared/reference/torch_reference.py, AttnBlock.forward, from [B, HW, C] tokens
        kc = k.permute(0, 2, 1)                                       # [B, C, HW]
        vc = v.permute(0, 2, 1)                                       # [B, C, HW]
        w = torch.softmax(torch.bmm(q, kc) * (C ** -0.5), dim=-1)     # [B, HWq, HWk]
        h = torch.bmm(vc, w.permute(0, 2, 1))                         # [B, C, HWq]
        return h.permute(0, 2, 1)
    d = C // heads
    qh, kh, vh = (t.reshape(N, L, heads, d).permute(0, 2, 1, 3) for t in (q, k, v))  # [N, heads, L, d]
    w = torch.softmax(torch.matmul(qh, kh.transpose(-1, -2)) * (d ** -0.5), dim=-1)
    return torch.matmul(w, vh).permute(0, 2, 1, 3).reshape(N, L, C)


def main(inp, out):
    torch.set_num_threads(1)
    d = st.load(inp)
    res = {}
    i = 0
    while f"c{i}.q" in d:
        p = f"c{i}."
        q, k, v = (d[p + n].clone().requires_grad_(True) for n in ("q", "k", "v"))
        o = attention(q, k, v, int(d[p + "heads"][0]))
        o.backward(d[p + "g"])
        res[p + "out"] = o
        res[p + "dq"], res[p + "dk"], res[p + "dv"] = q.grad, k.grad, v.grad
        i += 1
    st.save(res, out)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
