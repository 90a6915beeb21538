"""Load the causal LM to compress: a local folder, a compressed pilot-hf folder, a Hub id, or the offline demo.

Everything that can be checked without reading weights (the path, the Hub being reachable, the config
describing a causal LM) is checked first, so a wrong model fails in a second, not after minutes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from .assets import DEMO_MODEL, is_offline, load_demo_model
from .naming import is_hub_id

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Class-name endings of Transformers' causal-LM heads (LlamaForCausalLM, GPT2LMHeadModel, ...).
_CAUSAL_HEADS = ("ForCausalLM", "LMHeadModel")


@dataclass
class ModelArguments:
    """Which model to compress."""

    model_name_or_path: str | None = field(default=None, metadata={
        "help": f"A local model folder, a Hub id, or '{DEMO_MODEL}' (the offline SmolLM2-135M-Instruct, the "
                "default)."})
    tokenizer_name: str | None = field(default=None, metadata={"help": "Tokenizer, if not the model's."})
    dtype: str = field(default="float32", metadata={
        "help": "Weights dtype to load: float32 (default; use --bf16 for mixed-precision training), bfloat16 or "
                "float16."})
    revision: str = field(default="main", metadata={"help": "Hub revision (branch, tag or commit)."})

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype={self.dtype!r}; use one of {sorted(DTYPES)}.")

    @property
    def name(self) -> str:
        return self.model_name_or_path or DEMO_MODEL


def check_model_source(args: ModelArguments) -> None:
    """Fail fast (ValueError) unless the model can be found and is a causal LM; reads no weights."""
    name = args.name
    if name == DEMO_MODEL:
        from .assets import demo_model_file

        try:
            demo_model_file()
        except FileNotFoundError as err:
            raise ValueError(str(err)) from None
        return
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ValueError(f"{path} is not a model folder (no config.json). Give a folder written by "
                             f"save_pretrained, a Hub id, or '{DEMO_MODEL}'.")
        check_causal_lm(path)
        from .serialization import check_weight_files

        check_weight_files(path)  # cut-off weight files, compressed parts without their config: refused now
        return
    if not is_hub_id(name):  # huggingface_hub's rule: no local path shape passes it
        raise ValueError(f"model path {name!r} does not exist. Give an existing model folder, a Hub id "
                         f"(namespace/name), or '{DEMO_MODEL}'.")
    if is_offline():
        raise ValueError(f"{name!r} is not a local folder and the Hugging Face Hub is offline (HF_HUB_OFFLINE=1). "
                         f"Download it elsewhere and pass its local folder, or use '{DEMO_MODEL}'.")


def check_same_vocabulary(tokenizer, other_path: str, what: str = "the teacher") -> None:
    """ValueError unless the tokenizer saved at `other_path` maps every token to the same id as `tokenizer`
    (distillation compares the two models' distributions id by id: equal vocabulary sizes are not enough).
    A path without a readable tokenizer (or an unreachable Hub id) is not compared."""
    from transformers import AutoTokenizer

    if not hasattr(tokenizer, "get_vocab"):  # no tokenizer given (or a processor): nothing to compare
        return
    try:
        other = AutoTokenizer.from_pretrained(other_path)
    except (OSError, ValueError):
        return
    mine, theirs = tokenizer.get_vocab(), other.get_vocab()
    if mine == theirs:
        return
    differ = sorted(t for t in set(mine) | set(theirs) if mine.get(t) != theirs.get(t))
    examples = ", ".join(f"{t!r}: {mine.get(t)} vs {theirs.get(t)}" for t in differ[:3])
    raise ValueError(f"{what} ({other_path}) uses another vocabulary than the model's tokenizer: {len(differ)} tokens "
                     f"differ (e.g. {examples}; the model's id vs {what}'s), so its token distributions cannot be "
                     "compared id by id. Use a teacher with the same tokenizer (the same model family, e.g. the "
                     "dense model this one was pruned from).")


def check_causal_lm(path: str | Path) -> None:
    """ValueError if the config at `path` describes no causal LM (e.g. a BERT encoder): loading it with
    AutoModelForCausalLM would bolt on a fresh, untrained head and give meaningless perplexities."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError, KeyError) as err:
        raise ValueError(f"cannot read the model config in {path}: {err}") from None
    architectures = list(getattr(config, "architectures", None) or [])
    causal = config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and not getattr(config, "is_encoder_decoder",
                                                                                     False)
    if architectures:
        causal = causal and any(a.endswith(_CAUSAL_HEADS) for a in architectures)
    if not causal:
        what = ", ".join(architectures) or config.model_type
        raise ValueError(f"{path} holds a {what} model, which is not a causal (decoder-only) language model; "
                         "pilot-hf compresses causal LMs (Llama, Qwen, Mistral, GPT-2, ...). Give a model "
                         "saved with AutoModelForCausalLM.")


def load_model(args: ModelArguments):
    """(model, tokenizer) from a local folder, a compressed pilot-hf folder, the Hub, or the demo model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_model_source(args)
    name, dtype = args.name, DTYPES[args.dtype]
    if name == DEMO_MODEL:
        return load_demo_model(dtype)
    path = Path(name).expanduser()
    if path.exists():
        from .serialization import is_compressed, load_compressed

        model = load_compressed(path, dtype=dtype) if is_compressed(path) else \
            AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        return model, AutoTokenizer.from_pretrained(args.tokenizer_name or path)
    try:
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, revision=args.revision)
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer_name or name, revision=args.revision)
    except OSError as err:
        raise ValueError(f"could not load {name!r} from the Hugging Face Hub ({err}). Check the id and your "
                         f"network; offline, pass a local folder or '{DEMO_MODEL}'.") from err
    return model, tokenizer


def base_model_id(args: ModelArguments, model) -> str:
    """The base model's name for cards: the Hub id it came from, else what the user gave."""
    return getattr(model.config, "name_or_path", None) or args.name
