"""Write UNTRAINED SliceNetV1 weights: a seeded random initialisation.

``python -m sidecar.training.make_initial_weights --out-dir DIR [--seed N]``
writes ``DIR/slicenet-v1-initial-random-seed<N>.pt`` and its JSON
description: :meth:`SliceNetV1.reset_parameters` with a ``torch.Generator``
seeded with ``--seed``, never trained. They are a baseline for experiments
(``sidecar evaluate --model``) and what the first releases shipped; the
package now ships trained weights (``sidecar train``; README, "The shipped
model"). Running the script twice gives byte-identical files (with the same
torch version): the state_dict is serialised in memory, so the bytes do not
depend on the file name.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from sidecar.embeddings.model import atomic_write
from sidecar.embeddings.network import (
    WEIGHTS_FORMAT,
    SliceNetV1,
    SliceNetV1Params,
    file_model_id,
    serialise_state_dict,
)

INPUT_SIZE = 128
"""Input size the initial weights are declared for (the configuration's default)."""


def weights_name(seed: int) -> str:
    """File stem of the initial weights made with ``seed``."""
    return f"slicenet-v1-initial-random-seed{seed}"


def initial_model(seed: int = 0, hparams: SliceNetV1Params | None = None) -> SliceNetV1:
    """A SliceNetV1 initialised deterministically from ``seed``, in eval mode."""
    model = SliceNetV1(hparams)
    model.reset_parameters(torch.Generator().manual_seed(seed))
    return model.eval()


def write_initial_weights(out_dir: Path, seed: int = 0) -> tuple[Path, Path, str]:
    """Write the weights file and its JSON description into ``out_dir``.

    Returns
    -------
    tuple
        The weights path, the JSON path and the model id.
    """
    model = initial_model(seed)
    data = serialise_state_dict(model)
    name = weights_name(seed)
    weights_path = out_dir / f"{name}.pt"
    json_path = out_dir / f"{name}.json"
    model_id = file_model_id(data)
    description: dict[str, Any] = {
        "format": WEIGHTS_FORMAT,
        "name": name,
        "trained": False,
        "status": (
            "NOT TRAINED: deterministic random initialisation. Vectors reflect only "
            "low-level image statistics; replace with trained weights before relying on "
            "similarity results."
        ),
        "architecture": SliceNetV1.ARCHITECTURE,
        "hparams": model.hparams.to_json(),
        "input_size": INPUT_SIZE,
        "input": "N x 1 x S x S float32, pixels in [0, 1] after windowing",
        "output": f"N x {model.hparams.dim} float32, not normalised (embedders L2-normalise)",
        "dim": model.hparams.dim,
        "parameters": model.parameter_count(),
        "seed": seed,
        "initialisation": (
            f"torch.Generator().manual_seed({seed}); conv: Kaiming normal (fan_out, ReLU); "
            "BatchNorm: weight 1, bias 0, running mean 0, running var 1; "
            "linear: normal(0, 1/sqrt(fan_in)), bias 0"
        ),
        "made_by": f"python -m sidecar.training.make_initial_weights --seed {seed}",
        "torch_version": torch.__version__,
        "weights_file": weights_path.name,
        "weights_sha256": hashlib.sha256(data).hexdigest(),
        "model_id": model_id,
    }
    atomic_write(weights_path, data)
    atomic_write(json_path, (json.dumps(description, indent=2) + "\n").encode("utf-8"))
    return weights_path, json_path, model_id


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--out-dir", type=Path, required=True, help="directory to write into")
    parser.add_argument("--seed", type=int, default=0, help="initialisation seed (default 0)")
    args = parser.parse_args(argv)
    weights_path, json_path, model_id = write_initial_weights(args.out_dir, args.seed)
    print(f"wrote {weights_path} ({weights_path.stat().st_size} bytes), model id {model_id}")
    print(f"wrote {json_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
