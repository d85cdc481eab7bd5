"""Linear layers with weights laid out ahead for oneDNN: how ``gpt serve`` decodes on the CPU.

A decode step multiplies a few rows (one token of each request in the
batch) by every weight matrix. On the CPU, ``F.linear`` hands that to MKL's
general matrix product, which does poorly with so few rows: for 8 rows of
GPT-2 small's width by its 50,304-token output head it took 8.1 ms on this
project's 2-core machines, against 2.6 ms for one row. oneDNN's inner product
with the weight reordered once into its blocked layout for that number of
rows (what ``torch.compile``'s CPU weight-freezing pass does) took 4.2 ms, and
a whole 8-row decode step of GPT-2 small went from 62 ms to 39 ms. A one-row
step costs what it did (22 ms).

:func:`pack_linears` swaps every ``nn.Linear`` of a model for a
:class:`PackedLinear` holding the reordered weight. It is for inference only
(no gradients), on the CPU, in float32, and the last thing done to a loaded
model: the reordered weights are not parameters, so ``.to()`` and
``state_dict()`` no longer see them. The products are summed in another order
than ``F.linear``'s, so outputs differ from the unpacked model's at float32's
rounding (about 1e-6), like a batched matmul's from an unbatched one.

The two operators are PyTorch's own (``torch.ops.mkldnn``, the ones its
compiler emits), not a public API: where they are missing, or a layer's
packed product does not match ``F.linear`` on a probe, nothing is packed and
the model runs as it was.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

# A packed product may differ from F.linear's by float32 rounding of the sums:
# relative to the largest output, far below this; a wrong layout is far above.
PROBE_TOLERANCE = 1e-4


def can_pack(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether oneDNN's packed linear operators exist for ``device`` and ``dtype``."""
    if device.type != "cpu" or dtype != torch.float32:
        return False
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        torch.ops.mkldnn._reorder_linear_weight  # noqa: B018 - looked up, not called
        torch.ops.mkldnn._linear_pointwise  # noqa: B018
    except (AttributeError, RuntimeError):
        return False
    return True


class PackedLinear(nn.Module):
    """``nn.Linear``'s forward through oneDNN, its weight reordered for ``rows`` rows."""

    def __init__(self, linear: nn.Linear, rows: int) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.rows = rows
        weight = linear.weight.detach()
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, rows)
        self.bias = None if linear.bias is None else linear.bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ weight.T + bias`` for ``x`` of shape (..., in_features)."""
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        """What ``print(model)`` shows of the layer."""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, packed for {self.rows} rows"
        )


def _matches(linear: nn.Linear, packed: PackedLinear) -> bool:
    """Whether ``packed`` computes what ``linear`` does, on a random probe of its rows."""
    # Its own generator: packing a model leaves the global random state alone.
    probe = torch.randn(packed.rows, linear.in_features, generator=torch.Generator().manual_seed(0))
    expected = F.linear(probe, linear.weight, linear.bias)
    error = (packed(probe) - expected).abs().max()
    return bool(error <= PROBE_TOLERANCE * expected.abs().max().clamp(min=1.0))


@torch.no_grad()
def pack_linears(model: nn.Module, rows: int) -> int:
    """Swap every ``nn.Linear`` of ``model`` for a :class:`PackedLinear`; how many were.

    All or nothing: 0 (the model untouched) when the operators are missing,
    the model is not float32 on the CPU, or any layer's probe disagrees.
    Subclasses of ``nn.Linear`` (adapters a plugin adds) are left as they are.
    """
    first = next(model.parameters(), None)
    if first is None or not can_pack(first.device, first.dtype):
        return 0
    swaps = []
    for parent in model.modules():
        for name, child in parent.named_children():
            if type(child) is not nn.Linear or child.weight.dtype != torch.float32:
                continue
            try:
                packed = PackedLinear(child, rows)
            except RuntimeError:
                return 0
            if not _matches(child, packed):
                return 0
            swaps.append((parent, name, packed))
    for parent, name, packed in swaps:
        setattr(parent, name, packed)
    return len(swaps)
