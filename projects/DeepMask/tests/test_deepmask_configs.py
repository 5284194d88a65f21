"""The project's configs join segkit's groups, compose and build; typos get hints."""
import pytest
from omegaconf import OmegaConf

from segkit.config import compose, project_config_sources
from segkit.engine.defaults import build_model
from segkit.registry import BuildError

BASE = ["~experiment", "train.device=cpu"]


def test_configs_are_on_the_search_path():
    assert ("segkit-deepmask", "pkg://segkit_deepmask.configs") in project_config_sources()


@pytest.mark.parametrize("overrides, names", [
    (["model=deepmask"], ("deepmask.deepmask", "deepmask.resnet_trunk", 50, "deepmask.head_c",
                          "deepmask.mask_head", "deepmask.score_head", None)),
    (["model=sharpmask"], ("deepmask.sharpmask", "deepmask.resnet_trunk", 50, "deepmask.head_c",
                           "deepmask.mask_head", "deepmask.score_head",
                           "deepmask.sharpmask_refinement")),
    (["model=deepmask_vgg"], ("deepmask.deepmask", "deepmask.vgg_a", None, None,
                              "deepmask.nips_mask_head", "deepmask.nips_score_head", None)),
    (["model=sharpmask", "model/backbone=deepmask_resnet18"], (
        "deepmask.sharpmask", "deepmask.resnet_trunk", 18, "deepmask.head_c",
        "deepmask.mask_head", "deepmask.score_head", "deepmask.sharpmask_refinement")),
])
def test_model_options_compose(overrides, names):
    cfg = compose(BASE + overrides)
    m = cfg.model
    got = (m.name, m.backbone.name, OmegaConf.select(m, "backbone.resnet.depth"),
           OmegaConf.select(m, "shared_head.name"), m.mask_head.name, m.score_head.name,
           OmegaConf.select(m, "refinement.name"))
    assert got == names
    if "refinement" in m:
        assert m.label_size == 160 and m.train_refinement_only
    else:
        assert m.label_size in (112, 224) and not m.train_refinement_only


def test_components_swap_by_override():
    cfg = compose(BASE + ["model=deepmask", "model/backbone=deepmask_resnet18",
                          "model.backbone.padding=reflect", "model.shared_head.out_dim=256",
                          "model.mask_head.mask_size=28"])
    model = build_model(cfg)
    assert model.backbone.resnet.stem.conv1.mirror_padding == "reflect"
    assert model.mask_head.fc.in_features == 256 and model.mask_head.mask_size == 28
    assert model.score_head.fc1.in_features == 256


def test_unknown_component_gets_a_did_you_mean():
    cfg = compose(BASE + ["model=sharpmask", "model/backbone=deepmask_resnet18",
                          "model.refinement.name=deepmask.sharpmask_refinment"])
    with pytest.raises(BuildError, match="did you mean 'deepmask.sharpmask_refinement'"):
        build_model(cfg)


def test_unknown_key_gets_a_did_you_mean():
    cfg = compose(BASE + ["model=deepmask", "model/backbone=deepmask_resnet18",
                          "+model.shared_head.hiden_channels=64"])
    with pytest.raises(BuildError) as e:
        build_model(cfg)
    assert ("unknown key 'hiden_channels' at 'model.shared_head' for head 'deepmask.head_c'; "
            "did you mean 'hidden_channels'?") in str(e.value)


def test_config_key_typo_gets_a_did_you_mean():
    with pytest.raises(ValueError, match="did you mean 'model.refinement.upsample'"):
        compose(BASE + ["model=sharpmask", "model.refinement.upsampel=nearest"])


def test_config_option_typo_lists_the_options():
    with pytest.raises(Exception, match="sharpmask"):
        compose(BASE + ["model=sharpmsk"])


def test_project_groups_count_as_config_groups():
    """The core's override hints treat the project's groups as groups, not unknown keys."""
    from segkit.config.compose import is_config_group

    assert is_config_group("model/refinement") and is_config_group("model/shared_head")
    assert not is_config_group("model/refinemnt")
