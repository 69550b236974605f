"""FID's Inception-v3: the 2015 TensorFlow graph FID was defined on (Heusel et al. 2017), as a
PyTorch module, from a local weights file (nothing is downloaded).

The network is torchvision's Inception-v3 with the TF graph's differences (the ones pytorch-fid
and torch-fidelity also make): BatchNorm eps 1e-3, average pools in the A, C and first E blocks
that leave the padding out of the count, a max pool in the second E block, and a 1008-class
head. Module names follow pytorch-fid / torch-fidelity (`Conv2d_1a_3x3.conv`, `Mixed_5b.
branch1x1.bn`, ...), so their weight files load as they are: `pt_inception-2015-12-05-
6726825d.pth` (pytorch-fid) or `weights-inception-2015-12-05-6726825d.pth` (torch-fidelity);
a `.safetensors` conversion of either too. `.pth` files are read with
`torch.load(weights_only=True)`, which builds tensors and containers only, never runs code.

Images are scored as the PNGs they would be saved as: quantized to 8 bits, resized to 299 by
one of three rules, then mapped to [-1, 1] by (x - 128) / 128 as the TF graph does:

- `clean` (default; clean-fid, Parmar et al. 2022): PIL bicubic with antialiasing per channel
  on the float image, the resize without aliasing that makes FIDs comparable across libraries;
- `tf`: TensorFlow 1's bilinear resize without half-pixel centres (what TF FID and
  torch-fidelity compute, "legacy-tensorflow");
- `torch`: torch's bilinear resize with half-pixel centres (pytorch-fid, "legacy-pytorch").
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from ..errors import UserError

SIZE = 299
RESIZES = ("clean", "tf", "torch")


class Conv(nn.Module):
    """Convolution without bias, BatchNorm (eps 1e-3), ReLU."""

    def __init__(self, cin: int, cout: int, kernel, stride: int = 1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=1e-3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _avg3(x: torch.Tensor) -> torch.Tensor:
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class BlockA(nn.Module):
    """35x35: 1x1, 5x5, double 3x3 and pooled branches."""

    def __init__(self, cin: int, pool: int):
        super().__init__()
        self.branch1x1 = Conv(cin, 64, 1)
        self.branch5x5_1, self.branch5x5_2 = Conv(cin, 48, 1), Conv(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = Conv(cin, 64, 1)
        self.branch3x3dbl_2 = Conv(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = Conv(96, 96, 3, padding=1)
        self.branch_pool = Conv(cin, pool, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        double = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), self.branch5x5_2(self.branch5x5_1(x)), double,
                          self.branch_pool(_avg3(x))], 1)  # fmt: skip


class BlockB(nn.Module):
    """35 -> 17: strided 3x3, strided double 3x3, max pool."""

    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3 = Conv(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = Conv(cin, 64, 1)
        self.branch3x3dbl_2 = Conv(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = Conv(96, 96, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        double = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), double, F.max_pool2d(x, 3, stride=2)], 1)


class BlockC(nn.Module):
    """17x17: factorised 7x7 (1x7 then 7x1) branches of width c7."""

    def __init__(self, cin: int, c7: int):
        super().__init__()
        row, col = {"kernel": (1, 7), "padding": (0, 3)}, {"kernel": (7, 1), "padding": (3, 0)}
        self.branch1x1 = Conv(cin, 192, 1)
        self.branch7x7_1 = Conv(cin, c7, 1)
        self.branch7x7_2 = Conv(c7, c7, **row)
        self.branch7x7_3 = Conv(c7, 192, **col)
        self.branch7x7dbl_1 = Conv(cin, c7, 1)
        self.branch7x7dbl_2 = Conv(c7, c7, **col)
        self.branch7x7dbl_3 = Conv(c7, c7, **row)
        self.branch7x7dbl_4 = Conv(c7, c7, **col)
        self.branch7x7dbl_5 = Conv(c7, 192, **row)
        self.branch_pool = Conv(cin, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        single = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        double = self.branch7x7dbl_1(x)
        for conv in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                     self.branch7x7dbl_5):  # fmt: skip
            double = conv(double)
        return torch.cat([self.branch1x1(x), single, double, self.branch_pool(_avg3(x))], 1)


class BlockD(nn.Module):
    """17 -> 8: strided 3x3, 7x7 then strided 3x3, max pool."""

    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3_1, self.branch3x3_2 = Conv(cin, 192, 1), Conv(192, 320, 3, stride=2)
        self.branch7x7x3_1 = Conv(cin, 192, 1)
        self.branch7x7x3_2 = Conv(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = Conv(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = Conv(192, 192, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        seven = self.branch7x7x3_1(x)
        for conv in (self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
            seven = conv(seven)
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), seven,
                          F.max_pool2d(x, 3, stride=2)], 1)  # fmt: skip


class BlockE(nn.Module):
    """8x8: 1x3 and 3x1 halves side by side; `max_pool` in the last block (the TF graph's)."""

    def __init__(self, cin: int, max_pool: bool):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = Conv(cin, 320, 1)
        self.branch3x3_1 = Conv(cin, 384, 1)
        self.branch3x3_2a = Conv(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = Conv(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = Conv(cin, 448, 1)
        self.branch3x3dbl_2 = Conv(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = Conv(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = Conv(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = Conv(cin, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.branch3x3_1(x)
        b = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else _avg3(x)
        return torch.cat([
            self.branch1x1(x),
            self.branch3x3_2a(a), self.branch3x3_2b(a),
            self.branch3x3dbl_3a(b), self.branch3x3dbl_3b(b),
            self.branch_pool(pooled),
        ], 1)  # fmt: skip


class FIDInception(nn.Module):
    """(B, 3, 299, 299) in [-1, 1] -> (B, 2048) pool features."""

    def __init__(self) -> None:
        super().__init__()
        self.Conv2d_1a_3x3 = Conv(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = Conv(32, 32, 3)
        self.Conv2d_2b_3x3 = Conv(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = Conv(64, 80, 1)
        self.Conv2d_4a_3x3 = Conv(80, 192, 3)
        self.Mixed_5b, self.Mixed_5c, self.Mixed_5d = (
            BlockA(192, 32),
            BlockA(256, 64),
            BlockA(288, 64),
        )
        self.Mixed_6a = BlockB(288)
        self.Mixed_6b, self.Mixed_6c = BlockC(768, 128), BlockC(768, 160)
        self.Mixed_6d, self.Mixed_6e = BlockC(768, 160), BlockC(768, 192)
        self.Mixed_7a = BlockD(768)
        self.Mixed_7b, self.Mixed_7c = BlockE(1280, max_pool=False), BlockE(2048, max_pool=True)
        self.fc = nn.Linear(2048, 1008)  # the TF head: in the files, unused for FID

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(F.max_pool2d(x, 3, stride=2)))
        x = F.max_pool2d(x, 3, stride=2)
        for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
            x = getattr(self, f"Mixed_{name}")(x)
        return x.mean((2, 3))


def load_inception(path: str | Path) -> FIDInception:
    """The network with the weights of a local file (.pth or .safetensors), in eval mode."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"Inception weights not found: {path} (pytorch-fid's "
                        "pt_inception-2015-12-05-6726825d.pth or torch-fidelity's "
                        "weights-inception-2015-12-05-6726825d.pth)")  # fmt: skip
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # any reader failure (pickle, zip, format) is a bad file
        raise UserError(f"{path}: not a readable weights file ({type(e).__name__})") from None
    if not isinstance(state, dict):
        raise UserError(f"{path}: holds a {type(state).__name__}, not a state dict")
    net = FIDInception()
    from ..io.checkpoint import load_state_strict

    load_state_strict(net, state, f"{path} (FID Inception-v3)")
    return net.eval().requires_grad_(False)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> 0..255 as a PNG would store it (float, whole numbers)."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round()


def _resize_tf(x: torch.Tensor, size: int) -> torch.Tensor:
    """TF1 `resize_bilinear(align_corners=False)`: output pixel i samples input i * in / out
    (no half-pixel centres), clamped at the far edge."""
    for dim in (2, 3):
        n = x.shape[dim]
        src = torch.arange(size, dtype=torch.float64) * (n / size)
        lo = src.floor().long().clamp(max=n - 1)
        hi = (lo + 1).clamp(max=n - 1)
        w = (src - lo).to(x.dtype)
        shape = [1, 1, 1, 1]
        shape[dim] = size
        w = w.view(shape)
        x = x.index_select(dim, lo) * (1 - w) + x.index_select(dim, hi) * w
    return x


def _resize_clean(x: torch.Tensor, size: int) -> torch.Tensor:
    """clean-fid: each channel as a float PIL image, bicubic (antialiased) to size."""
    out = np.empty((x.shape[0], x.shape[1], size, size), dtype=np.float32)
    for i, image in enumerate(x.cpu().numpy().astype(np.float32)):
        for c, channel in enumerate(image):
            resized = Image.fromarray(channel, mode="F").resize((size, size), Image.BICUBIC)
            out[i, c] = np.asarray(resized)
    return torch.from_numpy(out)


def prepare(images: torch.Tensor, resize: str = "clean") -> torch.Tensor:
    """(B, 3, H, W) images in [-1, 1] -> the network's (B, 3, 299, 299) input."""
    if resize not in RESIZES:
        raise UserError(f"unknown resize {resize!r}; choose one of {', '.join(RESIZES)}")
    x = to_uint8(images)
    if x.shape[-2:] != (SIZE, SIZE):
        if resize == "clean":
            x = _resize_clean(x, SIZE)
        elif resize == "tf":
            x = _resize_tf(x, SIZE)
        else:
            x = F.interpolate(x, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    return (x - 128) / 128


class InceptionFeatures:
    """A feature network for `metrics.fid_eval`: images in [-1, 1] -> (B, 2048) float64."""

    def __init__(self, path: str | Path, resize: str = "clean", device: str = "cpu"):
        self.net = load_inception(path).to(device)
        self.resize, self.device = resize, device
        prepare(torch.zeros(1, 3, 2, 2), resize)  # an unknown resize fails here

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> np.ndarray:
        x = prepare(images, self.resize).to(self.device)
        return self.net(x).double().cpu().numpy()
