"""What labels would buy: supervised ceilings for the retrieval-quality goals.

Not a benchmark of the product: a diagnostic for issue 5. The product's model
is trained without labels; this script asks how far the same network, the
same pre-processing and the same train split get *with* the labels, so that
the label-free figures in BENCHMARKS.md can be read against what the data and
this network allow at all.

Per ``.npz`` (MedMNIST layout; gallery = train, queries = test, choices on
val only):

* ``linear probe``: logistic regression (labels of the train split) on the
  shipped model's L2-normalised vectors; weight decay picked on val. Test
  accuracy = how separable the label-free features already are.
* ``supervised net``: SliceNetV1 with the shipped hyper-parameters trained
  from scratch with cross-entropy on the train split's labels (the shipped
  recipe's augmentations, seeded), the epoch picked on val accuracy. Its test
  classification accuracy and the P@1 / P@10 / mAP@5 (Mahbod) of cosine
  retrieval with its 128-d head outputs (train gallery, test queries).

Every image goes through the worker's DICOM pre-processing exactly as
``sidecar evaluate``'s path (a) does. Run::

    .venv/bin/python bench/quality_ceiling.py ../shared/data/medmnist/breastmnist.npz \
        ../shared/data/medmnist/pneumoniamnist.npz [--epochs 40] [--seed 0]

About 1.5 min for Breast and 9 min for Pneumonia on 2 cores (measured).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sidecar.config import Config
from sidecar.embeddings import network as m
from sidecar.lab import evaluate as ev
from sidecar.lab import metrics
from sidecar.training import npz
from sidecar.training import selfsup as tr
from sidecar.training.augment import augment


def prepared(images: np.ndarray, config: Config, name: str, size: int) -> np.ndarray:
    """Model input for ``images``, through the worker's DICOM path (as path (a))."""
    datasets = [npz.image_dataset(im, key=f"{name}/{i}", patient_id=f"P{i:06d}")
                for i, im in enumerate(images)]
    return npz.prepare_datasets(datasets, config, size)[:, None]


def retrieval(g_vec: np.ndarray, g_lab: np.ndarray, q_vec: np.ndarray,
              q_lab: np.ndarray) -> dict[str, float]:
    """P@1, P@10 and Mahbod's mAP@5 of cosine retrieval (percentages)."""
    order, _ = metrics.cosine_ranking(q_vec, g_vec, k=10)
    rel = metrics.relevance(g_lab[order], q_lab)
    return {"p@1": 100 * float(metrics.precision_at_k(rel, 1).mean()),
            "p@10": 100 * float(metrics.precision_at_k(rel, 10).mean()),
            "map@5_mahbod": 100 * float(metrics.mahbod_map_at_k(rel, 5).mean())}


def linear_probe(train: tuple[np.ndarray, np.ndarray], val: tuple[np.ndarray, np.ndarray],
                 test: tuple[np.ndarray, np.ndarray]) -> dict[str, Any]:
    """Multinomial logistic regression (L-BFGS); L2 weight picked on val accuracy."""
    n_cls = int(max(train[1].max(), val[1].max(), test[1].max())) + 1
    xs = {k: torch.from_numpy(v[0]).double() for k, v in
          {"train": train, "val": val, "test": test}.items()}
    ys = {k: torch.from_numpy(v[1]).long() for k, v in
          {"train": train, "val": val, "test": test}.items()}
    best: dict[str, Any] = {}
    for wd in (1e-4, 1e-3, 1e-2, 1e-1):
        lin = nn.Linear(xs["train"].shape[1], n_cls).double()
        opt = torch.optim.LBFGS(lin.parameters(), max_iter=500, line_search_fn="strong_wolfe")

        def closure(lin: nn.Linear = lin, opt: torch.optim.LBFGS = opt,
                    wd: float = wd) -> torch.Tensor:
            opt.zero_grad()
            loss = F.cross_entropy(lin(xs["train"]), ys["train"]) + wd * lin.weight.pow(2).sum()
            loss.backward()  # type: ignore[no-untyped-call]
            return loss

        opt.step(closure)  # type: ignore[no-untyped-call]
        with torch.no_grad():
            acc = {k: 100 * float((lin(xs[k]).argmax(1) == ys[k]).double().mean())
                   for k in ("val", "test")}
        if not best or acc["val"] > best["val_acc"]:
            best = {"weight_decay": wd, "val_acc": acc["val"], "test_acc": acc["test"]}
    return best


