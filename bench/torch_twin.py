#!/usr/bin/env python3
"""PyTorch twin of ferry's models (issue 7): same architectures, same initialisation scheme, same batch, timing
training and inference steps on the CPU, printing the same JSON as `ferry-lab bench train|infer --json`.

    python3 bench/torch_twin.py --model plate-cnn --batch 64 --steps 30 --threads 2

Same network, checked: `cargo run --release -p ferry-train --example twin_check -- plate-ctc-v2 /tmp/twin` writes a
trained ferry model and a batch with ferry's logits; `python3 bench/torch_twin.py check --model plate-ctc-v2 --dir
/tmp/twin` loads the weights into the twin with `load_state_dict(strict=True)` and compares the logits.

Architectures (python/ferry_models.py, the same as crates/train/src/arch.rs, model.rs):
- plate-ctc: input 1x32x96; three blocks conv3x3 pad 1 (32/64/128, no bias) -> BatchNorm2d -> ReLU -> maxpool 2x2
  (-> 128x4x12); per column (12 of them) its 512 features (channel, row) -> fc1 256 + ReLU -> fc2 2x2x68: two rows
  (a two-line plate's top line, then the main line) of 2 steps per column, i.e. two rows of 24 steps, each read
  with CTC (blank = class 0); loss = the rows' CTC losses summed over each plate's total length, batch mean
  (ferry's crates/train/src/ctc.rs).
- plate-ctc-deep: plate-ctc with two more conv3x3 pad 1 -> BatchNorm2d -> ReLU layers without pooling, one after
  the second block (64 channels at 8x24) and one after the third (128 at 4x12): conv1..conv5 with bn1..bn5
  (32/64/64/128/128), the same per-column classifier and reading.
- plate-ctc-v2 (ferry's default plate reader), plate-ctc-deep-v2: plate-ctc and plate-ctc-deep whose last pooling
  is max_pool2d((2, 1)), halving the height and keeping the 24 columns (-> 128x4x24); per column its 512 features
  -> fc1 256 + ReLU -> fc2 2x68: two rows of 24 steps, one per column.
- plate-ctc-deep-v3: plate-ctc-deep-v2 after one more conv3x3 pad 1 (16 channels, no bias) -> BatchNorm2d -> ReLU
  at the full 32x96, before the first pooling: conv1..conv6 with bn1..bn6 (16/32/64/64/128/128).
- plate-ctc-deep-v4: plate-ctc-deep-v3 with one more conv3x3 pad 1 (32 channels) -> BatchNorm2d -> ReLU at 16x48,
  between the first and the second pooling: conv1..conv7 with bn1..bn7 (16/32/32/64/64/128/128).
- plate-cnn: input 1x32x96; three blocks conv3x3 pad 1 (16/32/64, no bias) -> BatchNorm2d -> ReLU -> maxpool 2x2;
  fc1 3072->256 + ReLU; 8 heads 256->51 stacked to (batch, 8, 51); loss = mean cross-entropy over the 8 slots.
- mnist-cnn: the FedAvg paper's CNN, input 1x28x28; conv5x5 pad 2 (32) -> ReLU -> pool; conv5x5 pad 2 (64) -> ReLU
  -> pool; fc 3136->512 + ReLU; fc 512->10 (1,663,370 parameters).
Initialisation: PyTorch's default (weights and biases uniform in +-1/sqrt(fan_in); BatchNorm gamma=1, beta=0),
which is ferry's scheme. Optimizer: Adam lr 2.5e-4 (no warm-up in the bench), betas (0.9, 0.999), eps 1e-8.
Input: uniform [0, 1) random images and random labels from a fixed seed.
"""
import argparse
import json
import time

import os
import sys

import torch
import torch.nn.functional as F

# The model classes have one owner, python/ferry_models.py (issue 16); the twin times them.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
from ferry_models import MODELS, ctc_loss, init_like_ferry  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["train", "infer", "check"], nargs="?", default="train")
    p.add_argument("--dir", help="check: the folder twin_check wrote")
    p.add_argument("--model", default="plate-cnn", choices=sorted(MODELS))
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu", help="cpu or cuda (timed with torch.cuda.synchronize)")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(1)
    cls, (c, h, w), slots, classes = MODELS[a.model]
    model = cls()
    init_like_ferry(model)
    if a.mode == "check":
        from safetensors.torch import load_file
        model.load_state_dict(load_file(f"{a.dir}/weights.safetensors"), strict=True)
        model.eval()
        io = load_file(f"{a.dir}/io.safetensors")
        with torch.inference_mode():
            out = model(io["x"])
        diff = (out - io["logits"]).abs().max().item()
        scale = io["logits"].abs().max().item()
        print(json.dumps({"model": a.model, "strict_load": True, "logits": list(out.shape),
                          "max_abs_diff": diff, "max_abs_logit": scale}))
        raise SystemExit(0 if diff <= 1e-4 * max(1.0, scale) else 1)
    dev = torch.device(a.device)
    model.to(dev)
    x = torch.rand(a.batch, c, h, w).to(dev)
    y = torch.randint(0, classes, (a.batch * slots,)).to(dev)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    if a.model.startswith("plate-ctc"):
        # Random one-line plates (7 or 8 digits and syllables in the main row, an empty top row), as ferry's
        # bench draws them (crates/train/src/bench.rs).
        g = torch.Generator().manual_seed(2)
        targets = [[[], torch.randint(1, 51, (7 + int(torch.randint(0, 2, (1,), generator=g)),), generator=g).tolist()]
                   for _ in range(a.batch)]
        loss_fn = lambda out: ctc_loss(out, targets)
    else:
        loss_fn = lambda out: F.cross_entropy(out.reshape(-1, classes), y)
    if a.mode == "train":
        model.train()
        opt = torch.optim.Adam(model.parameters(), lr=2.5e-4)

        def step():
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(x))
            loss.backward()
            opt.step()
    else:
        model.eval()

        def step():
            with torch.inference_mode():
                model(x)

    for _ in range(a.warmup):
        step()
    sync()
    t = time.perf_counter()
    for _ in range(a.steps):
        step()
    sync()
    dt = time.perf_counter() - t
    params = sum(p.numel() for p in model.parameters())
    print(json.dumps({
        "model": a.model, "params": params, "batch": a.batch, "threads": a.threads, "device": a.device,
        "img_per_s": a.batch * a.steps / dt, "ms_per_step": dt * 1e3 / a.steps,
    }))


if __name__ == "__main__":
    main()
