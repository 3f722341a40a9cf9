"""S3FD face detector (Zhang et al. 2017) as syncnet_python's ``detectors/s3fd`` runs it for the LSE pipeline.

Written anew from the reference's structure (joonson/syncnet_python ``detectors/s3fd``, MIT licence): a VGG-16
trunk with L2-normalised conv3_3 / conv4_3 / conv5_3 sources, two extra stages, one anchor per location on six
maps (strides 4..128, anchor sizes 16..512), max-out background on the first map, box decoding with variances
(0.1, 0.2), per-image NMS (IoU 0.3, 5000 candidates above 0.05, at most 750 kept), then the caller's confidence
threshold (0.9 in run_pipeline.py) and a final NMS at IoU 0.1.

The official ``sfd_face.pth`` is a plain state dict of this network (``vgg.N``, ``L2Norm3_3``, ``extras``,
``loc``, ``conf``) and loads as is. The same weights under their Caffe-style names (``conv1_1`` ... ``fc7``,
``conv3_3_norm_mbox_conf``, as in face_alignment's ``s3fd-619a316812.pth``) are renamed on load.
"""

from __future__ import annotations

import os

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from musetalk.weights import load_into, load_state_dict

RGB_MEAN = (123.0, 117.0, 104.0)  # subtracted from the RGB input (the reference's BGR img_mean, reordered)
STEPS = (4, 8, 16, 32, 64, 128)  # stride of each source map
ANCHORS = (16, 32, 64, 128, 256, 512)  # one square anchor per location, side in input pixels
VARIANCES = (0.1, 0.2)
CANDIDATE_CONF = 0.05  # Detect.conf_thresh
CANDIDATE_NMS = 0.3  # Detect.nms_thresh
CANDIDATE_TOP = 5000  # Detect.nms_top_k
KEEP_TOP = 750  # Detect.top_k
FINAL_NMS = 0.1  # S3FD.detect_faces: nms_(bboxes, 0.1)
SFD_FIX = ("use the official sfd_face.pth (`musetalk download --syncnet`, from "
           "https://www.robots.ox.ac.uk/~vgg/software/lipsync/data/sfd_face.pth)")

# index in ``vgg`` of each conv, in the order of the Caffe-style names
_VGG_CONVS = ("conv1_1", "conv1_2", "conv2_1", "conv2_2", "conv3_1", "conv3_2", "conv3_3", "conv4_1", "conv4_2",
              "conv4_3", "conv5_1", "conv5_2", "conv5_3", "fc6", "fc7")
_VGG_INDEX = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28, 31, 33)
_SOURCES = ("conv3_3_norm", "conv4_3_norm", "conv5_3_norm", "fc7", "conv6_2", "conv7_2")


def caffe_style_names() -> dict[str, str]:
    """Map of Caffe-style module names (face_alignment's S3FD) to this network's names."""
    names = dict(zip(_VGG_CONVS, (f"vgg.{i}" for i in _VGG_INDEX)))
    names.update({"conv3_3_norm": "L2Norm3_3", "conv4_3_norm": "L2Norm4_3", "conv5_3_norm": "L2Norm5_3",
                  "conv6_1": "extras.0", "conv6_2": "extras.1", "conv7_1": "extras.2", "conv7_2": "extras.3"})
    for k, src in enumerate(_SOURCES):
        names[f"{src}_mbox_loc"] = f"loc.{k}"
        names[f"{src}_mbox_conf"] = f"conf.{k}"
    return names


