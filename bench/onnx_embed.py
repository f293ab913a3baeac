"""The CNN alone: the shipped model run by torch vs the same model exported to ONNX.

Run with ``.venv/bin/python bench/onnx_embed.py [--threads 1] [--batch 64]``.
Exports the shipped SliceNetV1 weights with ``export_model_file`` (what
``sidecar model export-onnx`` does) into a temporary directory, loads it as
``embedding.model_path`` would (``OnnxEmbedder``) beside ``TorchEmbedder`` on the
shipped weights, checks the unit vectors agree, then times ``embed`` of one
seeded batch of ``--batch`` slices at 128 px, the two embedders alternately,
``--repeats`` times each after 5 warm-ups. Prints the median and minimum per
batch and slices/s. Needs the ``onnx-export`` extra (the exporter).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from sidecar.config import EmbeddingConfig
from sidecar.embeddings.model import TorchEmbedder, load_embedder
from sidecar.embeddings.onnx_export import export_model_file


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--repeats", type=int, default=40)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "shipped.onnx"
        t0 = time.perf_counter()
        done = export_model_file(None, out, 128)
        export_s = time.perf_counter() - t0
        cfg = EmbeddingConfig(threads=args.threads, batch_size=args.batch)
        torch_emb = TorchEmbedder.from_config(cfg)
        onnx_emb = load_embedder(cfg.model_copy(update={"model_path": out}))
        batch = np.random.default_rng(0).random((args.batch, 128, 128), dtype=np.float32)
        diff = float(np.abs(onnx_emb.embed(batch) - torch_emb.embed(batch)).max())
        times: dict[str, list[float]] = {"torch": [], "onnx": []}
        for i in range(args.repeats + 5):
            for name, emb in (("torch", torch_emb), ("onnx", onnx_emb)):
                start = time.perf_counter()
                emb.embed(batch)
                if i >= 5:
                    times[name].append(time.perf_counter() - start)
    print(f"export: {export_s:.1f} s, model id {done.model_id} (from {done.source_model_id}); "
          f"largest difference of the unit vectors {diff:.1e}")
    print(f"batch {args.batch} x 128 x 128, {args.threads} thread(s), {args.repeats} runs each, "
          f"load average {os.getloadavg()[0]:.1f}")
    for name, values in times.items():
        med = statistics.median(values)
        print(f"{name:>5}: median {med * 1e3:.1f} ms, min {min(values) * 1e3:.1f} ms "
              f"per batch = {args.batch / med:.0f} slices/s (median)")


if __name__ == "__main__":
    main()
