"""Model parameters as one flat tuple of device arrays, for the executables that take them at every step.

Each call of a compiled executable flattens its arguments on the host. A nested dict is flattened key by key,
its keys sorted at every level, so SDXL's UNet (1,680 arrays under about 500 nested dicts) costs each denoising
step about twice the host time of the same arrays in one tuple (`sdxl-serve bench dispatch` measures both).
`FlatParams` flattens to its tuple in one step; inside a traced function it reads as the dict it was made from
(`params["unet"]`), rebuilt once per trace at no cost to the compiled program.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import jax
from jax.tree_util import PyTreeDef


@jax.tree_util.register_pytree_node_class
@dataclass(frozen=True, eq=False)
class FlatParams(Mapping[str, Any]):
    """A parameter dict's leaves in flattening order, and the structure that puts them back."""

    leaves: tuple[Any, ...]
    treedef: PyTreeDef

    @classmethod
    def of(cls, params: Mapping[str, Any]) -> FlatParams:
        leaves, treedef = jax.tree_util.tree_flatten(dict(params))
        return cls(tuple(leaves), treedef)

    def tree_flatten(self) -> tuple[tuple[Any, ...], PyTreeDef]:
        return self.leaves, self.treedef

    @classmethod
    def tree_unflatten(cls, treedef: PyTreeDef, leaves: Any) -> FlatParams:
        return cls(tuple(leaves), treedef)

    @functools.cached_property
    def _tree(self) -> dict[str, Any]:
        tree: dict[str, Any] = jax.tree_util.tree_unflatten(self.treedef, self.leaves)
        return tree

    def __getitem__(self, key: str) -> Any:
        return self._tree[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._tree)

    def __len__(self) -> int:
        return len(self._tree)
