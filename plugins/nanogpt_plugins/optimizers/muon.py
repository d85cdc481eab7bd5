"""The ``muon`` optimizer: ``torch.optim.Muon`` for the block matrices, AdamW for the rest.

The split modded-nanogpt uses, made by parameter name and shape:

- Muon: every 2-D weight inside the transformer blocks (``transformer.h.*``):
  attention and MLP matrices. Muon orthogonalises each matrix's momentum
  (Newton-Schulz), which suits hidden layers only.
- AdamW, with ``[train]``'s betas: the embeddings ``transformer.wte``/``wpe``
  (``embed_lr``; the output head too while it is tied to ``wte``), an untied
  ``lm_head`` (``head_lr``), any other matrix (``train.learning_rate``), all
  three decayed with ``train.weight_decay``; and every 1-D tensor (norm gains,
  biases, QK-norm weights) at ``train.learning_rate`` without decay.

Each group carries its own peak learning rate; the schedule moves them all.
On GPUs with bf16 matrix units (A100, H100) the matrices get
``torch.optim.Muon`` itself; elsewhere, by default, its twin with the
Newton-Schulz iteration in another dtype (``muon_float32.py``): float16 on a
V100 (compute capability 7.x: fp16 tensor cores, no bf16 ones) and float32 on
CPUs, where torch's bf16 iteration is emulated, about twenty times slower on
our CPUs. Every process of a DDP run repeats the iteration for every matrix;
so does every process of an FSDP run, on each matrix gathered whole from its
shards (the rule of distributed Muon implementations: the update is
orthogonalised over the full matrix, never shard by shard).
"""

from __future__ import annotations

from typing import Any

import attrs

from nanogpt_core import PluginError, fraction, hookimpl, non_negative, one_of, option, positive

BLOCKS = "transformer.h."
EMBEDDINGS = ("transformer.wte.", "transformer.wpe.")
HEAD = "lm_head."


@attrs.frozen(kw_only=True)
class MuonOptions:
    """Options of the ``muon`` optimizer: the ``[train.muon]`` table."""

    lr: float = option(
        0.02, "Peak learning rate of the Muon matrices (the schedule moves it).", validator=positive
    )
    momentum: float = option(0.95, "Muon's momentum, in [0, 1).", validator=fraction)
    nesterov: bool = option(True, "Nesterov momentum.")
    weight_decay: float = option(
        0.0, "Decoupled weight decay of the Muon matrices.", validator=non_negative
    )
    ns_steps: int = option(5, "Newton-Schulz iterations per step.", validator=positive)
    adjust_lr_fn: str = option(
        "original",
        'How the lr is scaled by matrix shape: "original" (Keller Jordan\'s, '
        'sqrt(max(1, rows/cols))) or "match_rms_adamw" (Moonshot\'s, 0.2 * sqrt(max(rows, cols))).',
        validator=one_of("original", "match_rms_adamw"),
    )
    ns_dtype: str = option(
        "auto",
        'Dtype of the Newton-Schulz iteration: "bfloat16" (torch.optim.Muon as it is), '
        '"float16" (the same update on fp16 tensor cores: V100s), "float32" (far faster on '
        'CPUs without bf16 matrix units) or "auto" (bfloat16 on GPUs with bf16 units, A100 '
        "and later; float16 on V100s and other GPUs of compute capability 7.x; float32 on "
        "CPUs and older GPUs).",
        validator=one_of("auto", "bfloat16", "float16", "float32"),
    )
    embed_lr: float | None = option(
        None,
        "Peak AdamW learning rate of the embeddings (and a tied head). Default: train.learning_rate.",
        validator=positive,
    )
    head_lr: float | None = option(
        None,
        "Peak AdamW learning rate of an untied lm_head. Default: train.learning_rate.",
        validator=positive,
    )


def split_parameters(model: Any) -> dict[str, list[tuple[str, Any]]]:
    """The trainable parameters by group, as ``(name, parameter)`` in model order.

    Groups: ``muon`` (2-D block weights), ``embed``, ``head``, ``matrices`` (other
    tensors of 2 or more dimensions) and ``vectors`` (1-D and scalars). A tied
    head is the embedding's tensor, which ``named_parameters`` lists once, as
    ``transformer.wte.weight``.
    """
    groups: dict[str, list[tuple[str, Any]]] = {
        "muon": [],
        "embed": [],
        "head": [],
        "matrices": [],
        "vectors": [],
    }
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.dim() < 2:
            groups["vectors"].append((name, param))
        elif param.dim() == 2 and name.startswith(BLOCKS):
            groups["muon"].append((name, param))
        elif name.startswith(EMBEDDINGS):
            groups["embed"].append((name, param))
        elif name.startswith(HEAD):
            groups["head"].append((name, param))
        else:
            groups["matrices"].append((name, param))
    return groups


