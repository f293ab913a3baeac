"""Dump the shipped model's path-(a) vectors (train gallery, val queries) exactly as `sidecar evaluate` path (a) computes them."""
import sys, time
import numpy as np
from sidecar.config import Config
from sidecar.lab.evaluate import load_model, evaluate_model
from sidecar.training.npz import load_labelled_npz
from common import SETS, DATA, metrics

cfg = Config()
emb = load_model(cfg)
print("model", emb.model_id, emb.input_size, emb.dim)
for name in SETS:
    data = load_labelled_npz(f"{DATA}/{name}.npz")
    t0 = time.perf_counter()
    res, vec = evaluate_model(data, cfg, emb, split="val", near=None, n_boot=0)
    g_lab, q_lab = data.split("train")[1], data.split("val")[1]
    np.savez(f"out/shipped_{name}.npz", g=vec.gallery, q=vec.queries)
    print(name, round(time.perf_counter() - t0, 1), "s", metrics(vec.queries, vec.gallery, q_lab, g_lab))
