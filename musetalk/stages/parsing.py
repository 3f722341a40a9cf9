"""Face parsing stage: BiSeNet class maps and the blend masks MuseTalk derives from them.

  image     (H, W, 3) uint8 RGB (or a PIL RGB image), any size; resized to 512x512 before the network
  parsing   (512, 512) uint8 class map, 19 CelebAMask-HQ classes (1 skin, 10 nose, 11 mouth, 12/13 lips, 14 neck)
  mask      (512, 512) uint8, 255 where the generated face is blended in, else 0

The network follows zllrunning/face-parsing.PyTorch (model.py at b9a12fe, resnet.py; MIT licence) so that its
``79999_iter.pth`` loads strictly as is; the masks follow TMElyralab/MuseTalk
``musetalk/utils/face_parsing/__init__.py`` (at 84120bc, MIT licence). Written anew from those descriptions.
"""

from __future__ import annotations

import os
from functools import lru_cache
from typing import Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from musetalk.devices import conv_memory_format, to_memory_format
from musetalk.errors import InputError
from musetalk.weights import file_fingerprint, load_model

PARSE_SIZE = 512  # the network always sees 512x512 (the reference's FaceParsing default size)
N_CLASSES = 19
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# CelebAMask-HQ class ids used by the masks
SKIN, NOSE, MOUTH, UPPER_LIP, LOWER_LIP, NECK = 1, 10, 11, 12, 13, 14
MASK_MODES = ("raw", "jaw", "neck")
DEFAULT_CHEEK_WIDTH = 80  # FaceParsing's default; the v1.5 inference script passes 90

# Jaw mode: class 1 (skin) is dilated with a "cone" kernel (drawn pointing up: rows 10..20 widen 1..21, rows
# 21..32 keep 21). cv2.dilate does not reflect the kernel, so about its centre (16, 16) the skin grows 16 rows up
# at width 21 and 6 rows down to a point below the chin; then the cheek columns are pulled back in with a flat
# ellipse. The reference does exactly this; the numbers are kept as is.
CONE_HEIGHT, CONE_TAIL = 21, 12
CHEEK_KERNEL_SIZE = (35, 3)  # (width, height) of the ellipse that erodes the cheeks, applied twice
CHEEK_EROSIONS = 2


# --------------------------------------------------------------------------------------------------------------
# BiSeNet (ResNet-18 context path; the spatial path is replaced by the 1/8 ResNet feature, as in the checkpoint)
# --------------------------------------------------------------------------------------------------------------

