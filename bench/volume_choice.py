"""How the series-vector method was chosen: descriptors of 3-D volumes on train (LOO) and val.

Run: ``.venv/bin/python bench/volume_choice.py`` (needs ``../shared/data``; a few minutes
on 2 cores). AdrenalMNIST3D volumes (64³, 1 mm) are taken as arrays; the product's
plane choice and fit (:func:`sidecar.embeddings.volume.plane_inputs`) and the serving
model make the chosen descriptor, beside raw voxels (centred and not) and one
central plane per axis. Labels only score; the test split is never read.
Figures are in docs/design/volumes.md.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sidecar.config import Config  # noqa: E402
from sidecar.embeddings.model import load_embedder  # noqa: E402
from sidecar.embeddings.pixels import fit  # noqa: E402
from sidecar.embeddings.volume import plane_inputs, series_vector  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "medmnist3d" / "adrenalmnist3d_64.npz"


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def precision(gallery: np.ndarray, yg: np.ndarray, queries: np.ndarray, yq: np.ndarray,
              loo: bool) -> tuple[float, float]:
    sims = unit(queries) @ unit(gallery).T
    if loo:
        np.fill_diagonal(sims, -9.0)
    top = np.argsort(-sims, axis=1, kind="stable")[:, :10]
    hit = yg[top] == yq[:, None]
    return 100.0 * float(hit[:, 0].mean()), 100.0 * float(hit.mean())


def main() -> int:
    if not DATA.exists():
        print(f"skipped: {DATA} is absent")
        return 0
    npz = np.load(DATA)
    train = npz["train_images"].astype(np.float32) / 255.0
    val = npz["val_images"].astype(np.float32) / 255.0
    ytr, yva = npz["train_labels"].ravel(), npz["val_labels"].ravel()
    cfg = Config()
    embedder = load_embedder(cfg.embedding)
    size = embedder.input_size

    def chosen(vols: np.ndarray) -> np.ndarray:
        out = []
        for v in vols:
            out.append(series_vector(embedder.embed(plane_inputs(v, cfg.preprocess, size))))
        return np.stack(out)

    def central(vols: np.ndarray) -> np.ndarray:
        out = []
        for v in vols:
            planes = [np.take(v, v.shape[a] // 2, axis=a) for a in range(3)]
            vecs = embedder.embed(np.stack([fit(p, None, cfg.preprocess, size) for p in planes]))
            out.append(vecs.reshape(-1))
        return np.stack(out)

    def block(vols: np.ndarray, s: int) -> np.ndarray:
        k = vols.shape[1] // s
        return vols.reshape(len(vols), s, k, s, k, s, k).mean(axis=(2, 4, 6)).reshape(len(vols), -1)

    rows = {
        "raw voxels 64^3, centred": (block(train, 64), block(val, 64), True),
        "raw voxels 8^3, centred": (block(train, 8), block(val, 8), True),
        "raw voxels 64^3, not centred": (block(train, 64), block(val, 64), False),
        "one central plane per axis": (central(train), central(val), False),
        "chosen: 3 planes per axis through the content": (chosen(train), chosen(val), False),
    }
    print(f"{'descriptor':48s} {'train LOO P@1/P@10':>20s} {'val P@1/P@10':>16s}")
    for name, (ftr, fva, centred) in rows.items():
        mean = ftr.mean(axis=0) if centred else 0.0
        a = precision(ftr - mean, ytr, ftr - mean, ytr, loo=True)
        b = precision(ftr - mean, ytr, fva - mean, yva, loo=False)
        print(f"{name:48s} {a[0]:9.1f} / {a[1]:4.1f}   {b[0]:7.1f} / {b[1]:4.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
