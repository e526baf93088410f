"""The one interface every parameter-efficient tuning (PET) method implements.

A method is a config dataclass plus an ``inject`` step that inserts its modules into a network and
says which parameters are tuned. Networks describe themselves through two methods:

* ``frozen_modules()``: the pretrained parts a PET method keeps frozen (backbone blocks and patch
  embedding; position embedding, final norm and decoder stay tuned, as in the paper);
* ``adapter_sites()``: the Transformer blocks after which modules can be inserted, with the
  geometry an inserted module needs (:class:`AdapterSite`).

After :func:`apply_method`, ``model.pet`` (a :class:`PETState`) records the method, its config, the
frozen and inserted parameter-name prefixes, which :mod:`networks.tools.summary` and
:mod:`networks.checkpoint` read.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

from torch import nn

__all__ = ["AdapterSite", "PETMethod", "InsertingMethod", "PETState", "register_method", "get_method", "available_methods",
           "apply_method", "module_names", "freeze_modules"]


@dataclass
class AdapterSite:
    """A block whose output an inserted module may transform.

    Attributes:
        module: the block (a forward hook on it sees its output).
        dim: channels of the block's output.
        stage: index of the feature stage the block belongs to, or None.
        last_in_stage: the block closes its stage (Med-Adapter's inter-stage interaction sits here).
        layout: ``tokens`` (ViT ``(B*D, prefix + h*w, C)``), ``nhwc`` (Swin ``(B*D, h, w, C)``) or
            ``ndhwc`` (native 3D Swin ``(B, d, h, w, C)``).
        depth: slices per volume (2D backbones) or token depth (3D) at this block.
        stage_stride: how much finer the previous stage's grid is: ``(1, 1, 1)`` for ViT,
            ``(1, 2, 2)`` for a 2D Swin read slice by slice, ``(2, 2, 2)`` for a 3D Swin.
    """

    module: nn.Module
    dim: int
    stage: int | None
    last_in_stage: bool
    layout: str
    depth: int | None
    stage_stride: tuple[int, int, int] = (1, 1, 1)


@dataclass
class PETState:
    method: str
    config: dict[str, Any]
    frozen: list[str] = field(default_factory=list)  # module-name prefixes kept frozen
    inserted: list[str] = field(default_factory=list)  # module-name prefixes the method added


class PETMethod(ABC):
    """Base class: subclasses set ``name`` and ``config_class`` and implement :meth:`inject`."""

    name: ClassVar[str]
    config_class: ClassVar[type]
    loads_pretrained: ClassVar[bool] = True  # False for training from scratch
    # frozen blocks may hold bfloat16 weights (networks.efficiency.frozen_blocks); not for a method that merges into them
    bfloat16_frozen_blocks: ClassVar[bool] = True
    # frozen blocks may be run again in the backward pass (networks.efficiency.frozen_blocks); not where the method's hooks
    # inside a block pass state from one hook to the next, which a recomputation would read stale
    recomputable_frozen_blocks: ClassVar[bool] = True

    @abstractmethod
    def inject(self, model: nn.Module, config: Any) -> PETState:
        """Insert the method's modules into ``model`` and set ``requires_grad``; return its state."""


class InsertingMethod(PETMethod):
    """A method that freezes the backbone's pretrained parts and inserts modules of its own.

    Subclasses implement :meth:`insert`, which builds the modules, hooks them into the network and
    returns them; they are kept as ``model.<attribute>`` (default: the method's name), which is how
    summaries and tuned-only checkpoints find them.
    """

    attribute: ClassVar[str | None] = None

    @abstractmethod
    def insert(self, model: nn.Module, config: Any) -> nn.Module:
        """Build the method's modules for ``model``, attach them (hooks) and return them."""

    def inject(self, model: nn.Module, config: Any) -> PETState:
        frozen = freeze_modules(model, model.frozen_modules())
        attribute = self.attribute or self.name
        setattr(model, attribute, self.insert(model, config))
        return PETState(self.name, vars(config).copy(), frozen=frozen, inserted=[attribute])


_METHODS: dict[str, type[PETMethod]] = {}


def register_method(cls: type[PETMethod]) -> type[PETMethod]:
    _METHODS[cls.name] = cls
    return cls


def available_methods() -> list[str]:
    return sorted(_METHODS)


def get_method(name: str) -> PETMethod:
    try:
        return _METHODS[name]()
    except KeyError:
        raise ValueError(f"unknown tuning method '{name}'; choose one of {', '.join(available_methods())}") from None


def apply_method(model: nn.Module, method: str, **options: Any) -> nn.Module:
    """Turn ``model`` into its ``method`` form in place (insert modules, freeze) and return it."""
    if getattr(model, "pet", None) is not None:
        raise RuntimeError(f"a tuning method ({model.pet.method}) was already applied to this model")
    impl = get_method(method)
    defaults = {f.name: f.default for f in dataclasses.fields(impl.config_class)}
    unknown = set(options) - set(defaults)
    if unknown:
        raise ValueError(f"method '{method}' has no option(s) {sorted(unknown)}; it takes {sorted(defaults)}")
    for name, value in options.items():
        _check_option(method, name, value, defaults[name])
    config = impl.config_class(**options)
    model.pet = impl.inject(model, config)
    return model


def _check_option(method: str, name: str, value: Any, default: Any) -> None:
    # Options often arrive from a command line or a config file: a "false" string or a float where a
    # count is meant would otherwise be taken silently (a non-empty string is truthy).
    if isinstance(default, bool):
        ok, expected = isinstance(value, bool), "True or False"
    elif isinstance(default, int):
        ok, expected = isinstance(value, int) and not isinstance(value, bool), "an integer"
    elif isinstance(default, float):
        ok, expected = isinstance(value, (int, float)) and not isinstance(value, bool), "a number"
    elif isinstance(default, tuple):
        ok, expected = isinstance(value, (tuple, list)), "a list"
    else:
        return
    if not ok:
        raise ValueError(f"option '{name}' of method '{method}' must be {expected}, got {value!r}")


def module_names(model: nn.Module, modules: list[nn.Module]) -> list[str]:
    """Qualified names of ``modules`` inside ``model``."""
    by_id = {id(m): name for name, m in model.named_modules()}
    missing = [type(m).__name__ for m in modules if id(m) not in by_id]
    if missing:
        raise ValueError(f"modules not part of the model: {missing}")
    return [by_id[id(m)] for m in modules]


def freeze_modules(model: nn.Module, modules: list[nn.Module]) -> list[str]:
    """Make everything trainable except ``modules``; return their names."""
    for p in model.parameters():
        p.requires_grad_(True)
    for m in modules:
        for p in m.parameters():
            p.requires_grad_(False)
    return module_names(model, modules)
