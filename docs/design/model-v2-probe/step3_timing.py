"""Per-step timing of a SimCLR step (batch 128 pairs = 256 views, 64 px) vs frozen prefix and swish implementation."""
import time, torch, torch.nn.functional as F
from common import lite0
for me in (True, False):
    for freeze in (5, 8, 11):
        m = lite0(); m.set_swish(memory_efficient=me); m.train()
        pre = [m._conv_stem, m._bn0] + [m._blocks[i] for i in range(freeze)]
        for mod in pre:
            mod.eval(); [p.requires_grad_(False) for p in mod.parameters()]
        opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], 1e-4)
        x = torch.randn(256, 3, 64, 64)
        ts = []
        for i in range(3):
            t0 = time.perf_counter()
            with torch.no_grad():
                h = m._swish(m._bn0(m._conv_stem(x)))
                for j in range(freeze):
                    h = m._blocks[j](h)
            t1 = time.perf_counter()
            for j in range(freeze, 16):
                h = m._blocks[j](h)
            z = m._swish(m._bn1(m._conv_head(h))).mean(dim=(2, 3))
            loss = z.pow(2).mean(); opt.zero_grad(); loss.backward(); opt.step()
            ts.append((t1 - t0, time.perf_counter() - t1))
        print(f"memory_efficient_swish={me} freeze={freeze}: prefix {ts[-1][0]:.2f}s, trainable fwd+bwd {ts[-1][1]:.2f}s per 256 views", flush=True)
