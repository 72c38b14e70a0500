"""The seed workload W as a plain PyTorch script: what a user would write without fedtorrent.

MNIST from its ``.gz`` files, 6 nodes on an even random split of all 60,000 training images,
logistic regression, 10 rounds of 1 local epoch (SGD, lr 0.1, batch 64, ``torch.optim.SGD``
per node), then every node takes the mean of all 6 models (complete graph, fixed mixing), and
every node is scored on the 10,000 test images after every round. ``benchmarks/sim_speed.py``
times it from outside the process beside ``fedtorrent simulate`` doing the same work.

    FEDTORRENT_DATA=../shared/data .venv/bin/python benchmarks/plain_seed.py
"""

from __future__ import annotations

import gzip
import os
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

NODES, ROUNDS, LR, BATCH = 6, 10, 0.1, 64


def idx(path: Path, offset: int) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        return np.frombuffer(f.read(), dtype=np.uint8, offset=offset)


def main() -> None:
    root = Path(os.environ.get("FEDTORRENT_DATA", sys.argv[1] if len(sys.argv) > 1 else "."))
    folder = root / "mnist"
    x_train = torch.from_numpy(idx(folder / "train-images-idx3-ubyte.gz", 16).astype(np.float32))
    x_train = x_train.view(-1, 784) / 255.0
    y_train = torch.from_numpy(idx(folder / "train-labels-idx1-ubyte.gz", 8).astype(np.int64))
    x_test = torch.from_numpy(idx(folder / "t10k-images-idx3-ubyte.gz", 16).astype(np.float32))
    x_test = x_test.view(-1, 784) / 255.0
    y_test = torch.from_numpy(idx(folder / "t10k-labels-idx1-ubyte.gz", 8).astype(np.int64))
    torch.manual_seed(0)
    parts = torch.randperm(len(y_train)).chunk(NODES)
    models = [nn.Linear(784, 10) for _ in range(NODES)]
    for model in models[1:]:
        model.load_state_dict(models[0].state_dict())
    accuracy = 0.0
    for _ in range(ROUNDS):
        for model, part in zip(models, parts, strict=True):
            optimizer = torch.optim.SGD(model.parameters(), lr=LR)
            order = part[torch.randperm(len(part))]
            for start in range(0, len(order), BATCH):
                index = order[start : start + BATCH]
                optimizer.zero_grad()
                nn.functional.cross_entropy(model(x_train[index]), y_train[index]).backward()
                optimizer.step()
        with torch.no_grad():
            mean = {
                key: torch.stack([m.state_dict()[key] for m in models]).mean(dim=0)
                for key in models[0].state_dict()
            }
            for model in models:
                model.load_state_dict(mean)
            scores = [(m(x_test).argmax(dim=1) == y_test).float().mean() for m in models]
            accuracy = float(torch.stack(scores).mean())
    print(f"plain PyTorch: {NODES} nodes, {ROUNDS} rounds, mean test accuracy {accuracy:.4f}")


if __name__ == "__main__":
    main()
