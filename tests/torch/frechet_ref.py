"""scipy reference for the Frechet distance test (tests/test_frechet.cpp).

Reads IN (an .npz written by diffuse::npy) with, for each case NAME:
  NAME.mu1 [d], NAME.sigma1 [d,d], NAME.mu2 [d], NAME.sigma2 [d,d]   (float64)
and optionally features [n,d] (float32). Writes OUT (.npz) with
  NAME.fd   [1]  pytorch-fid's calculate_frechet_distance (scipy.linalg.sqrtm)
  NAME.eps  [1]  1.0 if its eps retry was taken, else 0.0
  cov_mu [d], cov_sigma [d,d]   np.mean / np.cov(rowvar=False) of features in float64
"""
import sys

import numpy as np
from scipy import linalg


def calculate_frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """pytorch-fid's function (src/pytorch_fid/fid_score.py), verbatim in substance."""
    mu1 = np.atleast_1d(mu1)
    mu2 = np.atleast_1d(mu2)
    sigma1 = np.atleast_2d(sigma1)
    sigma2 = np.atleast_2d(sigma2)
    assert mu1.shape == mu2.shape
    assert sigma1.shape == sigma2.shape
    diff = mu1 - mu2
    covmean, _ = linalg.sqrtm(sigma1.dot(sigma2), disp=False)
    retried = 0.0
    if not np.isfinite(covmean).all():
        retried = 1.0
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            m = np.max(np.abs(covmean.imag))
            raise ValueError("Imaginary component {}".format(m))
        covmean = covmean.real
    tr_covmean = np.trace(covmean)
    return diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean, retried


def main(inp, out):
    res = {}
    with np.load(inp) as z:
        d = {k: z[k] for k in z.files}
    for name in sorted(k[: -len(".mu1")] for k in d if k.endswith(".mu1")):
        fd, retried = calculate_frechet_distance(
            d[name + ".mu1"], d[name + ".sigma1"], d[name + ".mu2"], d[name + ".sigma2"]
        )
        res[name + ".fd"] = np.array([fd], dtype=np.float64)
        res[name + ".eps"] = np.array([retried], dtype=np.float64)
    if "features" in d:
        f = d["features"].astype(np.float64)
        res["cov_mu"] = np.mean(f, axis=0)
        res["cov_sigma"] = np.cov(f, rowvar=False)
    np.savez_compressed(out, **res)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
