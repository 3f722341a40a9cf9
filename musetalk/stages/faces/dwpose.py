"""DWPose whole-body landmarks in plain PyTorch: the network, top-down inference and a landmark backend.

The reference MuseTalk takes its 68 face landmarks from DWPose (RTMPose-L whole-body, distilled) through
mmpose's ``inference_topdown`` with the config ``rtmpose-l_8xb32-270e_coco-ubody-wholebody-384x288.py``.
This module rebuilds that path without mmcv / mmpose / mmengine / mmdet:

- the network: a CSPNeXt backbone (``mmdet.models.backbones.CSPNeXt``, P5 arch) and an RTMCC head
  (``mmpose.models.heads.RTMCCHead``), module names chosen so that the official ``dw-ll_ucoco_384.pth`` state
  dict (``backbone.*`` / ``head.*``) loads strictly;
- top-down inference: box -> center/scale (padding 1.25) -> aspect fixed to 288:384 -> affine warp (the
  non-UDP ``get_warp_matrix``: the config's ``TopdownAffine`` has ``use_udp=False``) -> BGR->RGB, mean/std ->
  network, with the flip test (the flipped input's SimCC vectors mirrored back and averaged) -> SimCC argmax
  decode -> image coordinates;
- :class:`DWPoseBackend`, the ``LandmarkBackend`` that returns whole-body keypoints 23..90 (the 68 iBUG face
  points) cast to int32, as the reference does.

Provenance (Apache-2.0 / MIT sources, read for facts; the code here is written anew, nothing is copied):
open-mmlab/mmpose ``mmpose/models/backbones/cspnext.py`` @389b8fb, ``models/utils/csp_layer.py`` @07418f5,
``models/utils/rtmcc_block.py`` @4ac861d, ``models/heads/coord_cls_heads/rtmcc_head.py`` @5301a6e,
``codecs/simcc_label.py`` @01d4e7b, ``structures/bbox/transforms.py`` @4d78724 (and the newer horizontal
``src_dir`` form), ``datasets/transforms/topdown_transforms.py`` @003cac4, ``configs/_base_/datasets/coco_wholebody.py``
@03508d9, ``configs/wholebody_2d_keypoint/rtmpose/ubody/rtmpose-l_8xb32-270e_coco-ubody-wholebody-384x288.py``
@084212b, ``apis/inference.py`` and ``pose_estimators/topdown.py`` (whole-frame box, ``add_pred_to_datasample``);
TMElyralab/MuseTalk ``musetalk/utils/preprocessing.py`` @d861498 (keypoints 23..90, ``astype(np.int32)``).
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping, Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from musetalk.devices import resolve_device
from musetalk.errors import InputError, WeightsError
from musetalk.stages.faces.types import Box, FaceLandmarks
from musetalk.weights import default_models_dir, load_into, load_state_dict
from musetalk.weights.registry import WEIGHTS

log = logging.getLogger(__name__)

CHECKPOINT_RELPATH = WEIGHTS["dwpose"].dest  # inside the models folder (download_weights.sh layout)
DOWNLOAD_FIX = "run `musetalk download` (it fetches dwpose/dw-ll_ucoco_384.pth from HF yzd-v/DWPose)"

NUM_WHOLEBODY_KEYPOINTS = 133  # COCO-WholeBody: 17 body, 6 feet, 68 face, 2 x 21 hands
FACE_SLICE = slice(23, 91)  # keypoints 23..90 are the 68 face points in iBUG-68 order

# Keys an mmpose checkpoint may carry that inference never reads. They are dropped by these exact module
# prefixes (the training loss and the data preprocessor's mean/std); any other surplus key still fails the
# strict load. The golden checkpoints hold none of them.
UNUSED_KEY_PREFIXES: tuple[str, ...] = ("head.loss_module.", "data_preprocessor.")


# ----------------------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------------------

# CSPNeXt stages, as mmdet's ``CSPNeXt.arch_settings``: in, out, blocks, add_identity, use_spp.
ARCH_SETTINGS: dict[str, list[tuple[int, int, int, bool, bool]]] = {
    "P5": [(64, 128, 3, True, False), (128, 256, 6, True, False), (256, 512, 6, True, False),
           (512, 1024, 3, False, True)],
    "P6": [(64, 128, 3, True, False), (128, 256, 6, True, False), (256, 512, 6, True, False),
           (512, 768, 3, True, False), (768, 1024, 3, False, True)],
}

_ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {"SiLU": nn.SiLU, "ReLU": nn.ReLU}


@dataclass(frozen=True)
class DWPoseConfig:
    """Architecture and pre-processing of a DWPose / RTMPose whole-body model.

    The defaults are the real DWPose-L config (``rtmpose-l_8xb32-270e_coco-ubody-wholebody-384x288``);
    golden sets give smaller values through :meth:`from_manifest`.
    """

    # backbone: CSPNeXt
    arch: str = "P5"  # stage table, see ARCH_SETTINGS
    deepen_factor: float = 1.0  # blocks per CSP layer = max(round(blocks * deepen_factor), 1)
    widen_factor: float = 1.0  # channels = int(channels * widen_factor)
    expand_ratio: float = 0.5  # hidden channels of each CSP layer relative to its output
    out_indices: tuple[int, ...] = (4,)  # which layers (0 = stem) are returned; the head reads the last
    channel_attention: bool = True  # squeeze-style attention (avg pool, 1x1 conv, hard sigmoid) per CSP layer
    act: str = "SiLU"  # backbone activation
    bn_eps: float = 1e-5  # the config uses SyncBN with its default eps (mmdet's own default would be 1e-3)
    spp_kernel_sizes: tuple[int, ...] = (5, 9, 13)  # max-pool sizes of the last stage's SPP bottleneck
    # head: RTMCCHead
    in_channels: int = 1024  # channels of the backbone's last output
    num_keypoints: int = NUM_WHOLEBODY_KEYPOINTS
    input_size: tuple[int, int] = (288, 384)  # (w, h) of the network input
    featuremap_size: tuple[int, int] = (9, 12)  # (w, h) of the backbone output (input / 32)
    simcc_split_ratio: float = 2.0  # SimCC bins per input pixel
    final_layer_kernel_size: int = 7
    gau_hidden_dims: int = 256
    gau_s: int = 128  # query/key width of the gated attention unit
    gau_expansion_factor: int = 2
    gau_act: str = "SiLU"
    # pre-processing (PoseDataPreprocessor + GetBBoxCenterScale) and test-time augmentation
    mean_rgb: tuple[float, float, float] = (123.675, 116.28, 103.53)
    std_rgb: tuple[float, float, float] = (58.395, 57.12, 57.375)
    bbox_padding: float = 1.25
    flip_test: bool = True

    def __post_init__(self) -> None:
        if self.arch not in ARCH_SETTINGS:
            raise InputError(f"unknown CSPNeXt arch {self.arch!r}", f"use one of {sorted(ARCH_SETTINGS)}")
        for name in ("act", "gau_act"):
            if getattr(self, name) not in _ACTIVATIONS:
                raise InputError(f"unsupported activation {name}={getattr(self, name)!r}",
                                 f"use one of {sorted(_ACTIVATIONS)}")
        # Each stride-2 3x3 conv (padding 1) maps n to ceil(n / 2): the stem and every stage halve once.
        expected = list(self.input_size)
        for _ in range(len(ARCH_SETTINGS[self.arch]) + 1):
            expected = [-(-n // 2) for n in expected]
        if tuple(self.featuremap_size) != tuple(expected):
            raise InputError(f"featuremap_size {tuple(self.featuremap_size)} does not follow from input_size "
                             f"{tuple(self.input_size)} with arch {self.arch}", f"use {tuple(expected)}")

    @property
    def simcc_sizes(self) -> tuple[int, int]:
        """(Wx, Wy): lengths of the x and y SimCC vectors."""
        return (int(self.input_size[0] * self.simcc_split_ratio), int(self.input_size[1] * self.simcc_split_ratio))

    @classmethod
    def from_manifest(cls, manifest: Mapping) -> DWPoseConfig:
        """Build from a golden set's ``manifest.json`` (its ``model`` section: backbone, head, preprocess).

        Options DWPose never uses (GAU relative bias, rotary position encoding) are refused, not ignored.
        """
        model = manifest.get("model", manifest)
        bb, head, pre = model.get("backbone", {}), model.get("head", {}), model.get("preprocess", {})
        gau = head.get("gau", {})
        for unsupported in ("use_rel_bias", "pos_enc"):
            if gau.get(unsupported, False):
                raise InputError(f"GAU option {unsupported}=true is not implemented (no DWPose config uses it)")
        if not pre.get("bgr_to_rgb", True):
            raise InputError("bgr_to_rgb=false is not implemented (the DWPose config converts BGR to RGB)")
        eps = re.search(r"eps\s*([0-9.eE+-]+)", str(bb.get("norm", "")))
        padding = re.search(r"padding\s*([0-9.]+)", str(pre.get("bbox", "")))
        default = cls()
        return cls(
            arch=bb.get("arch", default.arch),
            deepen_factor=float(bb.get("deepen_factor", default.deepen_factor)),
            widen_factor=float(bb.get("widen_factor", default.widen_factor)),
            expand_ratio=float(bb.get("expand_ratio", default.expand_ratio)),
            out_indices=tuple(int(i) for i in bb.get("out_indices", default.out_indices)),
            channel_attention=bool(bb.get("channel_attention", default.channel_attention)),
            act=bb.get("act", default.act),
            bn_eps=float(eps.group(1)) if eps else default.bn_eps,
            in_channels=int(head.get("in_channels", default.in_channels)),
            num_keypoints=int(head.get("out_channels", default.num_keypoints)),
            input_size=tuple(head.get("input_size_wh", default.input_size)),
            featuremap_size=tuple(head.get("in_featuremap_size_wh", default.featuremap_size)),
            simcc_split_ratio=float(head.get("simcc_split_ratio", default.simcc_split_ratio)),
            final_layer_kernel_size=int(head.get("final_layer_kernel_size", default.final_layer_kernel_size)),
            gau_hidden_dims=int(gau.get("hidden_dims", default.gau_hidden_dims)),
            gau_s=int(gau.get("s", default.gau_s)),
            gau_expansion_factor=int(gau.get("expansion_factor", default.gau_expansion_factor)),
            gau_act=gau.get("act_fn", default.gau_act),
            mean_rgb=tuple(pre.get("mean_rgb", default.mean_rgb)),
            std_rgb=tuple(pre.get("std_rgb", default.std_rgb)),
            bbox_padding=float(padding.group(1)) if padding else default.bbox_padding,
            flip_test=bool(pre.get("flip_test", default.flip_test)),
        )


def wholebody_flip_indices() -> list[int]:
    """For each of the 133 COCO-WholeBody keypoints, the index of its mirror image (coco_wholebody.py swaps)."""
    pairs: list[tuple[int, int]] = [(1, 2), (3, 4), (5, 6), (7, 8), (9, 10), (11, 12), (13, 14), (15, 16)]
    pairs += [(17, 20), (18, 21), (19, 22)]  # big toe, small toe, heel
    face = [(i, 16 - i) for i in range(8)]  # jaw line 0..16 around the chin (8)
    face += [(17 + i, 26 - i) for i in range(5)]  # eyebrows
    face += [(31, 35), (32, 34)]  # nostrils (27..30 and 33 lie on the axis)
    face += [(36, 45), (37, 44), (38, 43), (39, 42), (40, 47), (41, 46)]  # eyes
    face += [(48, 54), (49, 53), (50, 52), (55, 59), (56, 58), (60, 64), (61, 63), (65, 67)]  # lips
    pairs += [(23 + a, 23 + b) for a, b in face]
    pairs += [(91 + i, 112 + i) for i in range(21)]  # left hand <-> right hand, same joint order
    flip = list(range(NUM_WHOLEBODY_KEYPOINTS))
    for a, b in pairs:
        flip[a], flip[b] = b, a
    return flip


# ----------------------------------------------------------------------------------------------------------
# Network: CSPNeXt backbone
# ----------------------------------------------------------------------------------------------------------


class ConvBNAct(nn.Module):
    """mmcv ``ConvModule`` with a norm: conv (no bias) -> BatchNorm -> activation. Keys ``conv.*``, ``bn.*``."""

    def __init__(self, cin: int, cout: int, kernel: int, *, stride: int = 1, groups: int = 1, eps: float = 1e-5,
                 act: str = "SiLU") -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=eps)
        self.act = _ACTIVATIONS[act]()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class DepthwiseSeparable(nn.Module):
    """mmcv ``DepthwiseSeparableConvModule``: a depthwise ConvBNAct, then a pointwise (1x1) ConvBNAct."""

    def __init__(self, cin: int, cout: int, kernel: int, *, eps: float, act: str) -> None:
        super().__init__()
        self.depthwise_conv = ConvBNAct(cin, cin, kernel, groups=cin, eps=eps, act=act)
        self.pointwise_conv = ConvBNAct(cin, cout, 1, eps=eps, act=act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pointwise_conv(self.depthwise_conv(x))


class CSPNeXtBlock(nn.Module):
    """3x3 conv, then a 5x5 depthwise-separable conv, plus the input when the widths agree."""

    def __init__(self, channels: int, add_identity: bool, *, eps: float, act: str) -> None:
        super().__init__()
        # In CSPLayer the blocks run at the layer's hidden width with expansion 1.0.
        self.conv1 = ConvBNAct(channels, channels, 3, eps=eps, act=act)
        self.conv2 = DepthwiseSeparable(channels, channels, 5, eps=eps, act=act)
        self.add_identity = add_identity

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv2(self.conv1(x))
        return out + x if self.add_identity else out


class ChannelAttention(nn.Module):
    """x * hardsigmoid(conv1x1(global average of x)); the 1x1 conv has a bias (key ``fc``)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.fc = nn.Conv2d(channels, channels, 1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * F.hardsigmoid(self.fc(F.adaptive_avg_pool2d(x, 1)))


class CSPLayer(nn.Module):
    """Cross-stage partial layer: a short 1x1 path and a main path through the blocks, concatenated (main
    first), optionally re-weighted by channel attention, then fused by a 1x1 conv."""

    def __init__(self, cin: int, cout: int, *, num_blocks: int, add_identity: bool, expand_ratio: float,
                 channel_attention: bool, eps: float, act: str) -> None:
        super().__init__()
        mid = int(cout * expand_ratio)
        self.main_conv = ConvBNAct(cin, mid, 1, eps=eps, act=act)
        self.short_conv = ConvBNAct(cin, mid, 1, eps=eps, act=act)
        self.final_conv = ConvBNAct(2 * mid, cout, 1, eps=eps, act=act)
        self.blocks = nn.Sequential(*[CSPNeXtBlock(mid, add_identity, eps=eps, act=act) for _ in range(num_blocks)])
        self.attention = ChannelAttention(2 * mid) if channel_attention else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.cat((self.blocks(self.main_conv(x)), self.short_conv(x)), dim=1)
        if self.attention is not None:
            out = self.attention(out)
        return self.final_conv(out)


class SPPBottleneck(nn.Module):
    """1x1 conv to half width, concat with max pools (stride 1, same size), 1x1 conv (mmdet ``SPPBottleneck``)."""

    def __init__(self, cin: int, cout: int, kernel_sizes: Sequence[int], *, eps: float, act: str) -> None:
        super().__init__()
        mid = cin // 2
        self.conv1 = ConvBNAct(cin, mid, 1, eps=eps, act=act)
        self.poolings = nn.ModuleList([nn.MaxPool2d(k, stride=1, padding=k // 2) for k in kernel_sizes])
        self.conv2 = ConvBNAct(mid * (len(kernel_sizes) + 1), cout, 1, eps=eps, act=act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        return self.conv2(torch.cat([x] + [pool(x) for pool in self.poolings], dim=1))


class CSPNeXt(nn.Module):
    """CSPNeXt backbone: a 3-conv stem (stride 2) and 4 (P5) or 5 (P6) stages of stride 2 each.

    Input (B, 3, H, W) normalised RGB; returns the outputs of ``out_indices`` (0 = stem), each (B, C, H/s, W/s).
    """

    def __init__(self, cfg: DWPoseConfig) -> None:
        super().__init__()
        eps, act, widen = cfg.bn_eps, cfg.act, cfg.widen_factor
        settings = ARCH_SETTINGS[cfg.arch]
        stem = int(settings[0][0] * widen // 2)
        self.stem = nn.Sequential(
            ConvBNAct(3, stem, 3, stride=2, eps=eps, act=act),
            ConvBNAct(stem, stem, 3, eps=eps, act=act),
            ConvBNAct(stem, int(settings[0][0] * widen), 3, eps=eps, act=act))
        self.layer_names = ["stem"]
        for i, (cin, cout, blocks, add_identity, use_spp) in enumerate(settings):
            cin, cout = int(cin * widen), int(cout * widen)
            stage: list[nn.Module] = [ConvBNAct(cin, cout, 3, stride=2, eps=eps, act=act)]
            if use_spp:
                stage.append(SPPBottleneck(cout, cout, cfg.spp_kernel_sizes, eps=eps, act=act))
            stage.append(CSPLayer(cout, cout, num_blocks=max(round(blocks * cfg.deepen_factor), 1),
                                  add_identity=add_identity, expand_ratio=cfg.expand_ratio,
                                  channel_attention=cfg.channel_attention, eps=eps, act=act))
            self.add_module(f"stage{i + 1}", nn.Sequential(*stage))
            self.layer_names.append(f"stage{i + 1}")
        self.out_indices = tuple(cfg.out_indices)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outs = []
        for i, name in enumerate(self.layer_names):
            x = getattr(self, name)(x)
            if i in self.out_indices:
                outs.append(x)
        return tuple(outs)


# ----------------------------------------------------------------------------------------------------------
# Network: RTMCC head
# ----------------------------------------------------------------------------------------------------------


class ScaleNorm(nn.Module):
    """x / max(||x|| / sqrt(dim), eps) * g, over the last axis (one learned scalar ``g``)."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.scale = dim ** -0.5
        self.eps = eps
        self.g = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True) * self.scale
        return x / norm.clamp(min=self.eps) * self.g


class Scale(nn.Module):
    """Element-wise learned scale (key ``scale``)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


class GatedAttentionUnit(nn.Module):
    """RTMCCBlock in self-attention mode (GAU, "Transformer Quality in Linear Time"), without relative
    position bias or rotary encoding (the DWPose config turns both off).

    tokens (B, K, D) -> (B, K, D): ScaleNorm, one projection to u, v (width e) and a shared base (width s) from
    which q and k are made with per-row gamma/beta; attention kernel relu(q k^T / sqrt(s))^2; out = o(u * (kernel v)),
    plus the input scaled by ``res_scale`` when in and out widths agree.
    """

    def __init__(self, dims: int, *, s: int, expansion_factor: int, act: str, eps: float = 1e-5) -> None:
        super().__init__()
        self.s = s
        self.e = int(dims * expansion_factor)
        self.o = nn.Linear(self.e, dims, bias=False)
        self.uv = nn.Linear(dims, 2 * self.e + s, bias=False)
        self.gamma = nn.Parameter(torch.rand(2, s))
        self.beta = nn.Parameter(torch.rand(2, s))
        self.ln = ScaleNorm(dims, eps=eps)
        self.act = _ACTIVATIONS[act]()
        self.res_scale = Scale(dims)
        self.sqrt_s = math.sqrt(s)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        uv = self.act(self.uv(self.ln(x)))
        u, v, base = torch.split(uv, [self.e, self.e, self.s], dim=2)
        base = base.unsqueeze(2) * self.gamma[None, None, :] + self.beta  # (B, K, 2, s)
        q, k = torch.unbind(base, dim=2)
        kernel = torch.square(F.relu(torch.bmm(q, k.transpose(1, 2)) / self.sqrt_s))  # (B, K, K)
        return self.res_scale(x) + self.o(u * torch.bmm(kernel, v))


class RTMCCHead(nn.Module):
    """Feature map (B, C, h, w) -> SimCC vectors x (B, K, Wx) and y (B, K, Wy).

    A large-kernel conv gives one map per keypoint; each map, flattened, is a token: ScaleNorm + linear to the
    hidden width, a gated attention unit across keypoints, then two linear classifiers over the x and y bins.
    """

    def __init__(self, cfg: DWPoseConfig) -> None:
        super().__init__()
        flat = cfg.featuremap_size[0] * cfg.featuremap_size[1]
        k = cfg.final_layer_kernel_size
        self.final_layer = nn.Conv2d(cfg.in_channels, cfg.num_keypoints, k, padding=k // 2)
        self.mlp = nn.Sequential(ScaleNorm(flat), nn.Linear(flat, cfg.gau_hidden_dims, bias=False))
        self.gau = GatedAttentionUnit(cfg.gau_hidden_dims, s=cfg.gau_s, expansion_factor=cfg.gau_expansion_factor,
                                      act=cfg.gau_act)
        wx, wy = cfg.simcc_sizes
        self.cls_x = nn.Linear(cfg.gau_hidden_dims, wx, bias=False)
        self.cls_y = nn.Linear(cfg.gau_hidden_dims, wy, bias=False)

    def forward(self, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self.gau(self.mlp(torch.flatten(self.final_layer(feats), 2)))
        return self.cls_x(tokens), self.cls_y(tokens)


class DWPoseNet(nn.Module):
    """The whole network: (B, 3, H, W) normalised RGB -> (simcc_x (B, K, Wx), simcc_y (B, K, Wy)), float."""

    def __init__(self, cfg: DWPoseConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg or DWPoseConfig()
        self.backbone = CSPNeXt(self.cfg)
        self.head = RTMCCHead(self.cfg)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.head(self.backbone(x)[-1])  # the head's input_transform 'select', input_index -1


def drop_unused_keys(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove the entries under :data:`UNUSED_KEY_PREFIXES` (logged); everything else is kept for a strict load."""
    kept = {k: v for k, v in state_dict.items() if not k.startswith(UNUSED_KEY_PREFIXES)}
    if len(kept) != len(state_dict):
        log.info("dwpose: dropped %d training-only keys (%s)", len(state_dict) - len(kept),
                 ", ".join(sorted(set(state_dict) - set(kept))[:5]))
    return kept


def load_dwpose(checkpoint_path: str | Path, config: DWPoseConfig | None = None,
                device: str | torch.device = "cpu") -> DWPoseNet:
    """Build :class:`DWPoseNet` for ``config`` and load an mmpose checkpoint into it strictly, in eval mode.

    The official file is an mmengine training checkpoint (``{'state_dict', 'meta' with numpy arrays, maybe
    'message_hub' / 'optimizer'}``): :func:`musetalk.weights.load_state_dict` reads it safely and takes its
    ``state_dict``; the rest is never built. A missing file, a wrong architecture or surplus keys raise
    :class:`WeightsError` naming the keys.
    """
    path = Path(checkpoint_path)
    if not path.is_file():
        raise WeightsError(f"DWPose checkpoint not found: {path}", DOWNLOAD_FIX)
    state = drop_unused_keys(load_state_dict(path, fix=DOWNLOAD_FIX))
    model = DWPoseNet(config)
    load_into(model, state, source=path,
              fix="use the official dw-ll_ucoco_384.pth with the default config, or pass the config it was made with")
    return model.eval().to(resolve_device(device))


# ----------------------------------------------------------------------------------------------------------
# Top-down inference (pure functions over arrays)
# ----------------------------------------------------------------------------------------------------------


def box_to_center_scale(box_xyxy: np.ndarray, padding: float = 1.25) -> tuple[np.ndarray, np.ndarray]:
    """(x1, y1, x2, y2) float32 -> center (cx, cy) and scale (w, h) * padding, float32 (mmpose ``bbox_xyxy2cs``)."""
    box = np.asarray(box_xyxy, dtype=np.float32)
    return (box[2:] + box[:2]) * 0.5, (box[2:] - box[:2]) * padding


def fix_aspect_ratio(scale: np.ndarray, aspect_ratio: float) -> np.ndarray:
    """Grow the shorter side of ``scale`` (w, h) so that w / h == aspect_ratio (TopdownAffine)."""
    w, h = scale[:1], scale[1:]  # (1,) arrays, so the arithmetic stays in the scale's dtype as in mmpose
    return np.concatenate([w, w / aspect_ratio] if w[0] > h[0] * aspect_ratio else [h * aspect_ratio, h])


def _third_point(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    d = a - b
    return b + np.array([-d[1], d[0]], dtype=a.dtype)


def warp_matrix(center: np.ndarray, scale: np.ndarray, output_size: tuple[int, int]) -> np.ndarray:
    """2x3 affine taking the box (center, scale) onto the (w, h) network input: mmpose's non-UDP
    ``get_warp_matrix`` with no rotation and no shift, built from three point pairs as there."""
    dst_w, dst_h = output_size
    src = np.zeros((3, 2), dtype=np.float32)
    dst = np.zeros((3, 2), dtype=np.float32)
    src[0] = center
    src[1] = center + np.array([scale[0] * -0.5, 0.0])
    dst[0] = [dst_w * 0.5, dst_h * 0.5]
    dst[1] = np.array([dst_w * 0.5, dst_h * 0.5]) + np.array([dst_w * -0.5, 0.0])
    src[2] = _third_point(src[0], src[1])
    dst[2] = _third_point(dst[0], dst[1])
    return cv2.getAffineTransform(src, dst)


def crop_to_input(frame_bgr: np.ndarray, box_xyxy: np.ndarray | None, cfg: DWPoseConfig
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Warp the (padded, aspect-fixed) box of a BGR uint8 frame (H, W, 3) to the network input size.

    ``box_xyxy`` None means the whole frame, as ``inference_topdown`` without boxes. Returns the warped BGR uint8
    crop (h, w, 3), the box center and the aspect-fixed scale (both (2,) float32) needed to map points back.
    """
    if box_xyxy is None:
        h, w = frame_bgr.shape[:2]
        box_xyxy = np.array([0, 0, w, h], dtype=np.float32)
    center, scale = box_to_center_scale(box_xyxy, cfg.bbox_padding)
    in_w, in_h = cfg.input_size
    scale = fix_aspect_ratio(scale, in_w / in_h)
    crop = cv2.warpAffine(frame_bgr, warp_matrix(center, scale, (in_w, in_h)), (int(in_w), int(in_h)),
                          flags=cv2.INTER_LINEAR)
    return crop, center, scale


def normalize_batch(crops_bgr: np.ndarray, cfg: DWPoseConfig, device: torch.device) -> torch.Tensor:
    """(B, h, w, 3) BGR uint8 -> (B, 3, h, w) float32 RGB, (x - mean) / std (PoseDataPreprocessor)."""
    x = torch.from_numpy(np.ascontiguousarray(crops_bgr)).to(device).permute(0, 3, 1, 2)[:, [2, 1, 0]].float()
    mean = torch.tensor(cfg.mean_rgb, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    std = torch.tensor(cfg.std_rgb, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    return (x - mean) / std


@torch.inference_mode()
def predict_simcc(model: DWPoseNet, inputs: torch.Tensor, flip_test: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Network outputs for a normalised batch (B, 3, h, w): SimCC x (B, K, Wx) and y (B, K, Wy), float32.

    With ``flip_test`` the horizontally flipped batch runs in the same call; its vectors are mapped back
    (keypoints swapped with their mirror, x bins reversed) and averaged with the plain ones, as RTMCCHead.predict.
    """
    if not flip_test:
        sx, sy = model(inputs)
        return sx.float().cpu().numpy(), sy.float().cpu().numpy()
    n = inputs.shape[0]
    sx, sy = model(torch.cat([inputs, inputs.flip(-1)]))
    if sx.shape[1] != NUM_WHOLEBODY_KEYPOINTS:
        raise InputError(f"the flip test needs the mirror pairs of the keypoints; only the 133 COCO-WholeBody "
                         f"ones are known, the model has {sx.shape[1]}", "run with flip_test=False")
    flip = torch.as_tensor(wholebody_flip_indices(), device=sx.device)
    fx, fy = sx[n:][:, flip].flip(-1), sy[n:][:, flip]
    return ((sx[:n] + fx) * 0.5).float().cpu().numpy(), ((sy[:n] + fy) * 0.5).float().cpu().numpy()


def decode_simcc(simcc_x: np.ndarray, simcc_y: np.ndarray, split_ratio: float) -> tuple[np.ndarray, np.ndarray]:
    """SimCC argmax decode (mmpose ``SimCCLabel.decode`` without DARK): keypoints (B, K, 2) in input pixels and
    scores (B, K) = the smaller of the two maxima; keypoints with a score <= 0 become -1 / split_ratio."""
    b, k, _ = simcc_x.shape
    sx, sy = simcc_x.reshape(b * k, -1), simcc_y.reshape(b * k, -1)
    locs = np.stack((sx.argmax(1), sy.argmax(1)), axis=-1).astype(np.float32)
    scores = np.minimum(sx.max(1), sy.max(1))
    locs[scores <= 0.0] = -1
    return locs.reshape(b, k, 2) / np.float32(split_ratio), scores.reshape(b, k)


def to_image_coords(points: np.ndarray, center: np.ndarray, scale: np.ndarray, input_size: tuple[int, int]
                    ) -> np.ndarray:
    """Map (K, 2) input-space points back to the frame: p / input_size * scale + center - scale / 2 (float32)."""
    out = points / np.asarray(input_size) * scale + center - 0.5 * scale
    return out.astype(np.float32)


@dataclass(frozen=True)
class WholeBody:
    """Whole-body keypoints of one frame: keypoints (133, 2) float32 (x, y) in frame pixels; scores (133,)
    float32, the raw SimCC maxima (not probabilities; DWPose's are roughly 0..1, random weights give any value)."""

    keypoints: np.ndarray
    scores: np.ndarray

    @property
    def face68(self) -> np.ndarray:
        """(68, 2) float32: keypoints 23..90, the face in iBUG-68 order."""
        return self.keypoints[FACE_SLICE]


def estimate_wholebody(model: DWPoseNet, frames_bgr: Sequence[np.ndarray],
                       boxes_xyxy: Sequence[np.ndarray | None] | None = None, *, flip_test: bool | None = None
                       ) -> list[WholeBody]:
    """Top-down whole-body keypoints for a batch of BGR uint8 frames (each (H, W, 3); sizes may differ).

    ``boxes_xyxy``: one person box per frame, or None for the whole frame (what MuseTalk does). All frames go
    through the network in one call (twice the batch with the flip test).
    """
    cfg = model.cfg
    flip_test = cfg.flip_test if flip_test is None else flip_test
    if len(frames_bgr) == 0:
        return []
    boxes = list(boxes_xyxy) if boxes_xyxy is not None else [None] * len(frames_bgr)
    if len(boxes) != len(frames_bgr):
        raise InputError(f"{len(boxes)} boxes for {len(frames_bgr)} frames", "give one box (or None) per frame")
    prepared = [crop_to_input(_check_frame(f), b, cfg) for f, b in zip(frames_bgr, boxes)]
    device = next(model.parameters()).device
    inputs = normalize_batch(np.stack([p[0] for p in prepared]), cfg, device)
    simcc_x, simcc_y = predict_simcc(model, inputs, flip_test)
    points, scores = decode_simcc(simcc_x, simcc_y, cfg.simcc_split_ratio)
    return [WholeBody(to_image_coords(points[i], center, scale, cfg.input_size), scores[i])
            for i, (_, center, scale) in enumerate(prepared)]


def _check_frame(frame: np.ndarray) -> np.ndarray:
    if not isinstance(frame, np.ndarray) or frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3:
        desc = f"{frame.dtype} {frame.shape}" if isinstance(frame, np.ndarray) else type(frame).__name__
        raise InputError(f"DWPose expects BGR uint8 frames (H, W, 3), got {desc}")
    return frame


# ----------------------------------------------------------------------------------------------------------
# The landmark backend
# ----------------------------------------------------------------------------------------------------------

FaceBoxDetector = Callable[[np.ndarray], "Box | None"]  # BGR uint8 frame -> main face box, or None for no face


def default_checkpoint_path(models_dir: str | Path | None = None) -> Path:
    """``<models>/dwpose/dw-ll_ucoco_384.pth``; models = the argument, else ``$MUSETALK_MODELS``, else ``models/``."""
    return Path(models_dir if models_dir is not None else default_models_dir()) / CHECKPOINT_RELPATH


class DWPoseBackend:
    """The 68 face landmarks from DWPose, as MuseTalk's ``get_landmark_and_bbox`` takes them.

    The pose network always sees the whole frame (the reference calls ``inference_topdown`` without boxes).
    ``detector_box``: the reference asks an S3FD face detector whether a face exists and keeps its box as the crop
    rule's fallback. Here that detector is optional (``face_detector``, any callable frame -> box or None): with
    one, its box is the ``detector_box`` and a None from it means "no face" (landmarks None, like the reference's
    placeholder); without one, ``detector_box`` is the whole frame ``(0, 0, W, H)`` and every frame has a face.
    """

    name = "dwpose"

    def __init__(self, checkpoint_path: str | Path | None = None, device: str | torch.device = "auto", *,
                 config: DWPoseConfig | None = None, face_detector: FaceBoxDetector | None = None,
                 flip_test: bool | None = None, batch_size: int = 8) -> None:
        """Load the checkpoint (None -> :func:`default_checkpoint_path`) for ``config`` (None -> DWPose-L).

        flip_test None keeps the config's setting (on, as the reference); batch_size is the number of frames per
        network call in :meth:`detect_many`. A missing checkpoint raises :class:`WeightsError`.
        """
        path = Path(checkpoint_path) if checkpoint_path is not None else default_checkpoint_path()
        if not path.is_file():
            raise WeightsError(f"DWPose checkpoint not found: {path}", DOWNLOAD_FIX)
        self.checkpoint_path: Path | None = path
        self._setup(load_dwpose(path, config, resolve_device(device)), face_detector, flip_test, batch_size)

    @classmethod
    def from_model(cls, model: DWPoseNet, *, face_detector: FaceBoxDetector | None = None,
                   flip_test: bool | None = None, batch_size: int = 8) -> DWPoseBackend:
        """Wrap an already built network (tests, benchmarks, weights loaded elsewhere); no file is read."""
        backend = cls.__new__(cls)
        backend.checkpoint_path = None
        backend._setup(model.eval(), face_detector, flip_test, batch_size)
        return backend

    def _setup(self, model: DWPoseNet, face_detector: FaceBoxDetector | None, flip_test: bool | None,
               batch_size: int) -> None:
        if batch_size < 1:
            raise InputError(f"batch_size must be >= 1, got {batch_size}")
        self.model = model
        self.device = next(model.parameters()).device
        self.face_detector = face_detector
        self.flip_test = flip_test
        self.batch_size = batch_size

    def detect(self, frame_bgr: np.ndarray) -> FaceLandmarks:
        """Landmarks of one BGR uint8 frame (H, W, 3): (68, 2) int32 (x, y), iBUG order."""
        return self.detect_batch([frame_bgr])[0]

    def detect_batch(self, frames_bgr: Sequence[np.ndarray]) -> list[FaceLandmarks]:
        """:meth:`detect` for several frames in one network call; frames in which the optional face detector finds
        nothing skip the network and come back without landmarks."""
        frames = [_check_frame(f) for f in frames_bgr]
        boxes: list[Box | None] = [self._face_box(f) for f in frames]
        todo = [i for i, b in enumerate(boxes) if b is not None]
        poses = estimate_wholebody(self.model, [frames[i] for i in todo], flip_test=self.flip_test)
        out = [FaceLandmarks(None, None, self.name) for _ in frames]
        for i, pose in zip(todo, poses):
            # The reference truncates with .astype(np.int32) (toward zero), not rounding.
            out[i] = FaceLandmarks(pose.face68.astype(np.int32), boxes[i], self.name)
        return out

    def detect_many(self, frames_bgr: Iterable[np.ndarray]) -> Iterator[FaceLandmarks]:
        """Stream landmarks for any iterable of frames, ``batch_size`` frames per network call."""
        batch: list[np.ndarray] = []
        for frame in frames_bgr:
            batch.append(frame)
            if len(batch) == self.batch_size:
                yield from self.detect_batch(batch)
                batch = []
        if batch:
            yield from self.detect_batch(batch)

    def _face_box(self, frame: np.ndarray) -> Box | None:
        if self.face_detector is None:
            return (0, 0, int(frame.shape[1]), int(frame.shape[0]))
        box = self.face_detector(frame)
        return None if box is None else tuple(int(v) for v in box)  # type: ignore[return-value]
