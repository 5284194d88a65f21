"""Small files in the publishers' formats for the model-zoo tests: thin versions of the zoo's
architectures (ResNet-18, 32-channel FPN), small but taking the same converter paths as the
published files (shared by conftest.py's fixtures and the tests)."""
import hashlib
import io
import pickle

import numpy as np
import torch

CLASSES = ["circle", "square", "triangle"]
THIN_RCNN = ["model/backbone=resnet18_fpn", "model.backbone.out_channels=32",
             "model.roi_heads.box_head.fc_dim=64", "model.roi_heads.mask_head.conv_dim=32"]
THIN_RETINANET = ["model/backbone=resnet18_fpn_p3p7", "model.backbone.out_channels=32"]
SEGKIT_STD = (58.395, 57.12, 57.375)
STEM = "backbone.bottom_up.stem.conv1.weight"


class Published:
    """A publisher's file: ``body`` (bytes), its digests, and the segkit state dict that the
    zoo must load from it (``expected``)."""

    def __init__(self, body, expected, filename):
        self.body, self.expected, self.filename = body, expected, filename
        self.sha256 = hashlib.sha256(body).hexdigest()
        self.md5 = hashlib.md5(body).hexdigest()


def _randomize(state, seed):
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in state.items():
        if not v.is_floating_point():
            out[k] = v.clone()
        elif k.endswith("running_var"):
            out[k] = torch.rand(v.shape, generator=gen) + 0.5
        else:
            out[k] = torch.randn(v.shape, generator=gen) * 0.05
    return out


def _saved(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def torchvision_mask_rcnn():
    """A torchvision MaskRCNN state dict (ResNet-18 FPN, 3 classes + background)."""
    from torchvision.models import resnet18
    from torchvision.models.detection import MaskRCNN
    from torchvision.models.detection.backbone_utils import BackboneWithFPN
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
    from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
    from torchvision.ops import FrozenBatchNorm2d
    from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

    from segkit.checkpoint.torchvision import convert_torchvision_detection

    body = resnet18(weights=None, norm_layer=FrozenBatchNorm2d)
    layers = {"layer1": "0", "layer2": "1", "layer3": "2", "layer4": "3"}
    backbone = BackboneWithFPN(body, layers, [64, 128, 256, 512], 32,
                               extra_blocks=LastLevelMaxPool())
    k = len(CLASSES) + 1
    model = MaskRCNN(backbone, num_classes=None, box_head=TwoMLPHead(32 * 7 * 7, 64),
                     box_predictor=FastRCNNPredictor(64, k),
                     mask_head=MaskRCNNHeads(32, [32] * 4, 1),
                     mask_predictor=MaskRCNNPredictor(32, 32, k))
    state = _randomize(model.state_dict(), seed=0)
    expected, _ = convert_torchvision_detection(state)
    return Published(_saved(state), expected, "mask_rcnn_tiny_tv.pth")


def _segkit_state(experiment, overrides, seed):
    from segkit.config import compose
    from segkit.engine.defaults import build_model

    cfg = compose([f"experiment={experiment}", *overrides, f"dataset.num_classes={len(CLASSES)}"])
    return _randomize(build_model(cfg).state_dict(), seed)


def _to_detectron2(state):
    """segkit state -> detectron2 arrays (same names; stem back to BGR with std 1)."""
    out = {k: v.numpy().copy() for k, v in state.items()}
    std = torch.tensor(SEGKIT_STD, dtype=torch.float64).view(1, 3, 1, 1)
    out[STEM] = (state[STEM].double() / std).flip(1).float().numpy().copy()
    out["pixel_mean"] = np.array([103.53, 116.28, 123.675], np.float32).reshape(3, 1, 1)
    return out


def _pickled(d2_state):
    return pickle.dumps({"model": d2_state, "__author__": "Detectron2 Model Zoo"}, protocol=2)


def detectron2_mask_rcnn():
    """A detectron2-format .pkl of the thin Mask R-CNN of mask_rcnn_r50_fpn_3x_detectron2."""
    expected = _segkit_state("mask_rcnn_r50_fpn_3x_detectron2", THIN_RCNN, seed=1)
    return Published(_pickled(_to_detectron2(expected)), expected, "model_final_tiny.pkl")


def detectron2_retinanet():
    """A detectron2-format RetinaNet .pkl: subnets Sequential(conv, ReLU, ...) (conv i saved
    as 2i) and anchors size-major (detectron2 anchor s * 3 + r = segkit anchor r * 3 + s)."""
    expected = _segkit_state("retinanet_r50_fpn_3x_detectron2", THIN_RETINANET, seed=2)
    d2 = {}
    for k, v in _to_detectron2(expected).items():
        parts = k.split(".")
        if parts[:2] in (["head", "cls_subnet"], ["head", "bbox_subnet"]):
            parts[2] = str(2 * int(parts[2]))
        d2[".".join(parts)] = v
    segkit_of_d2 = [(i % 3) * 3 + i // 3 for i in range(9)]  # d2 anchor i = (s, r) = divmod(i, 3)
    for name in ("head.cls_score", "head.bbox_pred"):
        for leaf in ("weight", "bias"):
            v = d2[f"{name}.{leaf}"]
            blocks = v.reshape(9, v.shape[0] // 9, *v.shape[1:])
            d2[f"{name}.{leaf}"] = blocks[segkit_of_d2].reshape(v.shape).copy()
    return Published(_pickled(d2), expected, "model_final_retina.pkl")


def detectron2_embedded_mask_rcnn():
    """A detectron2-format .pkl of the main job's model (mask_rcnn_r18_fpn_embedded), whose
    classes are the embedded dataset's: a zoo entry that segkit-eval can evaluate offline."""
    from segkit.data.shapes import CLASSES as SHAPES

    from segkit.config import compose
    from segkit.engine.defaults import build_model

    cfg = compose(["experiment=mask_rcnn_r18_fpn_embedded", f"dataset.num_classes={len(SHAPES)}"])
    expected = _randomize(build_model(cfg).state_dict(), seed=3)
    d2 = {k: v for k, v in _to_detectron2(expected).items()}
    expected = {k: v for k, v in expected.items() if not k.endswith("num_batches_tracked")}
    return Published(_pickled(d2), expected, "model_final_shapes.pkl"), list(SHAPES)


def torchvision_resnet18():
    """An ImageNet-style torchvision ResNet-18 state dict (classifier included, as published);
    ``expected`` is the segkit ResNet's state (classifier dropped)."""
    from torchvision.models import resnet18

    from segkit.modeling.backbone import convert_torchvision_resnet

    state = _randomize(resnet18(weights=None).state_dict(), seed=4)
    return Published(_saved(state), convert_torchvision_resnet(state), "resnet18-tiny.pth")
