"""Helpers shared by the project's tests: sampler-like batches and models composed from the
project's configs (a module of its own: a test file importing ``conftest`` would get the core
tests' conftest when both trees are collected)."""
import torch


def make_batch(kind, n=2, size=192, label_size=112, seed=0):
    """``n`` samples of the sampler's contract: ``kind`` "mask" or "score"."""
    g = torch.Generator().manual_seed(seed)
    batch = []
    for i in range(n):
        image = torch.randint(0, 256, (3, size, size), generator=g, dtype=torch.uint8)
        sample = {"kind": kind, "image": image,
                  "image_id": i, "window": torch.tensor([0.0, 0.0, 10.0, 10.0])}
        if kind == "mask":
            sample["mask"] = torch.randint(0, 2, (label_size, label_size), generator=g) * 2.0 - 1
        else:
            sample["label"] = torch.tensor(1.0 if i % 2 == 0 else -1.0)
        batch.append(sample)
    return batch


def build(*overrides):
    """A model built from ``compose`` + ``build_model`` with the given overrides."""
    from segkit.config import compose
    from segkit.engine.defaults import build_model

    # the core's default experiment configures a Mask R-CNN; the model options stand alone
    torch.manual_seed(0)
    return build_model(compose(["~experiment", "train.device=cpu", *overrides]))


# a thin ResNet-18 trunk: fast enough for full-image inference in the tests
THIN_R18 = ["model/backbone=deepmask_resnet18", "model.backbone.resnet.base_channels=8"]


def tiny(arch="deepmask", *overrides):
    """A thin ``arch`` model ("deepmask" / "sharpmask") in eval mode."""
    return build(f"model={arch}", *THIN_R18, *overrides).eval()


def image_input(h, w, seed=0, **extra):
    """A core model input: random uint8 (3, h, w) RGB plus ``extra`` keys (e.g. the original
    ``height`` and ``width``)."""
    g = torch.Generator().manual_seed(seed)
    image = torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8)
    return {"image": image, **extra}
