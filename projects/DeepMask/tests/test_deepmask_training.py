"""Training DeepMask / SharpMask through the core trainer: the patch loader selected by
``dataloader.name``, the recipe checks, every experiment config, the stage-2 optimiser and
initialisation, and end-to-end runs (checkpoints, exact resume, frozen stage-1 weights)."""
import json
import shutil

import pytest
import torch

from segkit.checkpoint import load_checkpoint, load_state_dict_report, save_checkpoint
from segkit.config import compose
from segkit.data import load_coco_json
from segkit.engine import defaults as D
from segkit.engine.cli import run_train
from segkit.utils import comm
from segkit_deepmask.data import PatchBatchSampler, square, write_coco_dataset

EXPERIMENTS = {  # experiment -> its model option
    "deepmask_r50_coco": "deepmask", "sharpmask_r50_coco": "sharpmask",
    "deepmask_nips_vgg_coco": "deepmask_vgg", "deepmask_r18_embedded": "deepmask",
    "sharpmask_r18_embedded": "sharpmask",
}
# a thin trunk and few iterations: seconds on two cores
TINY = ["model.backbone.resnet.base_channels=8", "model.shared_head.hidden_channels=16",
        "model.score_head.hidden_dim=64", "dataloader.batch_size=4", "dataloader.num_workers=0",
        "solver.max_iter=4", "solver.steps=[2,3]", "train.checkpoint_period=2",
        "train.log_period=1", "train.metrics_window=1", "train.deterministic=true",
        "train.num_vis_images=1", "evaluation.max_images=2", "train.device=cpu"]


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    """A tiny COCO-format dataset: squares and triangles of 16-48 px on 96 x 128 images."""
    images = [{"height": 96, "width": 128, "objects": [
        {"polygon": square(8 + 9 * i, 12 + 4 * i, 16 + 6 * i), "category": 1 + i % 2},
        {"polygon": [70, 40 + 3 * i, 112, 50, 80, 88 - 2 * i], "category": 2}]}
        for i in range(5)]
    json_file, image_root = write_coco_dataset(str(tmp_path_factory.mktemp("coco")), images)
    return json_file, image_root


def _data(coco):
    json_file, image_root = coco
    return ["dataset=coco_format"] + [f"dataset.{s}.{k}={v}" for s in ("train", "val")
                                      for k, v in (("json", json_file), ("images", image_root))]


def _records(coco):
    return load_coco_json(*coco)[0]


# -- the loader ------------------------------------------------------------------------------

