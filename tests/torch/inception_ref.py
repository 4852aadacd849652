"""PyTorch reference for the FID tests (test_fid, test_fid_cli, test_train_cifar10), in one launch.

    inception_ref.py --seed SEED --pth WEIGHTS_OUT.pth [--safetensors WEIGHTS_OUT.safetensors]
                     [--images IMAGES.npy --features FEATURES_OUT.npy] ... [--stats IMAGES.npy:STATS_OUT.npz]

Builds pytorch-fid's InceptionV3 the way pytorch-fid's fid_inception_v3() does
(torchvision's inception_v3 with 1008 classes and no aux head, Mixed_5b..5d,
6b..6e, 7b, 7c replaced by the FID blocks, whose only change is the pool branch:
3x3/1/1 average pool without counting padding, max pool in Mixed_7c), with
random weights instead of the real ones (not available here):
  - convolutions He-scaled, N(0, 2 / fan_in);
  - BatchNorm weight U(0.5, 1.5), bias N(0, 0.2);
  - running statistics measured on 8 random calibration images (a forward in
    training mode with cumulative averaging), then perturbed (variance x
    U(0.8, 1.25), mean + N(0, 0.1) standard deviations), so the activations
    keep a healthy scale through all 94 layers without being exactly normalised.
Saves the whole state dict with torch.save under pytorch-fid's key names
(fc.* and num_batches_tracked included, as in the real file); with --safetensors
also converts it with scripts/fid_weights_to_safetensors.py's convert(), the
code a user runs on the real file (here in the same process: one python launch
per test). For each --images (uint8, [N, H, W, C], C = 1 or 3) writes the 2,048
pool features to the --features that follows it, preprocessed as pytorch-fid
does: /255, grayscale replicated to RGB, F.interpolate to 299x299 bilinear
(align_corners=False), 2x - 1; --stats IMAGES.npy:OUT.npz also writes the
float64 mean and N-1 covariance of those images' features (numpy.savez_compressed, pytorch-fid's
layout).
"""
import argparse
import importlib.util
import os
import sys

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision.models.inception as tvi


class FIDInceptionA(tvi.InceptionA):
    def forward(self, x):
        pool = self.branch_pool(F.avg_pool2d(x, 3, 1, 1, count_include_pad=False))
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), b5, b3, pool], 1)


class FIDInceptionC(tvi.InceptionC):
    def forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = x
        for m in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                  self.branch7x7dbl_5):
            d = m(d)
        pool = self.branch_pool(F.avg_pool2d(x, 3, 1, 1, count_include_pad=False))
        return torch.cat([self.branch1x1(x), b7, d, pool], 1)


class FIDInceptionE(tvi.InceptionE):
    def __init__(self, in_channels, max_pool):
        super().__init__(in_channels)
        self.max_pool = max_pool

    def forward(self, x):
        t = self.branch3x3_1(x)
        t = torch.cat([self.branch3x3_2a(t), self.branch3x3_2b(t)], 1)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        d = torch.cat([self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d)], 1)
        if self.max_pool:
            p = F.max_pool2d(x, 3, 1, 1)
        else:
            p = F.avg_pool2d(x, 3, 1, 1, count_include_pad=False)
        return torch.cat([self.branch1x1(x), t, d, self.branch_pool(p)], 1)


def fid_inception():
    net = tvi.inception_v3(weights=None, num_classes=1008, aux_logits=False, init_weights=False)
    net.Mixed_5b = FIDInceptionA(192, pool_features=32)
    net.Mixed_5c = FIDInceptionA(256, pool_features=64)
    net.Mixed_5d = FIDInceptionA(288, pool_features=64)
    net.Mixed_6b = FIDInceptionC(768, channels_7x7=128)
    net.Mixed_6c = FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6d = FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6e = FIDInceptionC(768, channels_7x7=192)
    net.Mixed_7b = FIDInceptionE(1280, max_pool=False)
    net.Mixed_7c = FIDInceptionE(2048, max_pool=True)
    return net


