"""Which layers become `mask ⊙ weight`, and how they start (docs/METHOD.md, sections 1-2)."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

import torch

INITS = ("pilot", "spred")
MASK_DTYPES = (None, "float32", "bfloat16", "float16")
# The default target set: every linear layer inside the numbered decoder blocks
# (`model.layers.3.self_attn.q_proj`, `transformer.h.0.mlp.c_fc`, ...), never lm_head or embeddings.
ALL_LINEAR = "all-linear"


@dataclass
class PILoTConfig:
    """How to wrap a causal LM: the target layers and the PILoT initialization.

    `target_modules` follows PEFT's conventions (and uses PEFT's matcher): a list of names matches
    modules whose qualified name equals or ends with `.name`; a single string is a regex that must
    match the whole qualified name; `"all-linear"` (default) takes every `nn.Linear` / `Conv1D`
    inside the decoder blocks.
    """

    target_modules: list[str] | str = field(
        default=ALL_LINEAR,
        metadata={
            "help": "Layers to sparsify: 'all-linear' (every linear layer of the decoder blocks), a list of "
            "module names or suffixes (e.g. ['q_proj', 'v_proj']), or one regex over full module names."
        },
    )
    exclude_modules: list[str] | str | None = field(
        default=None,
        metadata={"help": "Layers never to sparsify, in the same forms as target_modules."},
    )
    beta: float = field(
        default=1.0,
        metadata={
            "help": "PILoT init scale β > 0: mask0² − weight0² = β. Larger β starts further in the L2 "
            "(lazy) regime and lets weights change sign freely. Ignored (0) for init='spred'."
        },
    )
    init: str = field(
        default="pilot",
        metadata={"help": "'pilot' (m0 = sqrt((β + sqrt(β² + 4W²))/2), w0 = W/m0) or 'spred' (balanced, β = 0)."},
    )
    mask_dtype: str | None = field(
        default=None,
        metadata={
            "help": "dtype of the masks; None (default) uses the weight's dtype, which FSDP needs "
            "(one dtype per flat parameter)."
        },
    )
    # Read by PEFT's matcher; kept for its semantics (e.g. layers_to_transform=[0, 1]).
    layers_to_transform: list[int] | int | None = field(
        default=None, metadata={"help": "Only sparsify these decoder block indices (PEFT semantics)."}
    )
    layers_pattern: list[str] | str | None = field(
        default=None, metadata={"help": "Name of the block list for layers_to_transform, e.g. 'layers'."}
    )

    def __post_init__(self):
        if isinstance(self.target_modules, (list, tuple, set)):
            self.target_modules = list(self.target_modules)
            if not self.target_modules or not all(isinstance(t, str) and t for t in self.target_modules):
                raise ValueError(
                    f"target_modules={self.target_modules!r}: give non-empty module names, one regex, "
                    f"or '{ALL_LINEAR}'."
                )
        elif isinstance(self.target_modules, str):
            if self.target_modules != ALL_LINEAR:
                _check_regex(self.target_modules, "target_modules")
        else:
            raise ValueError(f"target_modules must be a list of names or a regex string, got {self.target_modules!r}.")
        if isinstance(self.exclude_modules, str):
            _check_regex(self.exclude_modules, "exclude_modules")
        # PEFT's matcher applies layers_to_transform only to lists of names; with a regex it would be
        # silently ignored (PEFT's own configs reject this combination too).
        if self.layers_to_transform is not None and isinstance(self.target_modules, str) \
                and self.target_modules != ALL_LINEAR:
            raise ValueError("layers_to_transform cannot be combined with a regex target_modules; put the block "
                             "index in the regex (e.g. r'.*\\.layers\\.(0|1)\\..*') or pass a list of names.")
        if self.layers_pattern is not None and self.layers_to_transform is None:
            raise ValueError("layers_pattern only says where layers_to_transform's indices are; set "
                             "layers_to_transform too, or drop layers_pattern.")
        if self.init not in INITS:
            raise ValueError(f"init={self.init!r} is not known; use one of {INITS}.")
        if self.init == "spred":
            self.beta = 0.0
        elif not (isinstance(self.beta, (int, float)) and self.beta > 0 and self.beta < float("inf")):
            raise ValueError(f"beta={self.beta!r}: PILoT init needs a finite β > 0 (the paper uses 1.0); "
                             "for the balanced β = 0 start use init='spred'.")
        if self.mask_dtype not in MASK_DTYPES:
            raise ValueError(f"mask_dtype={self.mask_dtype!r}; use one of {MASK_DTYPES}.")

    # PEFT's matcher reads these two attributes.
    target_parameters = None
    modules_to_save = None

    @property
    def torch_mask_dtype(self) -> torch.dtype | None:
        return None if self.mask_dtype is None else getattr(torch, self.mask_dtype)

    def to_dict(self) -> dict:
        return asdict(self)


def _check_regex(pattern: str, name: str) -> None:
    try:
        re.compile(pattern)
    except re.error as err:
        raise ValueError(f"{name}={pattern!r} is not a valid regex ({err}).") from err
