"""Step 3: SimCLR / NT-Xent fine-tune of Lite0 from the ImageNet start on the union of both TRAIN splits' pixels (no labels).
Aug: random resized crop (scale 0.6-1, aspect 3/4-4/3) + rotation +-10 deg done as one affine grid_sample from the 28 px source
straight to SIZE px, brightness/contrast jitter +-0.25, gamma 0.8-1.25, gaussian noise sigma 0.02, NO flips.
Freezes stem + blocks 0..FREEZE-1 (kept in eval mode). Representation trained = pooled head (1280) -> MLP 1280-512-128.
Usage: python step3_simclr.py TAG MINUTES [FREEZE=5] [TAU=0.2] [LR=3e-4] [SIZE=64]"""
import sys, time, math, json
import numpy as np, torch, torch.nn as nn, torch.nn.functional as F
from common import SETS, load_split, lite0, MEAN, STD

tag, minutes = sys.argv[1], float(sys.argv[2])
FREEZE = int(sys.argv[3]) if len(sys.argv) > 3 else 5
TAU = float(sys.argv[4]) if len(sys.argv) > 4 else 0.2
LR = float(sys.argv[5]) if len(sys.argv) > 5 else 3e-4
SIZE = int(sys.argv[6]) if len(sys.argv) > 6 else 64
BS = 128
torch.manual_seed(0); np.random.seed(0)

imgs = np.concatenate([load_split(n, "train")[0] for n in SETS])  # labels discarded
X = torch.from_numpy(imgs).float().div_(255.0).unsqueeze(1)  # (N,1,28,28)
print("train images", X.shape[0])

model = lite0()
model.set_swish(memory_efficient=False)  # plain x*sigmoid(x): faster backward on CPU (out/step3_timing.txt)
frozen = [model._conv_stem, model._bn0] + [model._blocks[i] for i in range(FREEZE)]
for mod in frozen:
    for p in mod.parameters():
        p.requires_grad_(False)
proj = nn.Sequential(nn.Linear(1280, 512), nn.ReLU(inplace=True), nn.Linear(512, 128))


def augment(x):
    n = x.shape[0]
    scale = torch.empty(n).uniform_(0.6, 1.0)
    logr = torch.empty(n).uniform_(math.log(3 / 4), math.log(4 / 3))
    sx, sy = torch.sqrt(scale * torch.exp(logr)).clamp(max=1), torch.sqrt(scale / torch.exp(logr)).clamp(max=1)
    tx, ty = (1 - sx) * torch.empty(n).uniform_(-1, 1), (1 - sy) * torch.empty(n).uniform_(-1, 1)
    a = torch.empty(n).uniform_(-10, 10) * math.pi / 180
    c, s = torch.cos(a), torch.sin(a)
    theta = torch.stack([torch.stack([c * sx, -s * sy, tx], 1), torch.stack([s * sx, c * sy, ty], 1)], 1)
    grid = F.affine_grid(theta, (n, 1, SIZE, SIZE), align_corners=False)
    y = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    gamma = torch.exp(torch.empty(n, 1, 1, 1).uniform_(math.log(0.8), math.log(1.25)))
    y = y.clamp(0, 1) ** gamma
    ctr = torch.empty(n, 1, 1, 1).uniform_(0.75, 1.25); br = torch.empty(n, 1, 1, 1).uniform_(-0.25, 0.25) * 0.5
    m = y.mean(dim=(2, 3), keepdim=True)
    y = (y - m) * ctr + m + br + 0.02 * torch.randn_like(y)
    y = y.clamp(0, 1).expand(-1, 3, -1, -1)
    return (y - MEAN) / STD


def nt_xent(z, tau):
    z = F.normalize(z, dim=1)
    n = z.shape[0] // 2
    sim = z @ z.t() / tau
    sim.fill_diagonal_(-1e9)
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)])
    return F.cross_entropy(sim, target)


def set_modes():
    model.train(); proj.train()
    for mod in frozen:
        mod.eval()

params = [{"params": [p for p in model.parameters() if p.requires_grad], "lr": LR},
          {"params": proj.parameters(), "lr": LR * 3}]
opt = torch.optim.AdamW(params, weight_decay=1e-4)
steps_per_epoch = X.shape[0] // BS
budget = minutes * 60
t_start = time.perf_counter(); step = 0; log = []
base_lrs = [g["lr"] for g in opt.param_groups]
est_total = None
set_modes()
while True:
    perm = torch.randperm(X.shape[0])
    for b in range(steps_per_epoch):
        el = time.perf_counter() - t_start
        if el > budget:
            break
        frac = min(el / budget, 1.0)  # cosine decay on wall-clock fraction, 5 % warm-up
        f = frac / 0.05 if frac < 0.05 else 0.5 * (1 + math.cos(math.pi * (frac - 0.05) / 0.95))
        for g, lr0 in zip(opt.param_groups, base_lrs):
            g["lr"] = lr0 * f
        xb = X[perm[b * BS:(b + 1) * BS]]
        v = torch.cat([augment(xb), augment(xb)])
        with torch.no_grad():  # frozen prefix: no graph
            h = model._swish(model._bn0(model._conv_stem(v)))
            for j in range(FREEZE):
                h = model._blocks[j](h)
        for j in range(FREEZE, len(model._blocks)):
            h = model._blocks[j](h)  # drop-connect off (extract_features would apply 0.2 scaled)
        h = model._swish(model._bn1(model._conv_head(h))).mean(dim=(2, 3))
        loss = nt_xent(proj(h), TAU)
        opt.zero_grad(set_to_none=True); loss.backward(); opt.step(); step += 1
        if step % 10 == 0:
            log.append((step, round(el, 1), round(loss.item(), 4)))
            print(f"step {step} epoch {step/steps_per_epoch:.2f} t {el:.0f}s loss {loss.item():.4f}", flush=True)
    else:
        continue
    break
dt = time.perf_counter() - t_start
print(f"done: {step} steps = {step/steps_per_epoch:.2f} epochs in {dt:.0f}s ({step*BS/dt:.1f} img/s, 2 views each)")
torch.save(model.state_dict(), f"out/ckpt_{tag}.pth")
json.dump({"tag": tag, "minutes": minutes, "freeze": FREEZE, "tau": TAU, "lr": LR, "size": SIZE, "bs": BS,
           "steps": step, "epochs": step / steps_per_epoch, "seconds": dt, "log": log}, open(f"out/train_{tag}.json", "w"))
