"""Component registries: stable names -> constructors, and ``build()`` from config nodes.

A :class:`Registry` maps explicit snake_case keys (``resnet``, ``fpn``, ``rpn``) to classes or
factory functions. Keys never change once published; a renamed component keeps its old key as
an alias. Projects register under a scope (``deepmask.sharpmask``); a bare name resolves while
it is unique across scopes. On a miss the registry loads the ``segkit.plugins`` entry points
once, so installed projects make their names exist without an import.

``build(node, registry, **runtime)`` turns a config node (a mapping with ``name`` plus
constructor arguments) into an object. Every key is checked against the constructor signature,
so a typo fails with "did you mean". Sub-components are declared per entry with ``children``:
each child node is built first (recursively) and passed in as a built module, so modules never
see config objects.
"""
from __future__ import annotations

import difflib
import inspect
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

__all__ = [
    "Registry", "Child", "build", "BuildError",
    "BACKBONES", "PROPOSAL_GENERATORS", "ROI_HEADS", "HEADS", "LOSSES", "META_ARCHS",
    "DATASETS", "EVALUATORS", "HOOKS", "TRAIN_LOADERS", "ROOT_REGISTRIES", "load_plugins",
]

PLUGIN_GROUP = "segkit.plugins"
_plugins_loaded = False


class BuildError(KeyError):
    """A config node names an unknown component or passes an argument it does not accept."""

    def __str__(self) -> str:  # KeyError quotes its message; show it plainly
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True)
class Child:
    """How to build one sub-component argument of a registered entry.

    Attributes:
        registry: registry the child node's ``name`` is looked up in.
        runtime: optional ``fn(built, kwargs, runtime) -> dict`` giving extra runtime arguments
            for the child from the siblings built before it (``built``, in declaration order),
            the parent's plain keyword arguments and the parent's runtime arguments. This is
            how shapes flow (e.g. the RPN gets ``input_shape`` from the built backbone).
        optional: the child may be ``None`` (e.g. no mask head in Faster R-CNN).
    """

    registry: "Registry"
    runtime: Optional[Callable[[dict, dict, dict], dict]] = None
    optional: bool = False


@dataclass
class _Entry:
    obj: Callable
    key: str
    scope: Optional[str]
    children: Dict[str, Child] = field(default_factory=dict)

    @property
    def full_key(self) -> str:
        return f"{self.scope}.{self.key}" if self.scope else self.key


def load_plugins() -> None:
    """Import every ``segkit.plugins`` entry point once (projects register on import)."""
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    from importlib.metadata import entry_points

    for ep in entry_points(group=PLUGIN_GROUP):
        ep.load()


