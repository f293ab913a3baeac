"""Label-free BN re-estimation: reset every BatchNorm's running stats and recompute them (cumulative mean, no gradients)
on the union of both TRAIN splits at 64 px (same input pipeline as step2). Saves out/ckpt_bn64.pth."""
import time, numpy as np, torch
from common import SETS, load_split, lite0, to_input
m = lite0()
imgs = np.concatenate([load_split(n, "train")[0] for n in SETS])
for mod in m.modules():
    if isinstance(mod, torch.nn.BatchNorm2d):
        mod.reset_running_stats(); mod.momentum = None
m.train()
t0 = time.perf_counter()
perm = np.random.default_rng(0).permutation(len(imgs))
with torch.no_grad():
    for s in range(0, len(imgs), 128):
        x = to_input(imgs[perm[s:s + 128]], 64)
        h = m._swish(m._bn0(m._conv_stem(x)))
        for b in m._blocks:
            h = b(h)  # drop-connect is applied in training mode only when a rate is passed; none here
        m._swish(m._bn1(m._conv_head(h)))
print(f"BN stats from {len(imgs)} images in {time.perf_counter()-t0:.1f}s")
torch.save(m.state_dict(), "out/ckpt_bn64.pth")
