"""Tiny models for tests and dry runs (seconds on CPU): a byte-level tokenizer built by hand and a tiny Llama
saved as a model folder. The test suite and `scripts/gpu_check.py` both use them; nothing else in pilot_hf
imports this module."""

from __future__ import annotations

PARAGRAPHS = "\n\n".join(f"Paragraph {i}: the quick brown fox jumps over the lazy dog {i % 7} times." for i in range(200))


def byte_tokenizer(bos: bool = True, eos: bool = True):
    """A byte-level tokenizer built by hand (no training): <s>=0, </s>=1, then one token per byte.

    bos=True adds <s> to every encoding like Llama's tokenizer; bos=False behaves like GPT-2's.
    """
    import transformers as T
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    vocab = {"<s>": 0, "</s>": 1, **{c: i + 2 for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    if bos:
        tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return T.PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>" if eos else None)


def save_tiny_llama(root, text: str = PARAGRAPHS, **config):
    """A tiny Llama with the byte-level tokenizer saved as `root/model`, and `text` as `root/train.txt`, for
    tests (and dry runs) that go through a model folder. `config` overrides the LlamaConfig defaults below."""
    import torch
    import transformers as T

    tokenizer = byte_tokenizer()
    torch.manual_seed(0)
    model = T.LlamaForCausalLM(T.LlamaConfig(**{
        "vocab_size": len(tokenizer), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128, "bos_token_id": 0,
        "eos_token_id": 1, **config}))
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    (root / "train.txt").write_text(text)
    return root
