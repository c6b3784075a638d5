"""Containers: ModuleList (children named 0, 1, ...), Sequential (called in order), ModuleDict."""

from __future__ import annotations

from typing import Iterable, Mapping

from .module import Module

__all__ = ["ModuleList", "Sequential", "ModuleDict"]


class ModuleList(Module):
    """A list of modules whose keys are their positions: ``layers.0.linear1.weight``."""

    def __init__(self, modules: Iterable[Module] = ()):
        super().__init__()
        for m in modules:
            self.append(m)

    def append(self, module: Module) -> "ModuleList":
        setattr(self, str(len(self._modules)), module)
        return self

    def __getitem__(self, i: int) -> Module:
        return list(self._modules.values())[i]

    def __len__(self) -> int:
        return len(self._modules)

    def __iter__(self):
        return iter(list(self._modules.values()))


class Sequential(ModuleList):
    """Modules applied one after another, named 0, 1, ... (torch's Sequential)."""

    def __init__(self, *modules: Module):
        super().__init__(modules)

    def forward(self, x):
        for m in self:
            x = m(x)
        return x


class ModuleDict(Module):
    """Modules by name: ``heads.box.weight``."""

    def __init__(self, modules: Mapping[str, Module] | None = None):
        super().__init__()
        for name, m in (modules or {}).items():
            self[name] = m

    def __setitem__(self, name: str, module: Module) -> None:
        setattr(self, name, module)

    def __getitem__(self, name: str) -> Module:
        return self._modules[name]

    def __contains__(self, name: str) -> bool:
        return name in self._modules

    def __len__(self) -> int:
        return len(self._modules)

    def keys(self):
        return self._modules.keys()

    def items(self):
        return self._modules.items()