class Registry:
    """Name -> constructor map with aliases, scopes and "did you mean" errors.

    Example::

        BACKBONES = Registry("backbone")

        @BACKBONES.register("resnet", aliases=("resnet_v1",))
        class ResNet(nn.Module): ...

        BACKBONES.get("resnet")            # -> ResNet
        build({"name": "resnet", "depth": 50}, BACKBONES)
    """

    def __init__(self, name: str):
        self.name = name
        self._entries: Dict[str, _Entry] = {}  # full key (scope.key) -> entry
        self._aliases: Dict[str, str] = {}  # alias full key -> full key

    # ------------------------------------------------------------------ registration
    def register(
        self,
        key: str,
        *,
        aliases: Tuple[str, ...] = (),
        scope: Optional[str] = None,
        children: Optional[Dict[str, Union["Registry", Child]]] = None,
    ) -> Callable:
        """Decorator registering a class or function under ``key`` (and ``aliases``).

        Args:
            key: stable snake_case name.
            aliases: old names that keep resolving to this entry.
            scope: project scope (``"deepmask"``); the entry is reachable as ``scope.key`` and,
                while no other scope uses ``key``, as bare ``key``.
            children: constructor arguments that are sub-components built from nested nodes,
                as ``{arg: registry}`` or ``{arg: Child(registry, runtime=...)}``.
        """
        if not key or not key.replace("_", "").replace(".", "").isalnum() or key != key.lower():
            raise ValueError(f"registry key must be snake_case, got {key!r}")
        kids = {k: (v if isinstance(v, Child) else Child(v)) for k, v in (children or {}).items()}

        def deco(obj: Callable) -> Callable:
            entry = _Entry(obj=obj, key=key, scope=scope, children=kids)
            full = entry.full_key
            if full in self._entries or full in self._aliases:
                existing = self._entries.get(full)
                if existing is not None and _same_object(existing.obj, obj):
                    self._entries[full] = entry  # re-import of the same module
                    return obj
                raise KeyError(f"{self.name} '{full}' is already registered")
            self._entries[full] = entry
            for alias in aliases:
                afull = f"{scope}.{alias}" if scope else alias
                self._aliases[afull] = full
            return obj

        return deco

    # ------------------------------------------------------------------ lookup
    def _resolve(self, name: str) -> Optional[_Entry]:
        if name in self._entries:
            return self._entries[name]
        if name in self._aliases:
            return self._entries[self._aliases[name]]
        # bare name: unique match among scoped entries / aliases
        hits = {full for full in self._entries if full.rsplit(".", 1)[-1] == name}
        hits |= {self._aliases[a] for a in self._aliases if a.rsplit(".", 1)[-1] == name}
        if len(hits) == 1:
            return self._entries[hits.pop()]
        if len(hits) > 1:
            raise BuildError(
                f"{self.name} name '{name}' is ambiguous: {sorted(hits)}; use the scoped name"
            )
        return None

    def entry(self, name: str) -> _Entry:
        found = self._resolve(name)
        if found is None and not _plugins_loaded:
            load_plugins()
            found = self._resolve(name)
        if found is None:
            known = self.keys()
            close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
            hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
            raise BuildError(
                f"unknown {self.name} '{name}'{hint} registered: {', '.join(known) or '(none)'}"
            )
        return found

    def get(self, name: str) -> Callable:
        """The registered class or function for ``name`` (key, alias or scoped key)."""
        return self.entry(name).obj

    def keys(self) -> List[str]:
        """All registered full keys (aliases excluded), sorted."""
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        try:
            return self._resolve(name) is not None
        except BuildError:
            return True

    def __iter__(self):
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.name!r}, {len(self)} entries)"


def _same_object(a: Callable, b: Callable) -> bool:
    return getattr(a, "__module__", None) == getattr(b, "__module__", None) and getattr(
        a, "__qualname__", None
    ) == getattr(b, "__qualname__", None)


def _signature_params(obj: Callable) -> Tuple[List[str], bool]:
    """Names accepted by ``obj``'s constructor/call and whether it takes ``**kwargs``."""
    target = obj.__init__ if inspect.isclass(obj) else obj
    sig = inspect.signature(target)
    names, var_kw = [], False
    for p in sig.parameters.values():
        if p.name == "self":
            continue
        if p.kind is p.VAR_KEYWORD:
            var_kw = True
        elif p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
            names.append(p.name)
    return names, var_kw


