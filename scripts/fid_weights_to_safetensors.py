#!/usr/bin/env python3
"""Convert pytorch-fid's Inception weights to safetensors for examples/fid.

    /usr/bin/python3 scripts/fid_weights_to_safetensors.py \
        pt_inception-2015-12-05-6726825d.pth data/fid/pt_inception-2015-12-05.safetensors

The input is the state dict pytorch-fid downloads
(https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth,
about 95 MB). Every floating-point tensor is written as float32 under its own
key (e.g. "Mixed_5b.branch1x1.conv.weight", "Mixed_5b.branch1x1.bn.running_var",
"fc.weight"); integer tensors (BatchNorm's num_batches_tracked, if present) are
left out, as the fid tool ignores them. Needs torch (Debian: python3-torch);
the safetensors format is written by hand (Debian has no python3-safetensors).
"""
import argparse
import json
import os
import struct
import sys

import torch


def write_safetensors(tensors, path):
    header, blobs, off = {}, [], 0
    for name, t in tensors.items():
        raw = t.detach().to(torch.float32).contiguous().cpu().numpy().tobytes()
        header[name] = {"dtype": "F32", "shape": list(t.shape), "data_offsets": [off, off + len(raw)]}
        blobs.append(raw)
        off += len(raw)
    header["__metadata__"] = {"format": "pt", "source": "pytorch-fid pt_inception-2015-12-05"}
    h = json.dumps(header).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for raw in blobs:
            f.write(raw)
    os.replace(tmp, path)  # never a half-written file under the final name


def convert(sd, out, source="pt_inception-2015-12-05.pth"):
    """Writes the floating-point tensors of state dict sd to out; returns (tensors, values, skipped)."""
    if not isinstance(sd, dict) or "Conv2d_1a_3x3.conv.weight" not in sd:
        sys.exit(f"error: {source} is not pytorch-fid's Inception state dict (no Conv2d_1a_3x3.conv.weight)")
    keep = {k: v for k, v in sd.items() if torch.is_tensor(v) and v.is_floating_point()}
    skipped = [k for k in sd if k not in keep]
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    write_safetensors(keep, out)
    return len(keep), sum(v.numel() for v in keep.values()), len(skipped)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("pth", help="pytorch-fid's pt_inception-2015-12-05-6726825d.pth")
    ap.add_argument("out", help="output .safetensors")
    a = ap.parse_args()
    n, total, skipped = convert(torch.load(a.pth, map_location="cpu"), a.out, a.pth)
    print(f"wrote {a.out}: {n} tensors, {total:,} values" +
          (f" ({skipped} integer tensors left out)" if skipped else ""))


if __name__ == "__main__":
    main()