class Muon:
    """Builds Muon + AdamW as one optimizer (see the module docstring)."""

    def __init__(self, options: MuonOptions) -> None:
        self.options = options

    def build(self, model: Any, train: Any, device_type: str) -> Any:
        """A :class:`CombinedOptimizer` of ``torch.optim.Muon`` and ``torch.optim.AdamW``."""
        import torch

        from nanogpt_plugins.optimizers.combined import CombinedOptimizer

        if not hasattr(torch.optim, "Muon"):
            raise PluginError(
                f'train.optimizer = "muon" needs torch.optim.Muon (torch 2.9 or newer); '
                f"this is torch {torch.__version__}"
            )
        opts = self.options
        groups = split_parameters(model)
        if not groups["muon"]:
            raise PluginError(
                'train.optimizer = "muon": the model has no 2-D weights under transformer.h.'
            )
        muon_options = {
            "lr": opts.lr,
            "weight_decay": opts.weight_decay,
            "momentum": opts.momentum,
            "nesterov": opts.nesterov,
            "ns_steps": opts.ns_steps,
            "adjust_lr_fn": opts.adjust_lr_fn,
        }
        muon_groups = [_group(groups["muon"], opts.lr, opts.weight_decay)]
        ns_dtype = _iteration_dtype(opts.ns_dtype, device_type, groups["muon"][0][1].device)
        # torch.optim.Muon would orthogonalise an FSDP shard piecewise; the twin
        # gathers each whole matrix (in bfloat16 too, where that is the dtype).
        sharded = hasattr(groups["muon"][0][1], "full_tensor")
        if ns_dtype == "bfloat16" and not sharded:
            muon = torch.optim.Muon(muon_groups, **muon_options)
        else:
            from nanogpt_plugins.optimizers.muon_float32 import CastMuon

            muon = CastMuon(muon_groups, ns_dtype=getattr(torch, ns_dtype), **muon_options)
        adamw_groups = [
            _group(groups["embed"], opts.embed_lr or train.learning_rate, train.weight_decay),
            _group(groups["head"], opts.head_lr or train.learning_rate, train.weight_decay),
            _group(groups["matrices"], train.learning_rate, train.weight_decay),
            _group(groups["vectors"], train.learning_rate, 0.0),
        ]
        adamw = torch.optim.AdamW(
            [g for g in adamw_groups if g["params"]],
            lr=train.learning_rate,
            betas=(train.beta1, train.beta2),
            **_fused(device_type),
        )
        return CombinedOptimizer({"muon": muon, "adamw": adamw})


def _iteration_dtype(ns_dtype: str, device_type: str, device: Any = None) -> str:
    """The Newton-Schulz iteration's dtype for ``ns_dtype`` on this device.

    ``auto`` decides by compute capability, not ``torch.cuda.is_bf16_supported()``
    (which answers yes on a V100, emulating bf16): bfloat16, torch's own, where
    there are bf16 matrix units (Ampere, 8.0, and later); float16 on compute
    capability 7.x (Volta, Turing), whose tensor cores take fp16 only; float32 on
    older GPUs, which have none, and off CUDA (CPUs emulate bf16 slowly).

    :param device: the CUDA device the matrices are on (default: the current one).
    """
    if ns_dtype != "auto":
        return ns_dtype
    if device_type != "cuda":
        return "float32"
    import torch

    major, _ = torch.cuda.get_device_capability(
        device if device is not None and device.type == "cuda" else None
    )
    if major >= 8:
        return "bfloat16"
    return "float16" if major == 7 else "float32"


def _fused(device_type: str) -> dict[str, Any]:
    # AdamW's fused CUDA kernel, as the adamw optimizer uses: one launch for all tensors.
    import inspect

    import torch

    fused = device_type == "cuda" and "fused" in inspect.signature(torch.optim.AdamW).parameters
    return {"fused": True} if fused else {}


def _group(named: list[tuple[str, Any]], lr: float, weight_decay: float) -> dict[str, Any]:
    # Named parameters: the names travel in param_groups (and in checkpoints).
    return {"params": named, "lr": lr, "peak_lr": lr, "weight_decay": weight_decay}


@hookimpl
def register_optimizers(register):
    """The built-in ``muon`` optimizer."""
    register(
        "muon",
        Muon,
        options=MuonOptions,
        description="torch.optim.Muon for the block matrices, AdamW for the rest (modded-nanogpt's split).",
    )