def _to_plain(node: Any) -> Any:
    """OmegaConf containers -> plain dict/list (resolving interpolations)."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(node, (DictConfig, ListConfig)):
            return OmegaConf.to_container(node, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf is a hard dependency
        pass
    return node


def build(node: Any, registry: Registry, path: str = "", **runtime: Any) -> Any:
    """Build the component described by ``node`` from ``registry``.

    Args:
        node: mapping (dict or OmegaConf) with ``name`` and constructor arguments. ``None``
            returns ``None``.
        registry: where ``node['name']`` is looked up.
        path: dotted config path of ``node``, used in error messages.
        **runtime: values known only at build time (shapes, ``num_classes``); passed to the
            constructor when its signature accepts them. A config key overrides nothing here:
            the same argument given both ways is an error.

    Raises:
        BuildError: unknown name, unknown argument (with a "did you mean" hint), or missing
            ``name``.
    """
    node = _to_plain(node)
    if node is None:
        return None
    where = f" at '{path}'" if path else ""
    if not isinstance(node, Mapping):
        raise BuildError(f"{registry.name} config{where} must be a mapping with 'name', got {node!r}")
    if "name" not in node:
        raise BuildError(f"{registry.name} config{where} has no 'name' key; keys: {sorted(node)}")
    entry = registry.entry(str(node["name"]))
    accepted, var_kw = _signature_params(entry.obj)
    kwargs = {k: v for k, v in node.items() if k != "name"}
    if not var_kw:
        for key in kwargs:
            if key not in accepted:
                close = difflib.get_close_matches(key, accepted, n=1, cutoff=0.6)
                hint = f"; did you mean '{close[0]}'?" if close else ""
                raise BuildError(
                    f"unknown key '{key}'{where} for {registry.name} '{entry.full_key}'{hint} "
                    f"accepted: {', '.join(accepted)}"
                )
    # sub-components, in declaration order, each seeing the siblings built before it
    built: Dict[str, Any] = {}
    for arg, child in entry.children.items():
        sub = kwargs.get(arg)
        if sub is None:
            if arg in kwargs and not child.optional:
                raise BuildError(f"'{arg}'{where} of {registry.name} '{entry.full_key}' is required")
            if arg in kwargs:
                built[arg] = None
            continue
        extra = child.runtime(built, kwargs, runtime) if child.runtime else {}
        sub_path = f"{path}.{arg}" if path else arg
        if isinstance(sub, Mapping) and "name" in sub:
            built[arg] = build(sub, child.registry, path=sub_path, **extra)
        elif isinstance(sub, list):
            built[arg] = [
                build(s, child.registry, path=f"{sub_path}[{i}]", **extra) for i, s in enumerate(sub)
            ]
        else:
            built[arg] = sub  # already a built object (plain-Python use)
    kwargs.update(built)
    for key, value in runtime.items():
        if key in kwargs and key not in built:
            raise BuildError(
                f"'{key}'{where} is set both in the config and at run time for "
                f"{registry.name} '{entry.full_key}'"
            )
        if var_kw or key in accepted:
            kwargs[key] = value
    try:
        return entry.obj(**kwargs)
    except TypeError as e:
        missing = [
            p.name for p in inspect.signature(
                entry.obj.__init__ if inspect.isclass(entry.obj) else entry.obj
            ).parameters.values()
            if p.default is p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
            and p.name != "self" and p.name not in kwargs
        ]
        if missing:
            raise BuildError(
                f"{registry.name} '{entry.full_key}'{where} is missing required key(s): "
                f"{', '.join(missing)}"
            ) from e
        raise


# Root registries. The set is fixed (DESIGN.md); projects add entries under their scope.
BACKBONES = Registry("backbone")
PROPOSAL_GENERATORS = Registry("proposal_generator")
ROI_HEADS = Registry("roi_heads")
HEADS = Registry("head")
LOSSES = Registry("loss")
META_ARCHS = Registry("meta_arch")
DATASETS = Registry("dataset")
EVALUATORS = Registry("evaluator")
HOOKS = Registry("hook")
# Training-data builders, selected by ``dataloader.name`` (segkit.engine.defaults
# .build_train_loader): ``detection`` (images + instances) is the core's; a project whose model
# trains on other batches (DeepMask's patches) registers its own. Each entry is called as
# ``fn(cfg, records, *, batch_size, rank, world_size, start_iter)`` and returns an iterable of
# batches (see ``build_train_loader`` for the contract).
TRAIN_LOADERS = Registry("train_loader")

ROOT_REGISTRIES = {
    r.name: r
    for r in (BACKBONES, PROPOSAL_GENERATORS, ROI_HEADS, HEADS, LOSSES, META_ARCHS, DATASETS,
              EVALUATORS, HOOKS, TRAIN_LOADERS)
}
