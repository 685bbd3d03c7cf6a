"""ferry's models in PyTorch (issue 16): the same networks as ferry's candle models (crates/train/src/arch.rs,
model.rs), with the same `state_dict` names, so that a recogniser written in Python loads the weights a site holds
(`<state>/current.safetensors`, or any global unpacked with `ferry-client unpack`) with `strict=True`:

    import torch
    from ferry_models import load, read_plates

    model = load("site/current.safetensors", "plate-ctc-v2")   # nn.Module in eval mode, strict=True
    x = torch.rand(4, 1, 32, 96)                                # (batch, 1, 32, 96) grayscale in [0, 1]
    print(read_plates("plate-ctc-v2", model(x)))                # ['12가3456', ...] as ferry reads them

`tests/python_models.rs` (crates/client) checks in CI that a ferry-produced `current.safetensors` loads with
`strict=True` and that the logits and readings match ferry's. `bench/torch_twin.py` times these same classes.

Architectures:
- plate-ctc: input 1x32x96; three blocks conv3x3 pad 1 (32/64/128, no bias) -> BatchNorm2d -> ReLU -> maxpool 2x2
  (-> 128x4x12); per column (12 of them) its 512 features (channel, row) -> fc1 256 + ReLU -> fc2 2x2x68: two rows
  (a two-line plate's top line, then the main line) of 2 steps per column, i.e. two rows of 24 steps, each read
  with CTC (blank = class 0); loss = the rows' CTC losses summed over each plate's total length, batch mean
  (ferry's crates/train/src/ctc.rs).
- plate-ctc-deep: plate-ctc with two more conv3x3 pad 1 -> BatchNorm2d -> ReLU layers without pooling, one after
  the second block (64 channels at 8x24) and one after the third (128 at 4x12): conv1..conv5 with bn1..bn5
  (32/64/64/128/128), the same per-column classifier and reading.
- plate-ctc-v2 (ferry's default plate reader), plate-ctc-deep-v2: plate-ctc and plate-ctc-deep whose last pooling
  is max_pool2d((2, 1)): it halves the height and keeps the 24 columns (-> 128x4x24); per column its 512
  features -> fc1 256 + ReLU -> fc2 2x68: two rows of 24 steps, one per column.
- plate-cnn: input 1x32x96; three blocks conv3x3 pad 1 (16/32/64, no bias) -> BatchNorm2d -> ReLU -> maxpool 2x2;
  fc1 3072->256 + ReLU; 8 heads 256->51 stacked to (batch, 8, 51); loss = mean cross-entropy over the 8 slots.
- mnist-cnn: the FedAvg paper's CNN, input 1x28x28; conv5x5 pad 2 (32) -> ReLU -> pool; conv5x5 pad 2 (64) -> ReLU
  -> pool; fc 3136->512 + ReLU; fc 512->10 (1,663,370 parameters).
Initialisation (`init_like_ferry`): PyTorch's default (weights and biases uniform in +-1/sqrt(fan_in); BatchNorm
gamma=1, beta=0), which is ferry's scheme.
"""
import torch
from torch import nn
import torch.nn.functional as F

__all__ = ["PlateCnn", "PlateCtc", "MnistCnn", "MODELS", "CHARSET", "init_like_ferry", "ctc_loss", "load",
           "read_plates"]

# The tokens of a plate reader's classes (crates/train/src/data/plates/mod.rs `charset`): 0 is the blank, 1..=10
# the digits, then the Hangul syllables, then the region names of two-line plates (plate-ctc only).
SYLLABLES = list("가나다라마거너더러머버서어저고노도로모보소오조구누두루무부수우주바사아자배하허호")
REGIONS = ["서울", "부산", "대구", "인천", "광주", "대전", "울산", "세종", "경기", "강원", "충북", "충남",
           "전북", "전남", "경북", "경남", "제주"]
CHARSET = [" "] + [str(d) for d in range(10)] + SYLLABLES + REGIONS


class PlateCnn(nn.Module):
    def __init__(self):
        super().__init__()
        cin = 1
        for i, cout in enumerate([16, 32, 64], start=1):
            setattr(self, f"conv{i}", nn.Conv2d(cin, cout, 3, padding=1, bias=False))
            setattr(self, f"bn{i}", nn.BatchNorm2d(cout))
            cin = cout
        self.fc1 = nn.Linear(64 * 4 * 12, 256)
        self.heads = nn.ModuleList([nn.Linear(256, 51) for _ in range(8)])

    def forward(self, x):
        for i in (1, 2, 3):
            x = F.max_pool2d(F.relu(getattr(self, f"bn{i}")(getattr(self, f"conv{i}")(x))), 2)
        x = F.relu(self.fc1(x.flatten(1)))
        return torch.stack([h(x) for h in self.heads], 1)


