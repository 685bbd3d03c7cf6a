"""ferry's models in PyTorch (issue 16): the same networks as ferry's candle models (crates/train/src/arch.rs,
model.rs), with the same `state_dict` names, so that a recogniser written in Python loads the weights a site holds
(`<state>/current.safetensors`, or any global unpacked with `ferry-client unpack`) with `strict=True`:

    import torch
    from ferry_models import load, read_images

    model = load("site/current.safetensors", "plate-ctc-v2")   # nn.Module in eval mode, strict=True
    x = torch.rand(4, 1, 32, 96)                                # (batch, 1, 32, 96) grayscale in [0, 1]
    print(read_images(model, "plate-ctc-v2", x))                # ['12가3456', ...] as ferry reads them

`read_images` averages the readings of the image and its one-pixel shifts down and right, as ferry does
(`reading_scores`); `read_plates(arch, model(x))` reads the unshifted logits only.

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
- plate-ctc-deep-v3: plate-ctc-deep-v2 after one more conv3x3 pad 1 (16 channels, no bias) -> BatchNorm2d -> ReLU
  at the full 32x96, before the first pooling: conv1..conv6 with bn1..bn6 (16/32/64/64/128/128).
- plate-ctc-deep-v4: plate-ctc-deep-v3 with one more conv3x3 pad 1 (32 channels) -> BatchNorm2d -> ReLU at 16x48,
  between the first and the second pooling: conv1..conv7 with bn1..bn7 (16/32/32/64/64/128/128).
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
           "read_plates", "reading_scores", "read_images"]

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
    DEEP_V3 = ((16, (1, 1)),) + DEEP_V2  # plate-ctc-deep-v3
    DEEP_V4 = DEEP_V3[:2] + ((32, (1, 1)),) + DEEP_V3[2:]  # plate-ctc-deep-v4

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
    lengths = torch.tensor([sum(len(r) for r in s) for s in rows_targets], dtype=logits.dtype,
                           device=logits.device)
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
    "plate-ctc-deep-v3": (lambda: PlateCtc(PlateCtc.DEEP_V3, sub=1), (1, 32, 96), 8, 68),
    "plate-ctc-deep-v4": (lambda: PlateCtc(PlateCtc.DEEP_V4, sub=1), (1, 32, 96), 8, 68),
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


# The plate formats (crates/train/src/data/plates/mod.rs `syntax`): per format the token classes of the top line,
# then of the bottom line, each class a range of class ids. One-line plates: 2 or 3 digits, a syllable, 4 digits;
# two-line plates: a region and 2 digits above a syllable and 4 digits.
_D, _S, _R = range(1, 11), range(11, 11 + len(SYLLABLES)), range(11 + len(SYLLABLES), len(CHARSET))
SYNTAX = [
    [[], [_D, _D, _S, _D, _D, _D, _D]],
    [[], [_D, _D, _D, _S, _D, _D, _D, _D]],
    [[_R, _D, _D], [_S, _D, _D, _D, _D]],
]


def _best_path(lp, pattern):
    """The best CTC alignment of one row (lp: T lists of K log-probabilities) to a sequence matching `pattern`:
    (log-probability, sequence), or None. The same search as ferry's `ctc::best_path`: states "blank after j
    characters" and "character j as class c"; character j is entered from the blank before it, or from character
    j - 1 when the classes differ."""
    T, L, NEG = len(lp), len(pattern), float("-inf")
    blank = [NEG] * (L + 1)
    chars = [[NEG] * len(r) for r in pattern]
    blank[0] = lp[0][0]
    if L:
        chars[0] = [lp[0][c] for c in pattern[0]]
    back = []  # per step: (blank pointers, char pointers); a pointer is ("b", j) or ("c", j, i)
    for t in range(1, T):
        step = lp[t]
        top = []
        for j in range(L):
            order = sorted(range(len(chars[j])), key=lambda i: -chars[j][i])[:2]
            top.append(order)
        nb, bb = [NEG] * (L + 1), [None] * (L + 1)
        for j in range(L + 1):
            v, frm = blank[j], ("b", j)
            if j > 0 and top[j - 1] and chars[j - 1][top[j - 1][0]] > v:
                v, frm = chars[j - 1][top[j - 1][0]], ("c", j - 1, top[j - 1][0])
            nb[j], bb[j] = v + step[0], frm
        nc, bc = [], []
        for j, r in enumerate(pattern):
            row, ptr = [], []
            for i, c in enumerate(r):
                v, frm = chars[j][i], ("c", j, i)
                if blank[j] > v:
                    v, frm = blank[j], ("b", j)
                if j > 0:
                    best = [m for m in top[j - 1] if pattern[j - 1][m] != c][:1]
                    if best and chars[j - 1][best[0]] > v:
                        v, frm = chars[j - 1][best[0]], ("c", j - 1, best[0])
                row.append(v + step[c])
                ptr.append(frm)
            nc.append(row)
            bc.append(ptr)
        blank, chars = nb, nc
        back.append((bb, bc))
    end, state = blank[L], ("b", L)
    if L:
        for i, v in enumerate(chars[L - 1]):
            if v > end:
                end, state = v, ("c", L - 1, i)
    if end == NEG:
        return None
    seq = []
    for t in range(T - 1, -1, -1):
        frm = None
        if t > 0:
            bb, bc = back[t - 1]
            frm = bb[state[1]] if state[0] == "b" else bc[state[1]][state[2]]
        if state[0] == "c" and frm != state:
            seq.append(pattern[state[1]][state[2]])
        state = frm
    return end, seq[::-1]


def read_plates(arch, logits):
    """What a plate reader's logits say, as ferry reads them. plate-ctc*: of the plate formats (`SYNTAX`), the
    string whose best CTC alignment over the two rows is most likely (a sample no format fits is read greedily:
    arg-max per step, repeats collapsed, blanks dropped); plate-cnn: each slot's arg-max, blanks dropped. Returns
    one string per sample. (Pure Python, about 10 ms per plate.)"""
    out = []
    if arch.startswith("plate-ctc"):
        lps = torch.log_softmax(logits.detach().double(), -1).tolist()
        for lp in lps:
            steps = len(lp) // PlateCtc.ROWS
            rows = [lp[r * steps:(r + 1) * steps] for r in range(PlateCtc.ROWS)]
            best = None
            for fmt in SYNTAX:
                found = [_best_path(row, pat) for row, pat in zip(rows, fmt)]
                if all(found):
                    score = sum(f[0] for f in found)
                    if best is None or score > best[0]:
                        best = (score, [c for f in found for c in f[1]])
            if best is None:
                tokens = []
                for row in rows:
                    prev = 0
                    for c in (max(range(len(p)), key=p.__getitem__) for p in row):
                        if c != 0 and c != prev:
                            tokens.append(c)
                        prev = c
                tokens = tokens[-8:]  # ferry keeps the last 8 tokens (its label slots)
            else:
                tokens = best[1]
            out.append("".join(CHARSET[c] for c in tokens))
        return out
    for seq in logits.argmax(-1).tolist():
        out.append("".join(CHARSET[c] if c < len(CHARSET) else "?" for c in seq if c != 0))
    return out


# The one-pixel shifts (rows down, columns right; edges repeated) a CTC plate reader's reading averages with the
# image's own (crates/train/src/train.rs `READING_SHIFTS`).
READING_SHIFTS = [(1, 0), (0, 1)]


def _shift(x, dim, by):
    """`x` moved by `by` pixels along `dim` (towards higher indices when positive), the edge row or column repeated
    into the gap (ferry's `train::shift`)."""
    n, size = abs(by), x.shape[dim]
    if n == 0:
        return x
    if n >= size:
        raise ValueError(f"a reading shift of {by} pixels does not fit {size} pixels")
    if by > 0:
        return torch.cat([x.narrow(dim, 0, 1).repeat_interleave(n, dim), x.narrow(dim, 0, size - n)], dim)
    return torch.cat([x.narrow(dim, n, size - n), x.narrow(dim, size - 1, 1).repeat_interleave(n, dim)], dim)


def reading_scores(model, arch, x):
    """The scores ferry reads images by (`train::reading_scores`): for a CTC plate reader, the mean log-softmax
    over `x` and its `READING_SHIFTS`; for any other model, its logits."""
    with torch.inference_mode():
        logits = model(x)
        if not arch.startswith("plate-ctc"):
            return logits
        total = torch.log_softmax(logits, -1)
        for dy, dx in READING_SHIFTS:
            total = total + torch.log_softmax(model(_shift(_shift(x, 2, dy), 3, dx)), -1)
        return total / (1 + len(READING_SHIFTS))


def read_images(model, arch, x):
    """What `model` reads on images `x` (batch, 1, 32, 96), exactly as ferry reads them: `read_plates` of
    `reading_scores`."""
    return read_plates(arch, reading_scores(model, arch, x))
