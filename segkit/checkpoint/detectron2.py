"""Read detectron2 checkpoints safely and convert them into segkit's key layout.

Reading
    detectron2 model-zoo files (``model_final_*.pkl``) are Python pickles of
    ``{"model": {name: numpy.ndarray}, "__author__": str, ...}``. A pickle can name any
    importable callable and run it while loading, so :func:`read_pickle_weights` uses a
    restricted :class:`pickle.Unpickler` whose ``find_class`` admits only what numpy arrays
    and plain containers need (:data:`ALLOWED_GLOBALS`); anything else (``os.system``,
    ``builtins.eval``, ``subprocess.Popen``, ...) raises :class:`UnsafePickleError` naming the
    global and the file, BEFORE it is called. detectron2 ``.pth`` files (``torch.save`` of the
    same dict, tensors instead of arrays) are read with ``torch.load(weights_only=True)``.

Key names
    segkit's detection modules use detectron2's names, so every learned tensor keeps its name
    (identity rule, :data:`D2_KEY_PATTERNS` lists what is accepted), except in RetinaNet's head
    (rule 5):

    ============================================  ============================================
    detectron2 / segkit prefix                    module
    ============================================  ============================================
    ``backbone.bottom_up.stem.conv1[.norm]``      ResNet stem (FrozenBN: weight, bias,
                                                  running_mean, running_var)
    ``backbone.bottom_up.res{2-5}.{i}.``          bottleneck blocks: ``conv{1,2,3}[.norm]``,
                                                  ``shortcut[.norm]``
    ``backbone.fpn_lateral{l}`` /                 FPN lateral 1x1 / output 3x3 convs
    ``backbone.fpn_output{l}``
    ``backbone.top_block.p6`` / ``.p7``           RetinaNet's extra levels
    ``proposal_generator.rpn_head.``              ``conv``, ``objectness_logits``,
                                                  ``anchor_deltas``
    ``roi_heads.box_head.fc{i}``                  2fc box head
    ``roi_heads.box_predictor.cls_score``         K+1 outputs, background LAST in both
    ``roi_heads.box_predictor.bbox_pred``         4K class-specific outputs in both
    ``roi_heads.mask_head.``                      ``mask_fcn{i}``, ``deconv``, ``predictor``
                                                  (K class-specific mask channels)
    ``head.{cls,bbox}_subnet.{2i}`` ->            RetinaNet head (sigmoid, K per anchor):
    ``head.{cls,bbox}_subnet.{i}``,               subnet convs renumbered, predictor outputs
    ``head.{cls_score,bbox_pred}``                permuted to segkit's anchor order (rule 5)
    ============================================  ============================================

    Class order is also the same: detectron2's COCO models have 80 contiguous classes in COCO
    category-id order with the softmax background last, which is segkit's convention
    (README.md, "Conventions"), so no classifier row moves (unlike torchvision's converter).

    The other rules:

    1. A ``module.`` prefix (DistributedDataParallel) is stripped when every key has it.
    2. Non-learned leftovers of older detectron2 files are dropped and listed in the report:
       ``pixel_mean``, ``pixel_std`` (config values in segkit), ``*anchor_generator.
       cell_anchors.*`` (computed from the config) and ``*num_batches_tracked``.
    3. Input normalisation (stem rule): detectron2's model-zoo ResNets take BGR images
       normalised with mean (103.53, 116.28, 123.675) and std (1, 1, 1); segkit feeds RGB with
       the same mean and std ``SEGKIT_PIXEL_STD``. The first convolution is linear and its
       zero padding is the mean colour in both, so flipping its input channels and scaling
       channel c by ``segkit_std[c] / d2_std[c]`` gives the same features for the stock segkit
       configs (``bake_input=False`` keeps the tensor as is, for a model run with
       ``input_format=BGR`` and detectron2's std).
    4. Values become contiguous torch tensors (numpy arrays are copied).
    5. RetinaNet head, two differences no config value can express. (a) detectron2's subnets
       are ``Sequential(conv, ReLU, conv, ReLU, ...)``, so its convs are ``cls_subnet.0, .2,
       .4, .6``; segkit's ``RetinaNetHead`` holds the convs only (ReLU is applied in the
       conv's forward) as ``cls_subnet.0, .1, .2, .3``: index 2i becomes i (an odd index
       would be a norm layer, which is refused). (b) detectron2 orders the A = S sizes x R
       aspect ratios of a location size-major (``DefaultAnchorGenerator.
       generate_cell_anchors``: ``for size: for ratio``, anchor ``s * R + r``); segkit
       ratio-major, torchvision's order (:class:`segkit.modeling.anchors.
       DefaultAnchorGenerator` builds its cell anchors ``ratio x size``, anchor ``r * S + s``).
       Both heads lay out their predictors anchor by anchor (``cls_score`` output ``a * K + k``,
       ``bbox_pred`` output ``a * 4 + d``), so the A blocks of those weights and biases are
       permuted: segkit block ``r * S + s`` is detectron2 block ``s * R + r``, and each anchor
       box keeps its logits and deltas. S x R is ``retinanet_anchors``, detectron2's 3 x 3
       (octave sizes 2^0, 2^(1/3), 2^(2/3) x ratios 0.5, 1, 2). With one size per location,
       as in the RPN, both orders are the same and nothing moves.

    Anything else (Caffe2/Detectron1 ``blobs`` names, deformable or cascade heads, keypoint
    heads, ...) is refused with the list of unknown keys.

    detectron2's MSRA ResNets put the stride on the first 1x1 conv of a block, which the
    weights cannot show; the report lists the config overrides that match
    (``model.backbone.bottom_up.stride_in_1x1=true``).
"""
from __future__ import annotations