class PlateCtc(nn.Module):
    """The CTC plate readers: conv blocks given as (channels, pool window (rows, columns)), then the per-column
    classifier emitting `sub` steps per column and row."""
    ROWS, CLASSES = 2, 68
    SMALL = ((32, (2, 2)), (64, (2, 2)), (128, (2, 2)))  # plate-ctc
    DEEP = ((32, (2, 2)), (64, (2, 2)), (64, (1, 1)), (128, (2, 2)), (128, (1, 1)))  # plate-ctc-deep
    V2 = ((32, (2, 2)), (64, (2, 2)), (128, (2, 1)))  # plate-ctc-v2
    DEEP_V2 = ((32, (2, 2)), (64, (2, 2)), (64, (1, 1)), (128, (2, 1)), (128, (1, 1)))  # plate-ctc-deep-v2

    def __init__(self, convs=SMALL, hidden=256, sub=2):
        super().__init__()
        self.pools = [p for _, p in convs]
        self.sub = sub
        cin, h = 1, 32
        for i, (cout, pool) in enumerate(convs, start=1):
            setattr(self, f"conv{i}", nn.Conv2d(cin, cout, 3, padding=1, bias=False))
            setattr(self, f"bn{i}", nn.BatchNorm2d(cout))
            cin, h = cout, h // pool[0]
        self.fc1 = nn.Linear(cin * h, hidden)
        self.fc2 = nn.Linear(hidden, self.ROWS * sub * self.CLASSES)

    def forward(self, x):
        for i, pool in enumerate(self.pools, start=1):
            x = F.relu(getattr(self, f"bn{i}")(getattr(self, f"conv{i}")(x)))
            if pool != (1, 1):
                x = F.max_pool2d(x, pool)
        b, c, h, w = x.shape
        x = x.permute(0, 3, 1, 2).reshape(b * w, c * h)  # one row per column, features (channel, row)
        x = self.fc2(F.relu(self.fc1(x))).view(b, w, self.ROWS, self.sub, self.CLASSES)
        # (batch, rows * steps, classes), each row's steps left to right
        return x.permute(0, 2, 1, 3, 4).reshape(b, self.ROWS * w * self.sub, self.CLASSES)


def ctc_loss(logits, rows_targets):
    """rows_targets: per sample, one list of class ids per row (possibly empty)."""
    b, t, k = logits.shape
    rows = len(rows_targets[0])
    steps = t // rows
    total = logits.new_zeros(())
    lengths = torch.tensor([sum(len(r) for r in s) for s in rows_targets], dtype=logits.dtype)
    for r in range(rows):
        lp = F.log_softmax(logits[:, r * steps:(r + 1) * steps], -1).transpose(0, 1)
        tg = torch.tensor([c for s in rows_targets for c in s[r]], dtype=torch.long)
        tl = torch.tensor([len(s[r]) for s in rows_targets])
        il = torch.full((b,), steps, dtype=torch.long)
        per = F.ctc_loss(lp, tg, il, tl, blank=0, reduction="none", zero_infinity=True)
        total = total + (per / lengths).sum()
    return total / b


class MnistCnn(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 5, padding=2)
        self.conv2 = nn.Conv2d(32, 64, 5, padding=2)
        self.fc1 = nn.Linear(3136, 512)
        self.fc2 = nn.Linear(512, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc2(F.relu(self.fc1(x.flatten(1)))).unsqueeze(1)


MODELS = {
    "plate-ctc": (PlateCtc, (1, 32, 96), 8, 68),
    "plate-ctc-deep": (lambda: PlateCtc(PlateCtc.DEEP), (1, 32, 96), 8, 68),
    "plate-ctc-v2": (lambda: PlateCtc(PlateCtc.V2, sub=1), (1, 32, 96), 8, 68),
    "plate-ctc-deep-v2": (lambda: PlateCtc(PlateCtc.DEEP_V2, sub=1), (1, 32, 96), 8, 68),
    "plate-cnn": (PlateCnn, (1, 32, 96), 8, 51),
    "mnist-cnn": (MnistCnn, (1, 28, 28), 1, 10),
}


def init_like_ferry(model):
    # Kaiming-uniform with a=sqrt(5) == uniform(+-1/sqrt(fan_in)) for weights, the same bound for biases.
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            fan_in = m.weight[0].numel()
            bound = 1.0 / fan_in**0.5
            nn.init.uniform_(m.weight, -bound, bound)
            if m.bias is not None:
                nn.init.uniform_(m.bias, -bound, bound)




def load(path, arch):
    """The model `arch` ("plate-ctc", "plate-cnn", "mnist-cnn") with the weights of the safetensors file at `path`
    (a site's current.safetensors, or an unpacked global), loaded with strict=True, in eval mode."""
    from safetensors.torch import load_file
    model = MODELS[arch][0]()
    model.load_state_dict(load_file(str(path)), strict=True)
    return model.eval()


def read_plates(arch, logits):
    """What a plate reader's logits say, as ferry reads them: plate-ctc decodes each of the two rows greedily
    (arg-max per step, repeats collapsed, blanks dropped) and joins them; plate-cnn takes each slot's arg-max and
    drops blanks. Returns one string per sample."""
    ids = logits.argmax(-1).tolist()
    out = []
    for seq in ids:
        if arch.startswith("plate-ctc"):
            steps = len(seq) // PlateCtc.ROWS
            tokens = []
            for r in range(PlateCtc.ROWS):
                prev = 0
                for c in seq[r * steps:(r + 1) * steps]:
                    if c != 0 and c != prev:
                        tokens.append(c)
                    prev = c
            tokens = tokens[-8:]  # ferry keeps the last 8 tokens (its label slots)
        else:
            tokens = [c for c in seq if c != 0]
        out.append("".join(CHARSET[c] if c < len(CHARSET) else "?" for c in tokens))
    return out
