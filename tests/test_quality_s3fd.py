"""S3FD pieces: anchors, decoding, NMS, checkpoint layouts, and the detect_faces contract (random weights).

(During development the whole detector was also compared with syncnet_python's own S3FD code on random
weights: same boxes, in the same order, within 1.2e-4 px.)
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from musetalk.errors import WeightsError
from musetalk.quality.s3fd import S3FD, S3FDNet, caffe_style_names, decode_boxes, nms, prior_boxes


def test_prior_boxes_are_row_major_anchor_centres():
    p = prior_boxes((64, 32), [(2, 1), (1, 1)])  # an image 64 high, 32 wide; maps of stride 4 and 8 (made up)
    # first map, row 0 / row 1, column 0: centre x = 0.5 / (32 / 4), y = (i + 0.5) / (64 / 4); anchor 16 px
    np.testing.assert_allclose(p[0].numpy(), [0.5 / 8, 0.5 / 16, 16 / 32, 16 / 64])
    np.testing.assert_allclose(p[1].numpy(), [0.5 / 8, 1.5 / 16, 16 / 32, 16 / 64])
    np.testing.assert_allclose(p[2].numpy(), [0.5 / 4, 0.5 / 8, 32 / 32, 32 / 64])


def test_decode_zero_regression_gives_the_anchor():
    priors = torch.tensor([[0.5, 0.5, 0.2, 0.4]])
    np.testing.assert_allclose(decode_boxes(torch.zeros(1, 4), priors).numpy(), [[0.4, 0.3, 0.6, 0.7]], rtol=1e-6)
    moved = decode_boxes(torch.tensor([[1.0, 0.0, 0.0, 0.0]]), priors)  # dx = 1 moves by 0.1 * width
    assert moved[0, 0].item() == pytest.approx(0.42)


def test_nms_keeps_best_of_overlapping_boxes():
    boxes = np.array([[0, 0, 10, 10], [1, 0, 11, 10], [20, 20, 30, 30], [0, 0, 10, 10.5]], np.float64)
    scores = np.array([0.8, 0.9, 0.5, 0.7])
    assert nms(boxes, scores, 0.3).tolist() == [1, 2]  # 0 and 3 overlap 1 by more than 0.3
    assert nms(boxes, scores, 0.3, top_k=2).tolist() == [1]  # only the two best are candidates


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    torch.manual_seed(0)
    net = S3FDNet()
    with torch.no_grad():  # spread the face scores so that some pass a threshold
        for conv in net.conf:
            conv.weight.mul_(30)
    d = tmp_path_factory.mktemp("sfd")
    official = d / "sfd_face.pth"
    torch.save(net.state_dict(), official)
    names = {v: k for k, v in caffe_style_names().items()}
    caffe = d / "s3fd-caffe-names.pth"
    torch.save({names[k.rsplit(".", 1)[0]] + "." + k.rsplit(".", 1)[1]: v for k, v in net.state_dict().items()},
               caffe)
    return official, caffe


def test_both_checkpoint_layouts_load_the_same_weights(weights, tmp_path):
    a, b = (S3FD.from_pretrained(p, device="cpu") for p in weights)
    for (ka, va), (kb, vb) in zip(a.net.state_dict().items(), b.net.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    bad = tmp_path / "other.pth"
    torch.save({"backbone.conv1.weight": torch.zeros(1)}, bad)
    with pytest.raises(WeightsError, match="missing keys"):
        S3FD.from_pretrained(bad)


def test_detect_faces_contract(weights):
    det = S3FD.from_pretrained(weights[0], device="cpu")
    rng = np.random.default_rng(0)
    frame = (rng.random((96, 160, 3)) * 255).astype(np.uint8)
    boxes = det.detect_faces(frame, conf_th=0.5, scale=0.5)
    assert boxes.ndim == 2 and boxes.shape[1] == 5 and boxes.dtype == np.float64
    assert len(boxes) > 0 and (boxes[:, 4] > 0.5).all()
    assert (np.diff(boxes[:, 4]) <= 0).all()  # best first: the order the tracker sees
    assert det.detect_faces(frame, conf_th=1.0, scale=0.5).shape == (0, 5)