import importlib
import os
import pickle
import re
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "ALLOWED_GLOBALS", "COCO_CLASSES", "D2_KEY_PATTERNS", "SEGKIT_PIXEL_STD",
    "UnsafePickleError", "UnsupportedDetectron2Error", "coco_classes_or_generic",
    "D2_RETINANET_ANCHORS", "convert_detectron2",
    "read_detectron2_checkpoint", "read_pickle_weights",
]

# (module, name) globals a detectron2 .pkl of numpy arrays may reference. numpy 2 moved
# numpy.core to numpy._core; files written by either are accepted.
ALLOWED_GLOBALS = frozenset({
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("collections", "OrderedDict"),
    ("_codecs", "encode"),  # protocol-2 pickles store bytes as _codecs.encode(str, "latin1")
})
_NUMPY_CORE = ("numpy.core.", "numpy._core.")

SEGKIT_PIXEL_STD = (58.395, 57.12, 57.375)  # RGB, configs/model/*.yaml
D2_PIXEL_STD = (1.0, 1.0, 1.0)  # BGR, detectron2 MSRA R50/R101 model zoo

# segkit == detectron2 names (rule: identity); one regex per module family
D2_KEY_PATTERNS = tuple(re.compile(p) for p in (
    r"^backbone\.bottom_up\.stem\.conv1\.(weight|bias|norm\.(weight|bias|running_mean|running_var))$",
    r"^backbone\.bottom_up\.res[2-5]\.\d+\.(conv[123]|shortcut)\."
    r"(weight|bias|norm\.(weight|bias|running_mean|running_var))$",
    r"^backbone\.fpn_(lateral|output)[2-7]\.(weight|bias)$",
    r"^backbone\.top_block\.p[67]\.(weight|bias)$",
    r"^proposal_generator\.rpn_head\.(conv|objectness_logits|anchor_deltas)\.(weight|bias)$",
    r"^roi_heads\.box_head\.fc\d+\.(weight|bias)$",
    r"^roi_heads\.box_predictor\.(cls_score|bbox_pred)\.(weight|bias)$",
    r"^roi_heads\.mask_head\.(mask_fcn\d+|deconv|predictor)\.(weight|bias)$",
    r"^head\.(cls_subnet|bbox_subnet)\.\d+\.(weight|bias)$",
    r"^head\.(cls_score|bbox_pred)\.(weight|bias)$",
))
_DROPPED = re.compile(r"^(pixel_mean|pixel_std)$|anchor_generator\.cell_anchors\.|"
                      r"num_batches_tracked$")
