"""PyTorch reference for the ToyMLP parity test (tests/test_torch_parity.cpp).

Reads IN (weights "net.*", inputs "x" [N,2], "t" [N] int32, target "eps",
scalars "lr"), and writes OUT with what PyTorch computes for the same things:
  temb       timestep_embedding(t, 128)
  out        model(x, t)
  loss       mse_loss(out, eps)
  grad.NAME  d loss / d parameter
  adam.NAME  the parameter after one torch.optim.Adam step with that gradient
The model and the embedding are those of the project's PyTorch reference
(the 2-D toy: Linear(2+128,128)-SiLU-Linear-SiLU-Linear-SiLU-Linear(128,2)).
"""
import math
import sys

import torch
import torch.nn as nn

import safetensors_io as st


def timestep_embedding(t, dim):
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / (half - 1))
    args = t.float()[:, None] * freqs[None, :]
    return torch.cat([torch.sin(args), torch.cos(args)], dim=1)


class ToyMLP(nn.Module):
    def __init__(self, hidden=128, temb_dim=128):
        super().__init__()
        self.temb_dim = temb_dim
        self.net = nn.Sequential(
            nn.Linear(2 + temb_dim, hidden), nn.SiLU(),
            nn.Linear(hidden, hidden), nn.SiLU(),
            nn.Linear(hidden, hidden), nn.SiLU(),
            nn.Linear(hidden, 2))

    def forward(self, x, t):
        return self.net(torch.cat([x, timestep_embedding(t, self.temb_dim)], dim=1))


def main(inp, out):
    torch.set_num_threads(1)
    d = st.load(inp)
    model = ToyMLP()
    model.load_state_dict({k: v for k, v in d.items() if k.startswith("net.")})
    x, t, eps = d["x"], d["t"].long(), d["eps"]
    y = model(x, t)
    loss = nn.functional.mse_loss(y, eps)
    loss.backward()
    res = {"temb": timestep_embedding(t, 128), "out": y, "loss": loss.reshape(1)}
    for name, p in model.named_parameters():
        res["grad." + name] = p.grad
    opt = torch.optim.Adam(model.parameters(), lr=float(d["lr"][0]))
    opt.step()
    for name, p in model.named_parameters():
        res["adam." + name] = p
    st.save(res, out)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