def test_the_patch_loader_is_selected_by_config_and_shards_the_total_batch(coco, monkeypatch):
    cfg = compose(["experiment=deepmask_r18_embedded", "dataloader.batch_size=4",
                   "dataloader.num_workers=0", "train.seed=5"])
    records = _records(coco)
    single = next(iter(D.build_train_loader(cfg, records)))
    assert len(single) == 4 and len({s["kind"] for s in single}) == 1
    kind = single[0]["kind"]
    for s in single:
        assert s["image"].shape == (3, 96, 96)
        assert (s["mask"].shape == (56, 56)) if kind == "mask" else (s["label"].shape == ())
    monkeypatch.setattr(comm, "get_world_size", lambda: 2)
    shards = []
    for rank in (0, 1):
        monkeypatch.setattr(comm, "get_rank", lambda: rank)
        loader = D.build_train_loader(cfg, records)
        batches = loader.batch_sampler
        assert isinstance(batches, PatchBatchSampler)
        assert (batches.batch_size, batches.rank, batches.world_size) == (2, rank, 2)
        assert batches.seed == 5 and batches.hfreq == 0.5  # train.seed, dataloader.hfreq
        shards.append(next(iter(loader)))
    # rank r holds positions r, r + 2 of the iteration's 4 patches
    for k, sample in enumerate(single):
        assert torch.equal(sample["image"], shards[k % 2][k // 2]["image"])


def test_stage_2_loader_draws_mask_batches_with_whole_window_labels(coco):
    cfg = compose(["experiment=sharpmask_r18_embedded", "dataloader.batch_size=2",
                   "dataloader.num_workers=0", "train.init_weights=stage1.pth"])
    loader = iter(D.build_train_loader(cfg, _records(coco)))
    for _ in range(3):
        batch = next(loader)
        assert {s["kind"] for s in batch} == {"mask"}
        assert batch[0]["mask"].shape == (64, 64)  # the 64 px window (papers.md 3.2: gSz = iSz)


@pytest.mark.parametrize("overrides, message", [
    ([], "train.init_weights=<stage-1 run folder>/model_final.pth"),
    (["train.init_weights=x.pth", "dataloader.hfreq=0.5"], "set dataloader.hfreq=0"),
])
def test_stage_2_recipe_errors_say_what_to_pass(coco, overrides, message):
    cfg = compose(["experiment=sharpmask_r18_embedded", "dataloader.num_workers=0", *overrides])
    with pytest.raises(ValueError, match="SharpMask|papers.md 3.3") as e:
        D.build_train_loader(cfg, _records(coco))
    assert message in str(e.value)
    # a resumed stage 2 has its weights in the checkpoint: no init_weights needed
    if not overrides:
        D.build_train_loader(cfg, _records(coco), start_iter=3)


def test_patches_must_have_the_models_sizes(coco):
    cfg = compose(["experiment=deepmask_r50_coco", "dataloader.preset=sharpmask"])
    with pytest.raises(ValueError, match="label_size 160 .* model.label_size is 112"):
        D.build_train_loader(cfg, _records(coco), start_iter=1)


# -- experiments ------------------------------------------------------------------------------

@pytest.mark.parametrize("experiment", sorted(EXPERIMENTS))
def test_every_experiment_composes_builds_and_trains_a_step(experiment, coco):
    cfg = compose([f"experiment={experiment}", "train.device=cpu", "dataloader.batch_size=2",
                   "dataloader.num_workers=0"])
    assert cfg.experiment == experiment and cfg.evaluation.name == "proposals"
    # the whole model and dataloader nodes are the project's: nothing left of Mask R-CNN's
    option = compose(["~experiment", f"model={EXPERIMENTS[experiment]}",
                      "dataloader=deepmask"])
    assert set(cfg.model) == set(option.model) and set(cfg.dataloader) == set(option.dataloader)
    assert cfg.dataloader.name == "deepmask.patches" and cfg.train.find_unused_parameters
    model = D.build_model(cfg)
    # the patches fit the model (a stage-2 recipe is checked as if resumed: no weights here)
    batch = next(iter(D.build_train_loader(cfg, _records(coco), start_iter=1)))
    losses = model(batch)
    assert set(losses) <= {"loss_mask", "loss_score"} and torch.isfinite(sum(losses.values()))


def test_recipes_follow_the_papers():
    dm = compose(["experiment=deepmask_r50_coco"])
    assert dm.dataloader.batch_size == 32 and dm.dataloader.hfreq == 0.5
    s = dm.solver
    assert (s.base_lr, s.momentum, s.weight_decay, s.warmup_iters) == (1e-3, 0.9, 5e-5, 0)
    # 1e-3 -> 5e-4 after 50 epochs -> 1e-4 after 120, epochs of 4000 batches (papers.md 2.3)
    assert list(s.steps) == [50 * 4000, 120 * 4000] and list(s.step_factors) == [1, 0.5, 0.1]
    sm = compose(["experiment=sharpmask_r50_coco"])
    assert sm.model.train_refinement_only and sm.dataloader.hfreq == 0
    assert sm.model.label_size == 160 and sm.solver.base_lr == 1e-3 and not sm.solver.steps
    released = compose(["experiment=sharpmask_r50_coco", "solver=sharpmask_released"]).solver
    assert (released.momentum, released.weight_decay, list(released.steps)) == (0, 0, [])
    assert released.max_iter == 300 * 4000
    nips = compose(["experiment=deepmask_nips_vgg_coco"])
    assert nips.dataloader.preset == "deepmask_nips" and nips.solver.weight_decay == 5e-5


# -- stage 2: optimiser and initialisation ----------------------------------------------------

def _tiny_model(experiment):
    cfg = compose([f"experiment={experiment}", *TINY])
    torch.manual_seed(0)
    return cfg, D.build_model(cfg)


def test_stage_2_optimises_only_the_refinement():
    cfg, model = _tiny_model("sharpmask_r18_embedded")
    optimizer = D.build_optimizer(cfg, model)
    optimised = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert optimised == {id(p) for p in model.refinement.parameters()}


def test_stage_1_checkpoint_loads_all_but_the_refinement(tmp_path):
    _, deepmask = _tiny_model("deepmask_r18_embedded")
    save_checkpoint(str(tmp_path / "stage1.pth"), deepmask.state_dict())
    _, sharpmask = _tiny_model("sharpmask_r18_embedded")
    report = load_state_dict_report(sharpmask, load_checkpoint(str(tmp_path / "stage1.pth"))
                                    ["model"])
    assert not report.unexpected and not report.shape_mismatch
    assert report.missing and all(k.startswith("refinement.") for k in report.missing)
    for key, value in deepmask.state_dict().items():
        assert torch.equal(sharpmask.state_dict()[key], value), key


# -- end to end through the core Trainer ------------------------------------------------------

def _losses(out):
    lines = [json.loads(x) for x in (out / "metrics.json").read_text().splitlines()]
    return {d["iteration"]: {k: v for k, v in d.items() if k.startswith("loss_")}
            for d in lines if "total_loss" in d}


@pytest.mark.slow
def test_train_resume_then_train_stage_2_on_frozen_stage_1(coco, tmp_path):
    """Stage 1 writes checkpoints and evaluates proposals; a run resumed from its iteration-1
    checkpoint logs the uninterrupted run's losses (deterministic CPU mode); stage 2 from its
    final weights changes the refinement only. Needs full-image inference (final evaluation)."""
    stage1 = tmp_path / "stage1"
    results = run_train(compose(["experiment=deepmask_r18_embedded", *TINY, *_data(coco),
                                 f"train.output_dir={stage1}"]))
    # box and mask AR: the engine knows the model's proposals carry masks
    assert "AR@100" in results["bbox"] and "AR@100" in results["segm"]
    assert {"model_0000001.pth", "model_final.pth", "last_checkpoint", "metrics.json",
            "final_results.json"} <= {p.name for p in stage1.iterdir()}
    full = _losses(stage1)
    assert sorted(full) == [0, 1, 2, 3]
    assert {k for it in full for k in full[it]} == {"loss_mask", "loss_score"}  # hfreq 0.5

    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copy(stage1 / "model_0000001.pth", resumed)
    (resumed / "last_checkpoint").write_text("model_0000001.pth\n")
    run_train(compose(["experiment=deepmask_r18_embedded", *TINY, *_data(coco),
                       f"train.output_dir={resumed}", "train.resume=true",
                       "train.num_vis_images=0"]))
    again = _losses(resumed)
    assert sorted(again) == [2, 3]
    for it in (2, 3):  # the same batches, weights, momentum and LR as the uninterrupted run
        assert again[it].keys() == full[it].keys()
        for name, value in again[it].items():
            assert value == pytest.approx(full[it][name], rel=1e-6, abs=1e-7), (it, name)

    stage2 = tmp_path / "stage2"
    run_train(compose(["experiment=sharpmask_r18_embedded", *TINY, *_data(coco),
                       f"train.output_dir={stage2}", "solver.max_iter=2", "solver.steps=[]",
                       "solver.step_factors=null", "train.checkpoint_period=1",
                       "train.num_vis_images=0",
                       f"train.init_weights={stage1 / 'model_final.pth'}"]))
    assert {k for v in _losses(stage2).values() for k in v} == {"loss_mask"}
    stage1_final = load_checkpoint(str(stage1 / "model_final.pth"))["model"]
    first = load_checkpoint(str(stage2 / "model_0000000.pth"))["model"]  # after 1 iteration
    last = load_checkpoint(str(stage2 / "model_final.pth"))["model"]  # after 2
    refinement = {k for k in last if k.startswith("refinement.")}
    assert refinement and set(last) - refinement == set(stage1_final)
    assert any(not torch.equal(first[k], last[k]) for k in refinement)
    for key in set(last) - refinement:
        # trunk (weights and BatchNorm statistics), head C, mask and score heads: frozen
        assert torch.equal(first[key], stage1_final[key]), key
        assert torch.equal(last[key], stage1_final[key]), key


@pytest.mark.slow
def test_two_processes_train_like_one_with_the_same_total_batch(coco, tmp_path):
    """4 patches per iteration in one process or 2 x 2 in two (gloo): the same losses and
    weights. Frozen BatchNorm and no dropout, so nothing depends on the split; the idle head
    of each batch gets no gradient under DDP either (train.find_unused_parameters)."""
    same = ["model.backbone.resnet.norm=frozen_bn", "model.score_head.dropout=0.0",
            "train.num_vis_images=0", "evaluation.max_images=1", "train.checkpoint_period=0"]
    runs = {}
    for n in (1, 2):
        out = tmp_path / f"processes{n}"
        run_train(compose(["experiment=deepmask_r18_embedded", *TINY, *_data(coco), *same,
                           f"train.output_dir={out}", f"train.num_processes_per_machine={n}"]))
        runs[n] = (_losses(out), load_checkpoint(str(out / "model_final.pth"))["model"])
    (one, w1), (two, w2) = runs[1], runs[2]
    assert one.keys() == two.keys() and {k for v in one.values() for k in v} == {
        "loss_mask", "loss_score"}
    for it, losses in one.items():
        assert two[it] == pytest.approx(losses, rel=1e-4), it
    for key, value in w1.items():
        torch.testing.assert_close(w2[key], value, rtol=1e-4, atol=1e-6, msg=key)