class L2Norm(nn.Module):
    """Channel-wise L2 normalisation with a learned per-channel scale (eps 1e-10 added to the norm)."""

    def __init__(self, channels: int, scale: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.full((channels,), float(scale)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        norm = x.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10
        return x / norm * self.weight.view(1, -1, 1, 1)


def _vgg() -> nn.ModuleList:
    layers: list[nn.Module] = []
    cin = 3
    for block, (cout, n) in enumerate(((64, 2), (128, 2), (256, 3), (512, 3), (512, 3))):
        for _ in range(n):
            layers += [nn.Conv2d(cin, cout, 3, 1, padding=1), nn.ReLU(inplace=True)]
            cin = cout
        layers.append(nn.MaxPool2d(2, 2, ceil_mode=block == 2))  # only the third pool rounds up
    layers += [nn.Conv2d(512, 1024, 3, 1, padding=6, dilation=6), nn.ReLU(inplace=True),
               nn.Conv2d(1024, 1024, 1, 1), nn.ReLU(inplace=True)]
    return nn.ModuleList(layers)


class S3FDNet(nn.Module):
    """The S3FD network; ``forward`` returns raw head outputs, :class:`S3FD` turns them into boxes.

    Input: (B, 3, H, W) float RGB minus :data:`RGB_MEAN`. Output: ``loc`` (B, P, 4), ``conf`` (B, P, 2)
    softmax scores (background, face) and the six source map sizes [(h, w), ...], P = sum h * w.
    """

    def __init__(self) -> None:
        super().__init__()
        self.vgg = _vgg()
        self.L2Norm3_3 = L2Norm(256, 10)
        self.L2Norm4_3 = L2Norm(512, 8)
        self.L2Norm5_3 = L2Norm(512, 5)
        self.extras = nn.ModuleList([nn.Conv2d(1024, 256, 1, 1), nn.Conv2d(256, 512, 3, 2, padding=1),
                                     nn.Conv2d(512, 128, 1, 1), nn.Conv2d(128, 256, 3, 2, padding=1)])
        chans = (256, 512, 512, 1024, 512, 256)
        self.loc = nn.ModuleList([nn.Conv2d(c, 4, 3, 1, padding=1) for c in chans])
        # the first map predicts 3 background scores and keeps their max ("max-out" for small faces)
        self.conf = nn.ModuleList([nn.Conv2d(c, 4 if k == 0 else 2, 3, 1, padding=1) for k, c in enumerate(chans)])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[tuple[int, int]]]:
        sources = []
        for k, layer in enumerate(self.vgg):
            x = layer(x)
            if k == 15:
                sources.append(self.L2Norm3_3(x))
            elif k == 22:
                sources.append(self.L2Norm4_3(x))
            elif k == 29:
                sources.append(self.L2Norm5_3(x))
        sources.append(x)
        for k, layer in enumerate(self.extras):
            x = F.relu(layer(x), inplace=True)
            if k % 2 == 1:
                sources.append(x)
        locs, confs = [], []
        for k, src in enumerate(sources):
            conf = self.conf[k](src)
            if k == 0:
                conf = torch.cat([conf[:, :3].max(dim=1, keepdim=True).values, conf[:, 3:]], dim=1)
            locs.append(self.loc[k](src).permute(0, 2, 3, 1).flatten(1, 2))
            confs.append(conf.permute(0, 2, 3, 1).flatten(1, 2))
        sizes = [(int(s.shape[2]), int(s.shape[3])) for s in sources]
        return torch.cat(locs, 1), torch.cat(confs, 1).softmax(-1), sizes


def prior_boxes(image_hw: tuple[int, int], map_sizes: list[tuple[int, int]]) -> torch.Tensor:
    """(P, 4) float32 anchors (cx, cy, w, h), normalised to the input size, row-major per map as the heads."""
    imh, imw = image_hw
    out = []
    for (h, w), step, size in zip(map_sizes, STEPS, ANCHORS):
        i, j = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        cx = (j.ravel() + 0.5) / (imw / step)
        cy = (i.ravel() + 0.5) / (imh / step)
        out.append(np.stack([cx, cy, np.full_like(cx, size / imw), np.full_like(cy, size / imh)], 1))
    return torch.from_numpy(np.concatenate(out)).float()


def decode_boxes(loc: torch.Tensor, priors: torch.Tensor) -> torch.Tensor:
    """(P, 4) regression outputs + anchors -> (P, 4) boxes (x1, y1, x2, y2), normalised."""
    centre = priors[:, :2] + loc[:, :2] * VARIANCES[0] * priors[:, 2:]
    size = priors[:, 2:] * torch.exp(loc[:, 2:] * VARIANCES[1])
    return torch.cat([centre - size / 2, centre + size / 2], 1)


def nms(boxes: np.ndarray, scores: np.ndarray, threshold: float, top_k: int | None = None) -> np.ndarray:
    """Greedy NMS: indices by descending score; a box is dropped when its IoU with a kept one exceeds ``threshold``."""
    order = np.argsort(-scores, kind="stable")
    if top_k is not None:
        order = order[:top_k]
    x1, y1, x2, y2 = (boxes[:, k] for k in range(4))
    areas = (x2 - x1) * (y2 - y1)
    keep = []
    while order.size:
        i = order[0]
        keep.append(int(i))
        rest = order[1:]
        w = np.maximum(0.0, np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]))
        h = np.maximum(0.0, np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]))
        inter = w * h
        order = rest[inter / (areas[i] + areas[rest] - inter) <= threshold]
    return np.array(keep, dtype=np.intp)