_STEM = "backbone.bottom_up.stem.conv1.weight"
_DEPTHS = {(3, 4, 6, 3): 50, (3, 4, 23, 3): 101, (3, 8, 36, 3): 152}
_D2_SUBNET = re.compile(r"^head\.(cls_subnet|bbox_subnet)\.(\d+)\.(weight|bias)$")
D2_RETINANET_ANCHORS = (3, 3)  # sizes x aspect ratios per location, detectron2's RetinaNet
# (arch, depth) -> the experiment made for detectron2's model-zoo weights (MSRA ResNet, ...)
_EXPERIMENTS = {("mask_rcnn", 50): "mask_rcnn_r50_fpn_3x_detectron2",
                ("mask_rcnn", 101): "mask_rcnn_r101_fpn_3x_detectron2",
                ("faster_rcnn", 50): "faster_rcnn_r50_fpn_3x_detectron2",
                ("retinanet", 50): "retinanet_r50_fpn_3x_detectron2",
                ("rpn", 50): "rpn_r50_fpn_1x_coco"}  # no detectron2 RPN experiment: overrides

# detectron2's COCO thing classes (contiguous id c -> name), COCO category-id order
COCO_CLASSES = [
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat",
    "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack",
    "umbrella", "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball",
    "kite", "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket",
    "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair",
    "couch", "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse",
    "remote", "keyboard", "cell phone", "microwave", "oven", "toaster", "sink",
    "refrigerator", "book", "clock", "vase", "scissors", "teddy bear", "hair drier",
    "toothbrush",
]


class UnsafePickleError(pickle.UnpicklingError):
    """A pickle references a global outside :data:`ALLOWED_GLOBALS` (it could run code)."""


class UnsupportedDetectron2Error(ValueError):
    """The file or state dict is not a detectron2 model this converter understands."""


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file: Any, path: str):
        super().__init__(file, encoding="latin1")  # latin1: Python 2 pickles of arrays
        self._path = path

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in ALLOWED_GLOBALS:
            raise UnsafePickleError(
                f"refusing to load '{self._path}': the pickle references the global "
                f"{module}.{name}, which could run code; only numpy arrays and plain "
                f"containers are allowed in detectron2 weight files")
        if module.startswith(_NUMPY_CORE):  # no numpy.core deprecation shim on numpy 2
            for prefix in ("numpy._core.", "numpy.core."):
                try:
                    mod = importlib.import_module(prefix + module.split(".", 2)[2])
                    return getattr(mod, name)
                except (ImportError, AttributeError):
                    continue
        return getattr(importlib.import_module(module), name)

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError(f"refusing to load '{self._path}': persistent ids are not "
                                "allowed in detectron2 weight files")


def read_pickle_weights(path: str) -> Dict[str, Any]:
    """Read a detectron2 ``.pkl`` through the restricted unpickler.

    Returns:
        The stored dict, e.g. ``{"model": {name: np.ndarray}, "__author__": ...}``.

    Raises:
        UnsafePickleError: the pickle names a global outside :data:`ALLOWED_GLOBALS`
            (nothing it references has been called).
        UnsupportedDetectron2Error: unreadable file or not a dict; the message names the file.
    """
    try:
        with open(path, "rb") as f:
            obj = _RestrictedUnpickler(f, path).load()
    except UnsafePickleError:
        raise
    except Exception as e:
        raise UnsupportedDetectron2Error(
            f"cannot read '{path}' as a pickle: {type(e).__name__}: {e}") from e
    if not isinstance(obj, dict):
        raise UnsupportedDetectron2Error(f"'{path}' holds a {type(obj).__name__}, expected a "
                                         "dict")
    return obj


def read_detectron2_checkpoint(path: str) -> Dict[str, Any]:
    """Read a detectron2 checkpoint: ``.pkl`` (restricted unpickler) or ``.pth``/zip
    (``torch.load(weights_only=True)``). The format is taken from the file's first bytes."""
    if not os.path.isfile(path):
        raise UnsupportedDetectron2Error(f"checkpoint file '{path}' does not exist")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic.startswith(b"PK"):  # torch.save zip archive
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise UnsupportedDetectron2Error(
                f"cannot read '{path}' with torch.load(weights_only=True): "
                f"{type(e).__name__}: {e}") from e
        if not isinstance(obj, dict):
            raise UnsupportedDetectron2Error(
                f"'{path}' holds a {type(obj).__name__}, expected a dict")
        return obj
    return read_pickle_weights(path)


