"""One ``torch.optim.Optimizer`` made of several, each over its own parameters.

The ``muon`` optimizer is ``torch.optim.Muon`` for the block matrices and
``torch.optim.AdamW`` for the rest; Accelerate, ``GradScaler``, gradient clipping
and the trainer's learning-rate assignment each expect *one* optimizer. This
class is that one: its ``param_groups`` are its parts' groups (the same dict
objects, so setting a group's ``lr`` here sets it in the part), ``step`` and
``zero_grad`` run every part, and ``state_dict`` holds every part's, by name.
Imported only when an optimizer is built: it needs torch.
"""

from __future__ import annotations

from collections import ChainMap
from collections.abc import Callable, Mapping
from typing import Any

import torch


class CombinedOptimizer(torch.optim.Optimizer):
    """Several optimizers over disjoint parameters, seen as one.

    :param parts: the optimizers by name (the keys of :meth:`state_dict`), stepped
        in this order.
    """

    def __init__(self, parts: Mapping[str, torch.optim.Optimizer]) -> None:
        self.parts = dict(parts)
        # The parts' own group dicts: add_param_group appends them as they are.
        super().__init__(self._parts_groups(), defaults={})

    def _parts_groups(self) -> list[dict[str, Any]]:
        return [group for part in self.parts.values() for group in part.param_groups]

    @property
    def state(self) -> Mapping[Any, Any]:  # type: ignore[override]
        """Every part's per-parameter state, read-only (each parameter is in one part)."""
        return ChainMap(*(dict(part.state) for part in self.parts.values()))

    @state.setter
    def state(self, _value: Any) -> None:
        # Optimizer.__init__ assigns an empty state; the parts keep their own.
        pass

    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """One step of every part (the closure, if any, is evaluated once)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for part in self.parts.values():
            part.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear the gradients of every part's parameters."""
        for part in self.parts.values():
            part.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        """``{name: part.state_dict()}``: tensors and plain containers only."""
        return {name: part.state_dict() for name, part in self.parts.items()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        """Load every part's state; the parts' new group dicts become this optimizer's."""
        if not isinstance(state_dict, dict) or set(state_dict) != set(self.parts):
            found = sorted(state_dict) if isinstance(state_dict, dict) else type(state_dict)
            raise ValueError(
                f"optimizer state has parts {found}, expected {sorted(self.parts)}; "
                "it was saved by another optimizer"
            )
        for name, part in self.parts.items():
            part.load_state_dict(state_dict[name])
        # torch's load_state_dict replaces each part's group dicts with new ones.
        self.param_groups = self._parts_groups()
