"""LoRA from scratch: a frozen linear layer plus a trainable low-rank update.

A linear layer computes ``h = W0 x`` with ``W0`` of shape (d_out, d_in). LoRA (Hu et al. 2021)
freezes ``W0`` and learns a low-rank correction:

    h = W0 x + s * B A x,        A: (r, d_in),  B: (d_out, r),  s = alpha / r

``A`` starts random and ``B`` starts at zero, so the adapted layer starts *exactly* equal to the
base layer. Because the update is a matrix, it can be folded into the weight for inference:
``merge()`` sets ``W0 <- W0 + s B A`` and ``unmerge()`` restores the original ``W0`` bit for bit
(we keep a copy: adding and then subtracting in bf16 or fp16 would not give ``W0`` back).

``AdaptedLinear`` holds what every adapter in this package shares (the frozen base, merging,
unmerging, the checks); ``LoRALinear`` is the plain LoRA and ``cgc.CGCLoRALinear`` the mixture.

**Other layouts of a linear layer.** GPT-2 and the models built like it (OpenAI GPT, DistilGPT2
and others written from the GPT-2 code) store their projections as
``transformers.pytorch_utils.Conv1D``: the same map ``h = x W + b``, with the weight kept as
(d_in, d_out), the transpose of ``nn.Linear``'s. Both are adapted alike: ``base_weight`` reads the
frozen weight as (d_out, d_in) whatever the layout (a transposed view for Conv1D), and ``merge``
adds ``dW`` transposed where the layout asks for it. Any other layer type is refused with an error
that names it and the supported ones.
"""

from __future__ import annotations

import math
import sys
from typing import Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

TargetSpec = Union[str, Sequence[str]]
"""Which linear layers of a model to adapt: ``"all-linear"``, a list of names or name suffixes, or
any other string, used as a regular expression that must match a full module name."""

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SUPPORTED_LAYERS = "nn.Linear and transformers' Conv1D (GPT-2 style)"
"""The layer types an adapter can wrap, as messages name them."""


def is_conv1d(module: nn.Module) -> bool:
    """Whether ``module`` is a ``transformers.pytorch_utils.Conv1D`` (weight stored (d_in, d_out)).

    Checked against the real class without importing transformers: if ``transformers.pytorch_utils``
    was never imported, no module can be a Conv1D (importing transformers costs seconds).
    """
    conv1d = getattr(sys.modules.get("transformers.pytorch_utils"), "Conv1D", None)
    return conv1d is not None and isinstance(module, conv1d)


