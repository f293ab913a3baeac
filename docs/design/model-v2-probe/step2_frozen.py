"""Step 2: frozen ImageNet Lite0 features on val (gallery=train, queries=val), per block, concatenated, and with the shipped 128-d vectors.
Usage: python step2_frozen.py [size=64]"""
import sys, time, json, itertools
import numpy as np, torch
from common import SETS, load_split, metrics, l2, lite0, to_input, block_features

size = int(sys.argv[1]) if len(sys.argv) > 1 else 64
ckpt = sys.argv[2] if len(sys.argv) > 2 else None
tag = sys.argv[3] if len(sys.argv) > 3 else "frozen"
model = lite0()
if ckpt:
    model.load_state_dict(torch.load(ckpt), strict=False)
    model.eval()
BLOCKS = (3, 5, 7, 10, 12, 14, 15)


def embed(images):
    out = {}
    with torch.inference_mode():
        for s in range(0, len(images), 64):
            f = block_features(model, to_input(images[s:s + 64], size), blocks=BLOCKS)
            for k, v in f.items():
                out.setdefault(k, []).append(v.numpy())
    return {k: np.concatenate(v) for k, v in out.items()}

rows = []
for name in SETS:
    g_img, g_lab = load_split(name, "train")
    q_img, q_lab = load_split(name, "val")
    t0 = time.perf_counter()
    G, Q = embed(g_img), embed(q_img)
    dt = time.perf_counter() - t0
    sh = np.load(f"out/shipped_{name}.npz")
    res = {"raw pixels": metrics(q_img.reshape(len(q_img), -1), g_img.reshape(len(g_img), -1), q_lab, g_lab),
           "shipped (128-d)": metrics(sh["q"], sh["g"], q_lab, g_lab)}
    for k in G:
        res[f"{k} ({G[k].shape[1]}-d)"] = metrics(Q[k], G[k], q_lab, g_lab)
    def cat(D, keys, with_shipped=False, part="g"):
        parts = [l2(D[k]) for k in keys]
        if with_shipped:
            parts.append(l2(sh[part]))
        return np.concatenate(parts, axis=1)
    combos = [("b7", "b10", "b14", "b15"), ("b7", "b10", "b14", "b15", "head"), ("b10", "b14", "b15"), ("b5", "b7", "b10"),
              ("b12", "b14", "b15")]
    for c in combos:
        res["cat " + "+".join(c)] = metrics(cat(Q, c), cat(G, c), q_lab, g_lab)
    for c in combos + [("b14",), ("b15",), ("b10",), ("head",)]:
        res["cat " + "+".join(c) + "+shipped"] = metrics(cat(Q, c, True, "q"), cat(G, c, True, "g"), q_lab, g_lab)
    res["_embed_seconds"] = round(dt, 1)
    print(name, f"embed {len(g_img)+len(q_img)} images at {size}px in {dt:.1f}s")
    for k, v in res.items():
        print(f"  {k:40s} {v}")
    rows.append((name, res))
    np.savez(f"out/{tag}_{size}_{name}.npz", **{"g_" + k: v for k, v in G.items()}, **{"q_" + k: v for k, v in Q.items()})
json.dump(dict(rows), open(f"out/step2_{tag}_{size}.json", "w"), indent=1)