class Supervised(nn.Module):
    def __init__(self, hparams: m.SliceNetV1Params, n_cls: int) -> None:
        super().__init__()
        self.net = m.SliceNetV1(hparams)
        self.cls = nn.Linear(hparams.dim, n_cls)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.cls(F.relu(self.net(x)))
        return out


def embed(net: nn.Module, x: np.ndarray) -> np.ndarray:
    net.eval()
    with torch.no_grad():
        out = torch.cat([net(torch.from_numpy(x[i:i + 512])) for i in range(0, len(x), 512)])
    return F.normalize(out, dim=1).numpy()


def supervised(recipe: tr.TrainRecipe, data: dict[str, tuple[np.ndarray, np.ndarray]],
               epochs: int, seed: int) -> dict[str, Any]:
    """Train SliceNetV1 with labels; the epoch with the best val accuracy is reported."""
    hp = m.SliceNetV1Params.from_json(recipe.hparams)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    n_cls = int(max(int(v[1].max()) for v in data.values())) + 1
    model = Supervised(hp, n_cls)
    model.net.reset_parameters(gen)
    x_tr = torch.from_numpy(data["train"][0])
    y_tr = torch.from_numpy(data["train"][1]).long()
    batch = min(128, len(x_tr))
    steps = epochs * (len(x_tr) // batch)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    # geometric jitter milder than the contrastive recipe's: labels, not views
    aug = tr.TrainRecipe.from_dict({**recipe.to_dict(), "crop_scale": (0.7, 1.0)})
    best: dict[str, Any] = {}
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(x_tr), generator=gen)
        for i in range(0, len(perm) - batch + 1, batch):
            idx = perm[i:i + batch]
            x = augment(x_tr[idx], aug, gen)
            loss = F.cross_entropy(model(x), y_tr[idx])
            opt.zero_grad()
            loss.backward()  # type: ignore[no-untyped-call]
            opt.step()
            sched.step()
        model.eval()
        with torch.no_grad():
            acc = {k: 100 * float(np.mean(
                torch.cat([model(torch.from_numpy(data[k][0][j:j + 512]))
                           for j in range(0, len(data[k][0]), 512)]).argmax(1).numpy()
                == data[k][1])) for k in ("val", "test")}
        if not best or acc["val"] >= best["val_acc"]:
            vec = {k: embed(model.net, data[k][0]) for k in ("train", "test")}
            best = {"epoch": epoch + 1, "val_acc": acc["val"], "test_acc": acc["test"],
                    **retrieval(vec["train"], data["train"][1], vec["test"], data["test"][1])}
    return best


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("npz", nargs="+", type=Path)
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(2)
    config = Config()
    embedder = ev.load_model(config)
    weights = json.loads(m.builtin_weights_path().with_suffix(".json").read_text())
    recipe = tr.TrainRecipe.from_dict(weights["training"]["recipe"])
    for path in args.npz:
        if not path.is_file():
            print(f"{path}: absent, skipped")
            continue
        t0 = time.perf_counter()
        data = npz.load_labelled_npz(path)
        prep = {}
        for split in ("train", "val", "test"):
            img, lab = data.split(split)
            prep[split] = (prepared(img, config, f"{data.name}/{split}", embedder.input_size), lab)
        vec = {k: (np.asarray(embedder.embed(v[0][:, 0]), np.float64), v[1])
               for k, v in prep.items()}
        shipped = retrieval(vec["train"][0], vec["train"][1], vec["test"][0], vec["test"][1])
        probe = linear_probe(vec["train"], vec["val"], vec["test"])
        sup = supervised(recipe, prep, args.epochs, args.seed)
        out = {"set": data.name, "model_id": embedder.model_id,
               "shipped_retrieval": shipped, "linear_probe_on_shipped": probe,
               "supervised_slicenet": sup, "seconds": round(time.perf_counter() - t0, 1)}
        print(json.dumps(out, indent=1), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
