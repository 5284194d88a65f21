"""Full-image inference of real (thin, untrained) models: edge cases, batches of several image
sizes, the test mapper's resize, SharpMask's refinement of the top windows, NMS, settings."""
import pytest
import torch

from segkit.structures import pairwise_iou
from segkit_deepmask.modeling import InferenceSettings, full_image_inference
from segkit_deepmask.modeling.inference import _crop

from deepmask_testing import build, image_input, tiny


@pytest.fixture(scope="module")
def deepmask():
    # one scale keeps the tests fast; the full pyramid runs in the first test
    return tiny("deepmask", "model.inference.log2_scale_min=0.0",
                "model.inference.log2_scale_max=0.0")


def _num_windows(h, w, settings, window=160):
    """Dense positions over the pyramid: each scale padded by window / 2 and up to a multiple
    of 16; 10 x 10 feature windows at stride 16."""
    total = 0
    for log2 in settings.log2_scales():
        hs, ws = (max(1, round(v * 2 ** log2)) for v in (h, w))
        total += (-(-(hs + window) // 16) - 9) * (-(-(ws + window) // 16) - 9)
    return total


def _check(inst, size, n):
    assert inst.image_size == size and len(inst) == n
    assert inst.pred_masks.shape == (n, *size) and inst.pred_masks.dtype == torch.bool
    boxes = inst.pred_boxes.tensor
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= size[1]).all()
    assert (boxes[:, 3] <= size[0]).all() and (boxes[:, 2:] > boxes[:, :2]).all()
    assert torch.all(inst.scores[:-1] >= inst.scores[1:])
    assert torch.equal(inst.pred_classes, torch.zeros(n, dtype=torch.int64))


def test_small_image_without_objects_and_more_proposals_than_windows(deepmask):
    """A flat grey 24 x 20 image is smaller than the window at every scale: every scale runs
    (the grey border makes room for the window), and asking for more proposals than there
    are windows returns them all."""
    settings = InferenceSettings(max_proposals=100000)
    inp = {"image": torch.full((3, 24, 20), 128, dtype=torch.uint8)}
    inst = full_image_inference(deepmask, [inp], settings)[0]
    n = _num_windows(24, 20, settings)
    _check(inst, (24, 20), n)
    assert len(set(inst.log2_scales.tolist())) == 7


def test_batch_of_images_of_different_sizes_equals_one_by_one(deepmask):
    inputs = [image_input(40, 56, seed=1), image_input(72, 30, seed=2, height=36, width=15)]
    batch = deepmask(inputs)
    assert [tuple(r["instances"].image_size) for r in batch] == [(40, 56), (36, 15)]
    for inp, out in zip(inputs, batch):
        alone = deepmask([inp])[0]["instances"]
        _check(out["instances"], alone.image_size, len(alone))
        assert torch.allclose(out["instances"].scores, alone.scores)
        assert torch.equal(out["instances"].pred_masks, alone.pred_masks)


def test_the_pyramid_is_relative_to_the_original_image(deepmask):
    """The test mapper resized a 30 x 44 image to 60 x 88: the windows are those of the
    original image and every output is at its size."""
    settings = InferenceSettings(log2_scale_min=-0.5, log2_scale_max=0.0,
                                 max_proposals=100000, paste_masks=False)
    original = image_input(30, 44)
    resized = {"image": torch.nn.functional.interpolate(
        original["image"][None].float(), size=(60, 88), mode="bilinear")[0],
        "height": 30, "width": 44}
    a, b = full_image_inference(deepmask, [original, resized], settings)
    assert a.image_size == b.image_size == (30, 44) and len(a) == len(b)
    assert not b.has("pred_masks")

    def keys(inst):
        return sorted(map(tuple, torch.cat([inst.window_boxes.tensor,
                                            inst.log2_scales[:, None]], 1).tolist()))
    assert keys(a) == keys(b)


def test_sharpmask_refines_the_top_windows_from_cropped_skips():
    model = tiny("sharpmask")
    settings = InferenceSettings(max_proposals=6, log2_scale_min=0.0, log2_scale_max=0.0)
    inp = image_input(40, 60)
    inst = full_image_inference(model, [inp], settings)[0]
    _check(inst, (40, 60), 6)
    # by hand: the dense pass of the only scale (40 x 60 + 80 px grey each side, padded to
    # 208 x 224), then R0..R4 on the best window's vector and skip crops (papers.md 3.4)
    image = (inp["image"].float() - model.pixel_mean) / model.pixel_std
    canvas = ((128 - model.pixel_mean) / model.pixel_std).expand(1, 3, 208, 224).clone()
    canvas[:, :, 80:120, 80:140] = image
    with torch.no_grad():
        dense = model.forward_dense(canvas, masks=False)
        scores = dense["scores"][0]
        best = int(torch.argmax(scores))
        i, j = divmod(best, scores.shape[1])
        assert torch.allclose(inst.score_logits[0], scores.flatten()[best])
        crops = [_crop(s[0], torch.tensor([i]), torch.tensor([j]), 2 ** k, 10)
                 for k, s in enumerate(dense["skips"])]
        refined = model.refinement.decode(dense["embeddings"][0, :, i, j][None], crops)
    assert [c.shape[-1] for c in crops] == [10, 20, 40, 80] and refined.shape[-1] == 160
    window = [16 * j - 80, 16 * i - 80, 16 * j + 80, 16 * i + 80]
    assert inst.window_boxes.tensor[0].tolist() == window
    on = refined[0, 0] > torch.logit(torch.tensor(0.2))
    top, left = 80 - 16 * i, 80 - 16 * j  # image pixel (0, 0) in the 160 x 160 window
    want = on[top:top + 40, left:left + 60]
    assert int((inst.pred_masks[0] != want).sum()) <= 2  # float rounding at the threshold
    chunked = full_image_inference(model, [inp], settings.replace(refine_batch_size=4))[0]
    assert torch.equal(chunked.pred_masks, inst.pred_masks)
    coarse = full_image_inference(model, [inp], settings.replace(coarse_masks=True))[0]
    assert torch.equal(coarse.score_logits, inst.score_logits)


def test_optional_nms_on_mask_boxes(deepmask):
    settings = deepmask.inference_settings.replace(max_proposals=20, nms_thresh=0.5)
    inst = full_image_inference(deepmask, [image_input(48, 64)], settings)[0]
    iou = pairwise_iou(inst.pred_boxes, inst.pred_boxes)
    assert len(inst) > 0 and (iou.triu(1) <= 0.5 + 1e-6).all()
    # an NMS that suppresses nothing (IoU > 1 never happens) gives the NMS-free proposals:
    # the masks its pass computed are reused for the same windows
    plain = full_image_inference(deepmask, [image_input(48, 64)],
                                 settings.replace(nms_thresh=None))[0]
    kept = full_image_inference(deepmask, [image_input(48, 64)],
                                settings.replace(nms_thresh=1.0))[0]
    assert torch.equal(kept.scores, plain.scores)
    assert torch.equal(kept.pred_masks, plain.pred_masks)
    assert torch.equal(kept.pred_boxes.tensor, plain.pred_boxes.tensor)


def test_settings_are_checked_and_come_from_the_config():
    assert InferenceSettings().log2_scales() == [-2.0, -1.5, -1.0, -0.5, 0.0, 0.5, 1.0]
    released = InferenceSettings(log2_scale_min=-2.5, log2_scale_max=0.5, zoom=2)
    assert released.log2_scales()[0] == -2.5 and released.log2_scales()[-1] == 1.5
    with pytest.raises(ValueError, match="did you mean 'max_proposals'"):
        InferenceSettings.from_node({"max_proposal": 10})
    for bad in ({"log2_scale_step": 0.0}, {"log2_scale_max": 0.7}, {"mask_threshold": 1.0},
                {"nms_thresh": 0.0}, {"zoom": -1}, {"max_proposals": 0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            InferenceSettings(**bad)
    model = build("model=deepmask", "model/backbone=deepmask_resnet18",
                  "model.inference.zoom=1", "model.inference.max_proposals=7")
    assert model.inference_settings.zoom == 1 and model.inference_settings.max_proposals == 7
    with pytest.raises(ValueError, match="eval mode"):
        full_image_inference(model.train(), [image_input(8, 8)])
    with pytest.raises(ValueError, match=r"\['image'\] must be a \(3, H, W\) tensor"):
        full_image_inference(model.eval(), [{"image": torch.zeros(8, 8)}])


@pytest.mark.slow
def test_nips_deepmask_full_image():
    """The VGG model: 224 window, dense masks (no shared vector), fine-stride scores."""
    model = build("model=deepmask_vgg", "model.inference.max_proposals=10").eval()
    inst = model([image_input(50, 70)])[0]["instances"]
    _check(inst, (50, 70), 10)
    assert inst.window_boxes.tensor[:, 2:].sub(inst.window_boxes.tensor[:, :2]).min() >= 112


def test_timing_helper_times_models_on_the_same_images(deepmask):
    from segkit_deepmask.timing import time_inference

    inputs = [image_input(24, 32)]
    medians = time_inference({"a": deepmask, "b": deepmask}, inputs, warmup=0)
    assert set(medians) == {"a", "b"} and all(v > 0 for v in medians.values())
    with pytest.raises(ValueError, match="at least one"):
        time_inference({}, inputs)


@pytest.mark.slow
def test_timing_command_line(capsys):
    from segkit_deepmask.timing import main

    fast = ["model/backbone=deepmask_resnet18", "model.backbone.resnet.base_channels=8",
            "model.inference.log2_scale_min=0.0", "model.inference.log2_scale_max=0.0",
            "model.inference.max_proposals=5", "train.device=cpu"]
    medians = main(["--num-images", "1", "--size", "24", "32", *fast])
    assert set(medians) == {"deepmask", "sharpmask"} and all(v > 0 for v in medians.values())
    assert "s/image" in capsys.readouterr().out