def pool_features(net, x):
    """pytorch-fid's InceptionV3 forward (output block 3) on x in [0, 1], NCHW."""
    x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
    x = 2 * x - 1
    x = net.Conv2d_2b_3x3(net.Conv2d_2a_3x3(net.Conv2d_1a_3x3(x)))
    x = F.max_pool2d(x, 3, 2)
    x = F.max_pool2d(net.Conv2d_4a_3x3(net.Conv2d_3b_1x1(x)), 3, 2)
    for name in ("Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e",
                 "Mixed_7a", "Mixed_7b", "Mixed_7c"):
        x = getattr(net, name)(x)
    return F.adaptive_avg_pool2d(x, (1, 1)).flatten(1)


def randomise(net, gen):
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            fan_in = m.in_channels * m.kernel_size[0] * m.kernel_size[1]
            m.weight.data = torch.randn(m.weight.shape, generator=gen) * (2.0 / fan_in) ** 0.5
        elif isinstance(m, nn.BatchNorm2d):
            m.weight.data = 0.5 + torch.rand(m.weight.shape, generator=gen)
            m.bias.data = 0.2 * torch.randn(m.bias.shape, generator=gen)
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the calibration forward
    net.fc.weight.data = 0.01 * torch.randn(net.fc.weight.shape, generator=gen)
    net.fc.bias.data.zero_()
    # Calibration: smooth random 32x32 colour images, as the test's inputs are.
    calib = torch.rand((8, 3, 32, 32), generator=gen)
    net.train()
    with torch.no_grad():
        pool_features(net, calib)
    net.eval()
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.running_var.numel()
            m.running_mean += 0.1 * m.running_var.sqrt() * torch.randn(n, generator=gen)
            m.running_var *= torch.exp(torch.empty(n).uniform_(np.log(0.8), np.log(1.25), generator=gen))


def load_converter():
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "scripts", "fid_weights_to_safetensors.py")
    spec = importlib.util.spec_from_file_location("fid_weights_to_safetensors", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def features_of(net, images_path):
    im = np.load(images_path)
    if im.dtype != np.uint8 or im.ndim != 4 or im.shape[3] not in (1, 3):
        sys.exit(f"inception_ref: {images_path}: expected uint8 [N, H, W, C] images, got {im.dtype} {im.shape}")
    x = torch.from_numpy(im).permute(0, 3, 1, 2).contiguous().to(torch.float32).div(255)
    if x.shape[1] == 1:
        x = x.repeat(1, 3, 1, 1)
    with torch.no_grad():
        feats = pool_features(net, x)
    feats = feats.numpy().astype(np.float32)
    spread = feats.std(0).mean() / (np.abs(feats).mean() + 1e-30)
    print(f"inception_ref: {os.path.basename(images_path)}: features {feats.shape}, mean |f| {np.abs(feats).mean():.4g}, "
          f"nonzero {np.count_nonzero(feats) / feats.size:.3f}, spread across images {spread:.3g}")
    return feats


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, required=True)
    ap.add_argument("--pth", required=True, help="the random weights, torch.save'd")
    ap.add_argument("--safetensors", help="the same weights converted for examples/fid")
    ap.add_argument("--images", action="append", default=[])
    ap.add_argument("--features", action="append", default=[])
    ap.add_argument("--stats", action="append", default=[], help="IMAGES:STATS_OUT.npz for one of the --images")
    a = ap.parse_args()
    if len(a.images) != len(a.features):
        sys.exit("inception_ref: every --images needs its --features")
    stats = dict(s.rsplit(":", 1) for s in a.stats)
    torch.set_num_threads(2)
    gen = torch.Generator().manual_seed(a.seed)
    net = fid_inception()
    randomise(net, gen)
    torch.save(net.state_dict(), a.pth)
    if a.safetensors:
        n, total, _ = load_converter().convert(net.state_dict(), a.safetensors, a.pth)
        print(f"inception_ref: wrote {a.safetensors}: {n} tensors, {total:,} values")
    for images, features in zip(a.images, a.features):
        feats = features_of(net, images)
        np.save(features, feats)
        if images in stats:
            act = feats.astype(np.float64)
            np.savez_compressed(stats.pop(images), mu=np.mean(act, axis=0), sigma=np.cov(act, rowvar=False))
    if stats:
        sys.exit(f"inception_ref: --stats for images not given: {sorted(stats)}")


if __name__ == "__main__":
    main()
