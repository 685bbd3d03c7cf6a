#!/usr/bin/env python3
"""Does the network itself learn two-line plates? (issue 12) Trains the PyTorch twin of plate-ctc
(python/ferry_models.py, F.ctc_loss) on plates dumped by ferry's renderer, two epochs, batch 32, Adam 2e-3,
printing the loss, the exact-match rate on the first 256 plates and three readings every 100 steps.

    FERRY_RENDER="plain,two_line=1" target/release/examples/dump_plates tight 16000 777 /tmp/tl2
    .venv/bin/python bench/two_line_twin.py /tmp/tl2 16000
"""
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
from ferry_models import CHARSET, MODELS, ctc_loss, init_like_ferry, read_plates  # noqa: E402

FIRST_REGION = 51


def lines(label):
    """A plate's two lines as ferry splits them (crates/train/src/data/plates/mod.rs `lines`)."""
    t = [int(c) for c in label if c]
    return [t[:3], t[3:]] if t[0] >= FIRST_REGION and len(t) > 3 else [[], t]


def main():
    prefix, n = sys.argv[1], int(sys.argv[2])
    torch.manual_seed(0)
    torch.set_num_threads(2)
    x = np.fromfile(prefix + ".u8", dtype=np.uint8).reshape(n, 1, 32, 96).astype(np.float32) / 255.0
    x = torch.tensor(x)
    labels = np.fromfile(prefix + ".labels", dtype=np.uint8).reshape(n, 8)
    targets = [lines(label) for label in labels]
    truth = ["".join(CHARSET[c] for c in label if c) for label in labels[:256]]
    model = MODELS["plate-ctc"][0]()
    init_like_ferry(model)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    start = time.time()
    for epoch in range(2):
        perm = torch.randperm(n)
        for i in range(0, n, 32):
            idx = perm[i:i + 32]
            loss = ctc_loss(model(x[idx]), [targets[j] for j in idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            if (i // 32) % 100 == 0:
                model.eval()
                with torch.no_grad():
                    read = read_plates("plate-ctc", model(x[:256]))
                model.train()
                exact = sum(a == b for a, b in zip(read, truth)) / 256
                print(f"epoch {epoch} step {i // 32} loss {loss.item():.3f} exact {exact:.3f} "
                      f"read {read[:3]} truth {truth[:3]} {time.time() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