def _to_tensor(key: str, value: Any) -> Tensor:
    if isinstance(value, Tensor):
        return value.detach().clone().contiguous()
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(value).copy())
    raise UnsupportedDetectron2Error(f"value of {key!r} is a {type(value).__name__}, "
                                     "expected an array or tensor")


def _bake_input(weight: Tensor, d2_std: Sequence[float], segkit_std: Sequence[float]) -> Tensor:
    """Stem rule: BGR/d2_std weights -> RGB/segkit_std weights (see module docstring)."""
    rgb = weight.flip(1)  # input channels BGR -> RGB
    scale = torch.tensor(segkit_std, dtype=torch.float64) / torch.tensor(
        list(reversed(d2_std)), dtype=torch.float64)
    return (rgb.double() * scale.view(1, -1, 1, 1)).to(weight.dtype).contiguous()


def _retinanet_head(state: Dict[str, Tensor], sizes: int, ratios: int) -> Dict[str, Tensor]:
    """Rule 5: subnet conv 2i -> i; predictor anchor blocks size-major -> ratio-major."""
    out: Dict[str, Tensor] = {}
    for key, value in state.items():
        m = _D2_SUBNET.match(key)
        if m is not None:
            index = int(m.group(2))
            if index % 2:
                raise UnsupportedDetectron2Error(
                    f"{key}: only RetinaNet subnets of conv + ReLU (Sequential indices 0, 2, "
                    "4, ...) are supported, not subnets with norm layers")
            key = f"head.{m.group(1)}.{index // 2}.{m.group(3)}"
        out[key] = value
    anchors = sizes * ratios
    order = [(j % sizes) * ratios + j // sizes for j in range(anchors)]  # segkit j <- d2 order[j]
    for name in ("head.cls_score", "head.bbox_pred"):
        for leaf in ("weight", "bias"):
            t = out[f"{name}.{leaf}"]
            if t.shape[0] % anchors:
                raise UnsupportedDetectron2Error(
                    f"{name}.{leaf} has {t.shape[0]} outputs, not a multiple of {anchors} "
                    f"anchors ({sizes} sizes x {ratios} aspect ratios, retinanet_anchors)")
            blocks = t.reshape(anchors, t.shape[0] // anchors, *t.shape[1:])
            out[f"{name}.{leaf}"] = blocks[order].reshape(t.shape).contiguous()
    return out


def convert_detectron2(
    state: Mapping[str, Any], *, bake_input: bool = True,
    d2_pixel_std: Sequence[float] = D2_PIXEL_STD,
    segkit_pixel_std: Sequence[float] = SEGKIT_PIXEL_STD,
    retinanet_anchors: Tuple[int, int] = D2_RETINANET_ANCHORS,
) -> Tuple[Dict[str, Tensor], Dict[str, Any]]:
    """Convert a detectron2 model state (names -> arrays/tensors) into a segkit state dict.

    Args:
        state: detectron2 ``model`` dict, or the whole file dict holding it under ``"model"``.
        bake_input: apply the stem rule (BGR + ``d2_pixel_std`` -> RGB + ``segkit_pixel_std``).
        d2_pixel_std: detectron2's ``MODEL.PIXEL_STD`` (BGR order).
        segkit_pixel_std: the segkit config's ``pixel_std`` (RGB order).
        retinanet_anchors: (sizes, aspect ratios) per location of a RetinaNet's anchors
            (rule 5); their product must be the number of anchors the predictors have.

    Returns:
        ``(state_dict, report)``; report: ``{"arch", "depth", "num_classes", "has_mask",
        "experiment", "dropped": [keys], "config_overrides": [str]}``. ``experiment`` is the
        segkit experiment made for detectron2's weights of that architecture
        (``mask_rcnn_r50_fpn_3x_detectron2``, ``mask_rcnn_r101_fpn_3x_detectron2``,
        ``faster_rcnn_r50_fpn_3x_detectron2``, ``retinanet_r50_fpn_3x_detectron2``; an R50
        RPN gets ``rpn_r50_fpn_1x_coco`` with the overrides), else None.

    Raises:
        UnsupportedDetectron2Error: unknown keys (listed), non-array values, missing parts.
    """
    if "model" in state and isinstance(state["model"], Mapping):
        state = state["model"]
    if "blobs" in state:
        raise UnsupportedDetectron2Error("this is a Caffe2/Detectron1 'blobs' file; only "
                                         "detectron2-named weights are supported")
    state = dict(state)
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    dropped = sorted(k for k in state if _DROPPED.search(k))
    unknown = [k for k in state if k not in dropped
               and not any(p.match(k) for p in D2_KEY_PATTERNS)]
    if unknown:
        raise UnsupportedDetectron2Error(
            f"unexpected keys {unknown[:8]}{' ...' if len(unknown) > 8 else ''} "
            f"({len(unknown)} in all); expected a detectron2 ResNet-FPN Faster/Mask R-CNN, "
            "RPN or RetinaNet")
    out = {k: _to_tensor(k, v) for k, v in state.items() if k not in dropped}
    if _STEM not in out:
        raise UnsupportedDetectron2Error(f"missing {_STEM}: not a detectron2 ResNet model")
    if bake_input:
        out[_STEM] = _bake_input(out[_STEM], d2_pixel_std, segkit_pixel_std)

    blocks = tuple(len({k.split(".")[3] for k in out
                        if k.startswith(f"backbone.bottom_up.res{s}.")}) for s in range(2, 6))
    depth = _DEPTHS.get(blocks)
    has_mask = any(k.startswith("roi_heads.mask_head.") for k in out)
    num_classes: Optional[int] = None
    if "roi_heads.box_predictor.cls_score.weight" in out:
        num_classes = out["roi_heads.box_predictor.cls_score.weight"].shape[0] - 1
        box = out["roi_heads.box_predictor.bbox_pred.weight"].shape[0]
        if box != 4 * num_classes:
            raise UnsupportedDetectron2Error(
                f"roi_heads.box_predictor.bbox_pred has {box} outputs for {num_classes} "
                "classes; only class-specific box regression (4 per class) is supported")
        arch = "mask_rcnn" if has_mask else "faster_rcnn"
    elif "head.cls_score.weight" in out:
        anchors = out["head.bbox_pred.weight"].shape[0] // 4
        sizes, ratios = retinanet_anchors
        if anchors != sizes * ratios:
            raise UnsupportedDetectron2Error(
                f"head.bbox_pred has {anchors} anchors per location, not retinanet_anchors="
                f"{sizes} sizes x {ratios} aspect ratios; pass the model's counts")
        out = _retinanet_head(out, sizes, ratios)
        num_classes = out["head.cls_score.weight"].shape[0] // anchors
        arch = "retinanet"
    elif "proposal_generator.rpn_head.conv.weight" in out:
        arch = "rpn"
    else:
        raise UnsupportedDetectron2Error("no detection head (roi_heads, head or "
                                         "proposal_generator) in the weights")
    experiment = _EXPERIMENTS.get((arch, depth))
    overrides = ["model.backbone.bottom_up.stride_in_1x1=true"]
    if num_classes is not None:
        overrides.append(f"dataset.num_classes={num_classes}")
    report = {"arch": f"{arch}_R_{depth}_FPN" if depth else arch, "depth": depth,
              "num_classes": num_classes, "has_mask": has_mask, "experiment": experiment,
              "dropped": dropped, "config_overrides": overrides}
    return out, report


def coco_classes_or_generic(num_classes: Optional[int]) -> List[str]:
    """COCO's 80 names when the model has 80 classes, else ``class_<i>``."""
    if num_classes is None:
        return []  # RPN-only model
    if num_classes == len(COCO_CLASSES):
        return list(COCO_CLASSES)
    return [f"class_{i}" for i in range(num_classes)]

