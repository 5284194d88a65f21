"""Registry behaviour: keys, aliases, scopes, entry-point discovery, build() validation."""
import sys
import textwrap

import pytest
from omegaconf import OmegaConf

import segkit.registry as reg
from segkit.registry import BuildError, Child, Registry, build


@pytest.fixture
def parts():
    r = Registry("part")

    @r.register("wheel", aliases=("old_wheel",))
    class Wheel:
        def __init__(self, radius: float = 1.0, spokes: int = 8):
            self.radius, self.spokes = radius, spokes

    @r.register("frame")
    def make_frame(material: str, size: int = 54):
        return ("frame", material, size)

    return r, Wheel


def test_register_get_and_alias(parts):
    r, Wheel = parts
    assert r.get("wheel") is Wheel
    assert r.get("old_wheel") is Wheel
    assert r.keys() == ["frame", "wheel"]
    assert "wheel" in r and "nope" not in r


def test_keys_must_be_snake_case():
    r = Registry("x")
    with pytest.raises(ValueError, match="snake_case"):
        r.register("ResNet")
    with pytest.raises(ValueError, match="snake_case"):
        r.register("res-net")


def test_duplicate_key_rejected(parts):
    r, _ = parts
    with pytest.raises(KeyError, match="already registered"):
        r.register("wheel")(lambda: None)


def test_unknown_name_did_you_mean_and_lists(parts):
    r, _ = parts
    with pytest.raises(BuildError) as e:
        r.get("wheeel")
    msg = str(e.value)
    assert "did you mean 'wheel'" in msg and "registered: frame, wheel" in msg


def test_scopes_bare_name_while_unique():
    r = Registry("head")

    @r.register("mask", scope="deepmask")
    class DMMask:
        pass

    assert r.get("deepmask.mask") is DMMask
    assert r.get("mask") is DMMask  # unique, bare name works

    @r.register("mask", scope="sharpmask")
    class SMMask:
        pass

    with pytest.raises(BuildError, match="ambiguous"):
        r.get("mask")
    assert r.get("sharpmask.mask") is SMMask


def test_build_validates_keys_with_hint(parts):
    r, Wheel = parts
    w = build({"name": "wheel", "radius": 2.0}, r)
    assert isinstance(w, Wheel) and w.radius == 2.0 and w.spokes == 8
    with pytest.raises(BuildError) as e:
        build({"name": "wheel", "radios": 2.0}, r, path="model.wheel")
    msg = str(e.value)
    assert "unknown key 'radios' at 'model.wheel' for part 'wheel'" in msg
    assert "did you mean 'radius'?" in msg and "accepted: radius, spokes" in msg


def test_build_missing_required_and_missing_name(parts):
    r, _ = parts
    with pytest.raises(BuildError, match="missing required key\\(s\\): material"):
        build({"name": "frame"}, r)
    with pytest.raises(BuildError, match="has no 'name' key"):
        build({"material": "steel"}, r)
    assert build({"name": "frame", "material": "steel"}, r) == ("frame", "steel", 54)
    assert build(None, r) is None


def test_build_children_runtime_and_omegaconf():
    parts, bikes = Registry("part"), Registry("bike")

    @parts.register("wheel")
    class Wheel:
        def __init__(self, radius: float, hub_width: int = 0):
            self.radius, self.hub_width = radius, hub_width

    @bikes.register("bike", children={
        "front": parts,
        "rear": Child(parts, runtime=lambda built, kw, rt: {"hub_width": 2 * kw["width"]}),
        "basket": Child(parts, optional=True),
    })
    class Bike:
        def __init__(self, front, rear, width: int, basket=None, colour: str = "red"):
            self.front, self.rear, self.width, self.basket, self.colour = (
                front, rear, width, basket, colour)

    node = OmegaConf.create({"name": "bike", "width": 3, "front": {"name": "wheel", "radius": 1},
                             "rear": {"name": "wheel", "radius": "${..front.radius}"},
                             "basket": None})
    bike = build(node, bikes, colour="blue")
    assert isinstance(bike.front, Wheel) and bike.rear.radius == 1
    assert bike.rear.hub_width == 6 and bike.basket is None and bike.colour == "blue"
    # a typo deep inside a child names the full path
    node.front.radus = 2
    with pytest.raises(BuildError, match="'front' for part 'wheel'; did you mean 'radius'"):
        build(node, bikes)
    # the same argument from the config and at run time is ambiguous
    with pytest.raises(BuildError, match="both in the config and at run time"):
        build({"name": "wheel", "radius": 1.0}, parts, radius=2.0)


def test_entry_point_plugins_loaded_on_first_miss(tmp_path, monkeypatch):
    """A project found through the `segkit.plugins` entry point registers on the first miss."""
    pkg = tmp_path / "fakeproj_segkit"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(textwrap.dedent("""
        from segkit.registry import HEADS
        @HEADS.register("fake_head", scope="fakeproj")
        class FakeHead:
            pass
    """))
    dist = tmp_path / "fakeproj_segkit-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: fakeproj-segkit\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[segkit.plugins]\nfakeproj = fakeproj_segkit\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(reg, "_plugins_loaded", False)
    assert "fakeproj_segkit" not in sys.modules
    assert reg.HEADS.get("fake_head").__name__ == "FakeHead"
    assert reg.HEADS.get("fakeproj.fake_head") is reg.HEADS.get("fake_head")
    assert "fakeproj_segkit" in sys.modules
    # clean up so other tests see the registry as before
    reg.HEADS._entries.pop("fakeproj.fake_head")
    sys.modules.pop("fakeproj_segkit")


def test_root_registries_fixed_set():
    assert set(reg.ROOT_REGISTRIES) == {
        "backbone", "proposal_generator", "roi_heads", "head", "loss", "meta_arch", "dataset",
        "evaluator", "hook", "train_loader"}