def is_adaptable(module: nn.Module) -> bool:
    """Whether an adapter can wrap ``module``: an ``nn.Linear`` or a transformers ``Conv1D``."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


def layer_shape(module: nn.Module) -> tuple[int, int] | None:
    """``(d_out, d_in)`` of a linear layer in either layout (or of an adapted one); None otherwise."""
    if isinstance(module, AdaptedLinear):
        module = module.base
    if isinstance(module, nn.Linear):
        return module.out_features, module.in_features
    if is_conv1d(module):
        return module.nf, module.nx  # weight (nx, nf) = (d_in, d_out)
    return None


def adapter_dtype(name: str, base: nn.Module) -> torch.dtype:
    """The dtype adapter parameters are created in: a name from ``_DTYPES`` or ``"base"``.

    ``"float32"`` (the default everywhere) keeps fp32 master weights even on a bf16/fp16 base,
    as peft does; ``"base"`` stores them in the base weight's dtype.
    """
    if name == "base":
        return base.weight.dtype
    if name not in _DTYPES:
        raise ValueError(f"adapter_dtype must be one of {sorted(_DTYPES) + ['base']}, got {name!r}")
    return _DTYPES[name]


def init_lora_A(weight: torch.Tensor, method: str) -> None:
    """Initialise a LoRA down-projection ``A`` (rows = rank) in place.

    ``"kaiming"``: as ``nn.Linear`` does (Kaiming uniform, a=sqrt(5): bound 1/sqrt(d_in));
    ``"gaussian"``: normal with std 1/r, as peft's ``init_lora_weights="gaussian"``.
    """
    if method == "kaiming":
        nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
    elif method == "gaussian":
        nn.init.normal_(weight, std=1.0 / weight.shape[0])
    else:
        raise ValueError(f"init must be 'kaiming' or 'gaussian', got {method!r}")


class MergeError(RuntimeError):
    """Raised when merging or unmerging is not possible (already merged, non-finite update...)."""


class AdaptedLinear(nn.Module):
    """A frozen linear layer plus an additive update ``delta_weight(...)`` of the same shape.

    The base is an ``nn.Linear`` (weight (d_out, d_in)) or a transformers ``Conv1D`` (weight
    (d_in, d_out), GPT-2 style); ``base_weight`` reads either as (d_out, d_in). Subclasses
    implement ``delta_weight(*key)`` (fp32, shape (d_out, d_in)) and the unmerged forward. This
    class implements merging: while merged, ``forward`` is just the base layer, whose weight now
    holds ``W0 + delta`` (in the base's own layout).
    """

    def __init__(self, base: nn.Module):
        super().__init__()
        if not is_adaptable(base):
            raise TypeError(
                f"cannot adapt a {type(base).__module__}.{type(base).__name__}: only "
                f"{SUPPORTED_LAYERS} layers can be adapted. Leave this layer out of target_modules "
                "(or exclude it with exclude_modules)."
            )
        base.requires_grad_(False)
        self.base = base
        self.transposed = is_conv1d(base)  # weight stored (d_in, d_out)
        self.merged_key: tuple | None = None  # what was merged (e.g. the task id); None: unmerged
        self._weight_backup: torch.Tensor | None = None

    @property
    def in_features(self) -> int:
        return self.base.nx if self.transposed else self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.nf if self.transposed else self.base.out_features

    @property
    def weight(self) -> torch.Tensor:
        """The base weight as the base layer stores it (so code that reads ``layer.weight`` keeps
        working); ``base_weight`` is the same tensor as (d_out, d_in)."""
        return self.base.weight

    @property
    def base_weight(self) -> torch.Tensor:
        """The frozen weight ``W0`` as (d_out, d_in), whatever the layout: ``nn.Linear``'s own
        weight, or a transposed view of a Conv1D's (d_in, d_out) weight (no copy)."""
        return self.base.weight.T if self.transposed else self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    @property
    def original_weight(self) -> torch.Tensor:
        """The base weight as it was before any merge (in the base's layout): what identifies
        the base model even while a task is merged into it."""
        return self._weight_backup if self.merged else self.base.weight

    @property
    def merged(self) -> bool:
        return self.merged_key is not None

    def delta_weight(self, *key) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    @torch.no_grad()
    def merge(self, *key) -> None:
        """Fold ``delta_weight(*key)`` into the base weight: ``W0 <- W0 + dW`` (added in fp32)."""
        if self.merged:
            raise MergeError(f"already merged ({self.merged_key}); call unmerge() first")
        delta = self.delta_weight(*key)  # (d_out, d_in), fp32
        if not torch.isfinite(delta).all():
            raise MergeError(
                "the adapter update contains NaN or Inf (training diverged?); refusing to merge it "
                "into the base weight. Reload a good checkpoint or lower the learning rate."
            )
        weight = self.base.weight  # (d_out, d_in); Conv1D: (d_in, d_out), so dW goes in transposed
        merged = (weight.float() + (delta.T if self.transposed else delta)).to(weight.dtype)
        if not torch.isfinite(merged).all():
            raise MergeError(
                f"W0 + dW overflows {weight.dtype}; merge in a wider dtype (load the model in "
                "float32) or keep the adapter unmerged."
            )
        self._weight_backup = weight.detach().clone()
        weight.copy_(merged)
        self.merged_key = key

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the base weight exactly as it was before ``merge``."""
        if not self.merged:
            raise MergeError("not merged: nothing to unmerge")
        self.base.weight.copy_(self._weight_backup)
        self._weight_backup = None
        self.merged_key = None

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, merged={self.merged}"


class LoRALinear(AdaptedLinear):
    """``h = W0 x + b + (alpha / r) * B A dropout(x)``: the plain LoRA layer.

    Shapes: x (..., d_in) -> h (..., d_out); A (r, d_in); B (d_out, r).
    """

    def __init__(
        self,
        base: nn.Module,
        rank: int = 8,
        alpha: float = 16.0,
        dropout: float = 0.0,
        init: str = "kaiming",
        dtype: str = "float32",
    ):
        super().__init__(base)
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        self.rank, self.alpha = rank, alpha
        self.scaling = alpha / rank
        kw = dict(device=base.weight.device, dtype=adapter_dtype(dtype, base))
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, **kw))  # (r, d_in)
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, **kw))  # (d_out, r)
        init_lora_A(self.lora_A.data, init)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def delta_weight(self) -> torch.Tensor:
        """``dW = s B A`` in fp32, shape (d_out, d_in)."""
        return self.scaling * (self.lora_B.float() @ self.lora_A.float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.base(x)  # (..., d_out)
        if self.merged:
            return h
        u = F.linear(self.dropout(x).to(self.lora_A.dtype), self.lora_A)  # (..., r)
        return h + (self.scaling * F.linear(u, self.lora_B)).to(h.dtype)  # (..., d_out)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, alpha={self.alpha}"