class ConvBNReLU(nn.Module):
    """Conv (no bias) -> BatchNorm -> ReLU; keys ``conv.*`` and ``bn.*``."""

    def __init__(self, in_ch: int, out_ch: int, ks: int = 3, stride: int = 1, padding: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, ks, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(out_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


class BasicBlock(nn.Module):
    """ResNet basic block; a 1x1 conv + BN shortcut (``downsample.0/1``) when the shape changes."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.downsample: nn.Module | None = None
        if in_ch != out_ch or stride != 1:
            self.downsample = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False),
                                            nn.BatchNorm2d(out_ch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        shortcut = x if self.downsample is None else self.downsample(x)
        return F.relu(shortcut + residual)


def _stage(in_ch: int, out_ch: int, stride: int, blocks: int = 2) -> nn.Sequential:
    return nn.Sequential(BasicBlock(in_ch, out_ch, stride), *[BasicBlock(out_ch, out_ch) for _ in range(blocks - 1)])


class ResNet18Features(nn.Module):
    """ResNet-18 without its classifier; returns the 1/8, 1/16 and 1/32 feature maps (128, 256, 512 channels)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = _stage(64, 64, 1)
        self.layer2 = _stage(64, 128, 2)
        self.layer3 = _stage(128, 256, 2)
        self.layer4 = _stage(256, 512, 2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = self.layer1(self.maxpool(F.relu(self.bn1(self.conv1(x)))))
        feat8 = self.layer2(x)
        feat16 = self.layer3(feat8)
        feat32 = self.layer4(feat16)
        return feat8, feat16, feat32


class AttentionRefinementModule(nn.Module):
    """Conv block, then a channel gate from its global average (1x1 conv -> BN -> sigmoid)."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.conv = ConvBNReLU(in_ch, out_ch)
        self.conv_atten = nn.Conv2d(out_ch, out_ch, 1, bias=False)
        self.bn_atten = nn.BatchNorm2d(out_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feat = self.conv(x)
        gate = torch.sigmoid(self.bn_atten(self.conv_atten(F.adaptive_avg_pool2d(feat, 1))))
        return feat * gate


class ContextPath(nn.Module):
    """ResNet-18 + ARMs; returns (1/8 ResNet feature, 1/8 context, 1/16 context), 128 channels each."""

    def __init__(self) -> None:
        super().__init__()
        self.resnet = ResNet18Features()
        self.arm16 = AttentionRefinementModule(256, 128)
        self.arm32 = AttentionRefinementModule(512, 128)
        self.conv_head32 = ConvBNReLU(128, 128)
        self.conv_head16 = ConvBNReLU(128, 128)
        self.conv_avg = ConvBNReLU(512, 128, ks=1, padding=0)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        feat8, feat16, feat32 = self.resnet(x)
        avg = self.conv_avg(F.adaptive_avg_pool2d(feat32, 1))
        # the global context is broadcast over the 1/32 map (the reference upsamples it with 'nearest')
        feat32_sum = self.arm32(feat32) + avg
        feat32_up = self.conv_head32(F.interpolate(feat32_sum, feat16.shape[2:], mode="nearest"))
        feat16_sum = self.arm16(feat16) + feat32_up
        feat16_up = self.conv_head16(F.interpolate(feat16_sum, feat8.shape[2:], mode="nearest"))
        return feat8, feat16_up, feat32_up


class FeatureFusionModule(nn.Module):
    """Concatenate two feature maps, fuse with a 1x1 conv block, add a squeeze-excitation-gated copy."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.convblk = ConvBNReLU(in_ch, out_ch, ks=1, padding=0)
        self.conv1 = nn.Conv2d(out_ch, out_ch // 4, 1, bias=False)
        self.conv2 = nn.Conv2d(out_ch // 4, out_ch, 1, bias=False)

    def forward(self, fsp: torch.Tensor, fcp: torch.Tensor) -> torch.Tensor:
        feat = self.convblk(torch.cat([fsp, fcp], dim=1))
        gate = torch.sigmoid(self.conv2(F.relu(self.conv1(F.adaptive_avg_pool2d(feat, 1)))))
        return feat * gate + feat


class BiSeNetOutput(nn.Module):
    """3x3 conv block, then a 1x1 conv to class logits (keys ``conv.*``, ``conv_out.weight``)."""

    def __init__(self, in_ch: int, mid_ch: int, n_classes: int) -> None:
        super().__init__()
        self.conv = ConvBNReLU(in_ch, mid_ch)
        self.conv_out = nn.Conv2d(mid_ch, n_classes, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_out(self.conv(x))


class BiSeNet(nn.Module):
    """Face-parsing BiSeNet; its state dict keys are those of ``79999_iter.pth``."""

    def __init__(self, n_classes: int = N_CLASSES) -> None:
        super().__init__()
        self.cp = ContextPath()
        self.ffm = FeatureFusionModule(256, 256)
        self.conv_out = BiSeNetOutput(256, 256, n_classes)
        self.conv_out16 = BiSeNetOutput(128, 64, n_classes)  # auxiliary heads: training only, kept for the keys
        self.conv_out32 = BiSeNetOutput(128, 64, n_classes)

    def _upsample(self, logits: torch.Tensor, size: torch.Size) -> torch.Tensor:
        return F.interpolate(logits, size, mode="bilinear", align_corners=True)

    def segment(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised RGB -> (B, n_classes, H, W) logits of the main head (the reference's ``[0]``)."""
        feat8, feat_cp8, _ = self.cp(x)
        return self._upsample(self.conv_out(self.ffm(feat8, feat_cp8)), x.shape[2:])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, 3, H, W) -> main, 1/8 auxiliary and 1/16 auxiliary logits, each (B, n_classes, H, W)."""
        feat8, feat_cp8, feat_cp16 = self.cp(x)
        main = self.conv_out(self.ffm(feat8, feat_cp8))
        size = x.shape[2:]
        return (self._upsample(main, size), self._upsample(self.conv_out16(feat_cp8), size),
                self._upsample(self.conv_out32(feat_cp16), size))


# --------------------------------------------------------------------------------------------------------------
# Parser: image -> class map
# --------------------------------------------------------------------------------------------------------------

def to_parser_input(image_rgb: np.ndarray | Image.Image) -> torch.Tensor:
    """RGB image -> (1, 3, 512, 512) float32, ImageNet-normalised (torchvision ToTensor + Normalize semantics).

    The resize to 512x512 is PIL's bilinear, like the reference (a 512x512 input is left untouched).
    """
    if isinstance(image_rgb, Image.Image):
        pil = image_rgb.convert("RGB")
    else:
        array = np.asarray(image_rgb)
        if array.ndim != 3 or array.shape[2] != 3 or array.dtype != np.uint8:
            raise InputError(f"face parsing needs an (H, W, 3) uint8 RGB image, got {array.shape} {array.dtype}",
                             "pass the frame or crop as uint8 RGB (reverse the channels of an OpenCV BGR image)")
        pil = Image.fromarray(np.ascontiguousarray(array))
    pil = pil.resize((PARSE_SIZE, PARSE_SIZE), Image.Resampling.BILINEAR)
    x = torch.from_numpy(np.array(pil, dtype=np.uint8)).permute(2, 0, 1).float().div(255)
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32).view(3, 1, 1)
    return ((x - mean) / std).unsqueeze(0)


class FaceParser:
    """BiSeNet face parser built from ``face-parse-bisent/79999_iter.pth``."""

    def __init__(self, net: BiSeNet, device: torch.device, dtype: torch.dtype, fingerprint: str | None = None,
                 one_image_at_a_time: bool | None = None, memory_format: torch.memory_format | None = None) -> None:
        """one_image_at_a_time: ``parse_batch`` runs the network image by image; None: on the CPU only. There it is
        faster (8 crops: 1.5 s vs 2.2 s) and skips 0.25 GB of activations; a GPU needs the batch to be busy.
        memory_format: of the weights and inputs; None: ``devices.conv_memory_format`` for 50 MB of weights."""
        self.memory_format = memory_format or conv_memory_format(device, dtype, small_weights=True)
        to_memory_format(net, self.memory_format)  # no copy when loaded in it
        self.one_image_at_a_time = device.type == "cpu" if one_image_at_a_time is None else one_image_at_a_time
        self.net = net
        self.fingerprint = fingerprint  # identity of the weights file (None: built in memory)
        self.device = device
        self.dtype = dtype

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, device: str | torch.device = "cpu",
                        dtype: torch.dtype = torch.float32) -> "FaceParser":
        """Strictly load a BiSeNet state dict (float16 values are cast to the module's float32).

        The torchvision ResNet-18 backbone file is not needed: the BiSeNet checkpoint holds every weight.
        Raises :class:`~musetalk.errors.WeightsError` for a missing, unsafe or mismatching file.
        """
        memory_format = conv_memory_format(torch.device(device), dtype, small_weights=True)
        net = load_model(BiSeNet, path, device=device, dtype=dtype, memory_format=memory_format)
        return cls(net, torch.device(device), dtype, fingerprint=file_fingerprint(path), memory_format=memory_format)

    @torch.inference_mode()
    def parse(self, image_rgb: np.ndarray | Image.Image) -> np.ndarray:
        """(H, W, 3) uint8 RGB image (or PIL RGB) -> (512, 512) uint8 class map (argmax of the main head)."""
        x = to_parser_input(image_rgb).to(self.device, self.dtype, memory_format=self.memory_format)
        logits = self.net.segment(x)[0]
        return logits.argmax(0).to(torch.uint8).cpu().numpy()

    @torch.inference_mode()
    def parse_batch(self, images_rgb: Sequence[np.ndarray | Image.Image]) -> np.ndarray:
        """Several (H, W, 3) uint8 RGB images (any sizes) -> (B, 512, 512) uint8 class maps, in one network call
        (image by image when ``one_image_at_a_time``).

        Each image is resized to 512x512 on its own; the maps equal ``parse`` of each image up to the rounding of a
        batched convolution (logits within ~1e-7 in fp32: a class flips only on an exact tie).
        """
        if len(images_rgb) == 0:
            return np.zeros((0, PARSE_SIZE, PARSE_SIZE), np.uint8)
        if self.one_image_at_a_time:
            return np.stack([self.parse(image) for image in images_rgb])
        x = torch.cat([to_parser_input(image) for image in images_rgb])
        x = x.to(self.device, self.dtype, memory_format=self.memory_format)
        return self.net.segment(x).argmax(1).to(torch.uint8).cpu().numpy()


# --------------------------------------------------------------------------------------------------------------
# Class map -> blend mask
# --------------------------------------------------------------------------------------------------------------

def cone_kernel() -> np.ndarray:
    """(33, 33) uint8 0/1: rows 10..20 of the centre column widen 1, 3, ..., 21; rows 21..32 keep width 21."""
    size = CONE_HEIGHT + CONE_TAIL
    centre = size // 2
    kernel = np.zeros((size, size), dtype=np.uint8)
    for row in range(CONE_HEIGHT // 2, CONE_HEIGHT):
        half = row - CONE_HEIGHT // 2  # width 2 * half + 1
        kernel[row, centre - half:centre + half + 1] = 1
    half = CONE_HEIGHT // 2  # the tail keeps the last cone row's width
    kernel[CONE_HEIGHT:, max(0, centre - half):min(size, centre + half + 1)] = 1
    return kernel


@lru_cache(maxsize=8)
def _cheek_mask(shape: tuple[int, int], left_cheek_width: int, right_cheek_width: int) -> np.ndarray:
    """255 in the columns ``[0, c - left]`` and ``[c + right, W)`` (c = W // 2, both ends inclusive), else 0."""
    mask = np.zeros(shape, dtype=np.uint8)
    centre = shape[1] // 2
    # cv2.rectangle with thickness -1 fills both corner columns; the reference draws exactly these rectangles
    cv2.rectangle(mask, (0, 0), (centre - left_cheek_width, shape[0]), 255, -1)
    cv2.rectangle(mask, (centre + right_cheek_width, 0), (shape[1], shape[0]), 255, -1)
    mask.setflags(write=False)
    return mask


def check_mode(mode: str) -> None:
    """Raise :class:`~musetalk.errors.InputError` unless ``mode`` is one of :data:`MASK_MODES`."""
    if mode not in MASK_MODES:
        raise InputError(f"unknown face-parsing mask mode {mode!r}", f"use one of {', '.join(MASK_MODES)}")


def face_mask(parsing: np.ndarray, mode: str = "raw", left_cheek_width: int = DEFAULT_CHEEK_WIDTH,
              right_cheek_width: int = DEFAULT_CHEEK_WIDTH) -> np.ndarray:
    """(H, W) integer class map (normally 512x512) -> (H, W) uint8 mask, 255 where the new face is blended.

    raw:  skin, mouth and lips {1, 11, 12, 13}.
    neck: raw plus the neck {14}.
    jaw:  skin dilated with the cone kernel (16 px up, a 6 px point down); in the cheek columns (outside
          ``centre - left_cheek_width .. centre + right_cheek_width`` of the 512-wide map) that dilation is eroded
          twice with a 35x3 ellipse; the nose {10} is removed, then mouth and lips {11, 12, 13} added. Wider
          cheek widths keep more of the dilated jaw at the sides.
    """
    check_mode(mode)
    parsing = np.asarray(parsing)
    if parsing.ndim != 2:
        raise InputError(f"face_mask needs a 2-D class map, got shape {parsing.shape}", "pass FaceParser.parse(...)")
    lips = np.isin(parsing, (MOUTH, UPPER_LIP, LOWER_LIP))
    if mode == "raw":
        region = lips | (parsing == SKIN)
    elif mode == "neck":
        region = lips | np.isin(parsing, (SKIN, NECK))
    else:
        skin = (parsing == SKIN).astype(np.uint8) * 255
        dilated = cv2.dilate(skin, cone_kernel(), iterations=1)
        ellipse = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, CHEEK_KERNEL_SIZE)
        eroded = cv2.erode(dilated, ellipse, iterations=CHEEK_EROSIONS)
        cheeks = _cheek_mask(parsing.shape, int(left_cheek_width), int(right_cheek_width))
        jaw = (eroded & cheeks) | (dilated & ~cheeks)
        region = ((jaw == 255) & (parsing != NOSE)) | lips
    return region.astype(np.uint8) * 255
