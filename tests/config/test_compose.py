"""Config tree: composition, the override grammar, typo hints, project search path, and a
build of every experiment config."""
import sys
import textwrap

import pytest
import torch
from omegaconf import OmegaConf

from segkit.config import compose, list_experiments, project_config_sources

CORE_EXPERIMENTS = {
    "mask_rcnn_r18_fpn_embedded", "mask_rcnn_r50_fpn_1x_coco", "mask_rcnn_r101_fpn_1x_coco",
    "faster_rcnn_r50_fpn_1x_coco", "mask_rcnn_r50_fpn_torchvision",
    "faster_rcnn_r50_fpn_torchvision", "retinanet_r50_fpn_1x_coco", "retinanet_r18_fpn_embedded",
    "retinanet_r50_fpn_torchvision", "rpn_r50_fpn_1x_coco", "rpn_r18_fpn_embedded",
    "mask_rcnn_r50_fpn_3x_detectron2", "mask_rcnn_r101_fpn_3x_detectron2",
    "faster_rcnn_r50_fpn_3x_detectron2", "retinanet_r50_fpn_3x_detectron2",
}


def test_default_is_the_main_job():
    cfg = compose()
    assert cfg.experiment == "mask_rcnn_r18_fpn_embedded"
    assert cfg.model.name == "two_stage" and cfg.dataset.train.name == "embedded"
    assert cfg.train.output_dir == "output/mask_rcnn_r18_fpn_embedded"
    assert CORE_EXPERIMENTS <= set(list_experiments())


def test_override_grammar_swap_set_add():
    cfg = compose([
        "experiment=mask_rcnn_r50_fpn_1x_coco",
        "model/backbone=resnet101_fpn",  # swap a component
        "model.backbone.bottom_up.freeze_at=0",  # set a value
        "+model.roi_heads.box_head.extra=1",  # add a key
    ])
    assert cfg.model.backbone.bottom_up.depth == 101
    assert cfg.model.backbone.bottom_up.freeze_at == 0
    assert cfg.model.roi_heads.box_head.extra == 1


def test_num_classes_has_one_source():
    cfg = compose(["dataset.num_classes=7"])
    assert cfg.model.roi_heads.num_classes == 7


def test_typo_in_key_suggests():
    with pytest.raises(ValueError) as e:
        compose(["solver.bse_lr=0.1"])
    assert "did you mean 'solver.base_lr'" in str(e.value)


def test_typo_in_group_lists_options():
    with pytest.raises(Exception) as e:
        compose(["model/backbone=resnet5_fpn"])
    assert "resnet50_fpn" in str(e.value)


def test_coco_format_dataset_from_command_line_only():
    cfg = compose(["dataset=coco_format", "dataset.train.json=a.json",
                   "dataset.train.images=imgs", "dataset.val.json=b.json",
                   "dataset.val.images=vimgs"])
    assert OmegaConf.to_container(cfg.dataset.train) == {
        "name": "coco_json", "json": "a.json", "images": "imgs"}
    assert cfg.dataset.val.json == "b.json"


def test_project_configs_join_core_groups(tmp_path, monkeypatch):
    """An installed project's `configs` package adds options to the core groups."""
    pkg = tmp_path / "fakeproj_cfg"
    (pkg / "configs" / "model" / "proposal_generator").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "configs" / "__init__.py").write_text("")
    (pkg / "configs" / "model" / "proposal_generator" / "fake_rpn.yaml").write_text(
        textwrap.dedent("""
        name: rpn
        in_features: [p2]
        nms_thresh: 0.5
        """))
    dist = tmp_path / "fakeproj_cfg-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: fakeproj-cfg\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[segkit.plugins]\nfakecfg = fakeproj_cfg\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert ("segkit-fakecfg", "pkg://fakeproj_cfg.configs") in project_config_sources()
    cfg = compose(["model/proposal_generator=fake_rpn"])
    assert cfg.model.proposal_generator.nms_thresh == 0.5
    sys.modules.pop("fakeproj_cfg", None)
    sys.modules.pop("fakeproj_cfg.configs", None)


@pytest.mark.parametrize("experiment", sorted(CORE_EXPERIMENTS))
def test_every_experiment_composes_and_builds(experiment):
    from segkit.engine.defaults import build_model

    cfg = compose([f"experiment={experiment}", "train.device=cpu"])
    if cfg.dataset.num_classes is None and OmegaConf.select(cfg, "model.roi_heads.num_classes") is None:
        cfg.dataset.num_classes = 3  # normally filled from the dataset's metadata
    with torch.no_grad():
        model = build_model(cfg)
    assert sum(p.numel() for p in model.parameters()) > 0
    model.eval()
    h, w = 96, 128
    with torch.no_grad():
        out = model([{"image": torch.randint(0, 255, (3, h, w), dtype=torch.uint8)}])
    assert out[0]["instances"].image_size == (h, w)


def test_unknown_component_and_key_fail_at_build_with_hints():
    from segkit.engine.defaults import build_model
    from segkit.registry import BuildError

    cfg = compose(["model.backbone.bottom_up.name=resnt", "dataset.num_classes=3"])
    with pytest.raises(BuildError) as e:
        build_model(cfg)
    assert "unknown backbone 'resnt'; did you mean 'resnet'?" in str(e.value)
    cfg = compose(["+model.backbone.bottom_up.dpth=3", "dataset.num_classes=3"])
    with pytest.raises(BuildError) as e:
        build_model(cfg)
    msg = str(e.value)
    assert "unknown key 'dpth' at 'model.backbone.bottom_up' for backbone 'resnet'" in msg
    assert "did you mean 'depth'?" in msg


def test_no_typo_hint_for_valid_overrides():
    """The hint runs after any failed command-line run; valid keys (also those a group
    override brings in, and hydra.*) must not be reported as unknown."""
    from segkit.config.compose import _override_hint

    assert _override_hint(["dataset=coco_format", "dataset.train.json=a.json",
                           "hydra.run.dir=/tmp/x", "solver.base_lr=0.1"], "config") is None
    assert "did you mean 'dataset.train.json'" in _override_hint(
        ["dataset=coco_format", "dataset.train.jsn=a.json"], "config")


@pytest.mark.parametrize("preset,target", [("slurm", "SlurmLauncher"), ("local", "LocalLauncher")])
def test_launcher_presets_compose_with_submitit(preset, target):
    """configs/hydra/launcher presets extend hydra-submitit-launcher's configs: one task per
    GPU on SLURM, and requeues enabled (a requeued job resumes, tests/engine)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    try:
        with initialize_config_module("segkit.configs", version_base=None):
            cfg = hydra_compose("config", overrides=[f"hydra/launcher={preset}",
                                                     "hydra.launcher.gpus_per_node=4"],
                                return_hydra_config=True)
    finally:
        GlobalHydra.instance().clear()
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith(f"submitit_launcher.{target}")
    assert launcher.tasks_per_node == (4 if preset == "slurm" else 1)
    if preset == "slurm":
        assert launcher.max_num_timeout > 0 and launcher.signal_delay_s > 0