class S3FD:
    """A loaded S3FD on one device. ``detect_faces(frame_bgr)`` -> (K, 5) float (x1, y1, x2, y2, score), pixels."""

    def __init__(self, net: S3FDNet) -> None:
        self.net = net.eval()

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> "S3FD":
        """Strictly load ``sfd_face.pth`` (official or Caffe-style names) into :class:`S3FDNet`."""
        state = load_state_dict(path, fix=SFD_FIX)
        if any(k.startswith("conv1_1.") for k in state):
            names = caffe_style_names()
            state = {names.get(k.rsplit(".", 1)[0], k.rsplit(".", 1)[0]) + "." + k.rsplit(".", 1)[1]: v
                     for k, v in state.items()}
        net = S3FDNet()
        load_into(net, state, source=path, fix=SFD_FIX)  # in place
        if isinstance(device, str):
            from musetalk.devices import resolve_device

            device = resolve_device(device)
        return cls(net.to(device))

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    @torch.inference_mode()
    def detect_faces(self, frame_bgr: np.ndarray, conf_th: float = 0.9, scale: float = 0.25) -> np.ndarray:
        """Faces in one (H, W, 3) uint8 BGR frame, run at ``scale``; (K, 5) float64 sorted by score, in frame pixels."""
        h, w = frame_bgr.shape[:2]
        rgb = cv2.cvtColor(frame_bgr, cv2.COLOR_BGR2RGB)
        small = cv2.resize(rgb, dsize=(0, 0), fx=scale, fy=scale, interpolation=cv2.INTER_LINEAR)
        x = torch.from_numpy(small.astype(np.float32) - np.array(RGB_MEAN, np.float32)).permute(2, 0, 1)[None]
        loc, conf, sizes = self.net(x.to(self.device))
        priors = prior_boxes(small.shape[:2], sizes)
        boxes = decode_boxes(loc[0].float().cpu(), priors).numpy()
        scores = conf[0, :, 1].float().cpu().numpy()
        # Detect: candidates above 0.05, NMS 0.3 over the best 5000, at most 750 kept, best first
        cand = np.nonzero(scores > CANDIDATE_CONF)[0]
        kept = cand[nms(boxes[cand], scores[cand], CANDIDATE_NMS, CANDIDATE_TOP)][:KEEP_TOP]
        kept = kept[scores[kept] > conf_th]
        out = np.concatenate([boxes[kept] * np.array([w, h, w, h], np.float32), scores[kept, None]], 1)
        out = out.astype(np.float64)
        return out[nms(out[:, :4], out[:, 4], FINAL_NMS)] if len(out) else np.zeros((0, 5))
