"""Tiny causal LMs built from configs (seconds on CPU), shared by every test module."""

import pytest
import torch
import transformers as T

VOCAB = 128

TINY_CONFIGS = {
    "llama": lambda: T.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2),
    "mistral": lambda: T.MistralConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2),
    "qwen2": lambda: T.Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2),
    "gpt2": lambda: T.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=128,
                                 bos_token_id=0, eos_token_id=0),
    "opt": lambda: T.OPTConfig(vocab_size=VOCAB, hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                               num_attention_heads=4, word_embed_proj_dim=32, max_position_embeddings=128,
                               bos_token_id=0, eos_token_id=0, pad_token_id=1),
    "phi": lambda: T.PhiConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=4, bos_token_id=0, eos_token_id=0),
    "gemma": lambda: T.GemmaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=1, head_dim=8),
}
ARCHITECTURES = sorted(TINY_CONFIGS)

# The trainer tests' own setting, stated rather than inherited from the defaults (which are the compression
# recipe: a Wanda start, recovery, pure distillation, a constant learning rate): plain training on the LM loss.
PLAIN_TRAINING = dict(warm_start=None, recovery_steps=0, lm_loss_weight=1.0, distill_logit_weight=0.0,
                      distill_feature_weight=0.0, lr_scheduler_type="linear")


def tiny_model(arch: str = "llama", seed: int = 0, dtype=torch.float32):
    """A randomly initialized tiny causal LM of the given architecture, in eval mode."""
    torch.manual_seed(seed)
    model = T.AutoModelForCausalLM.from_config(TINY_CONFIGS[arch]())
    return model.to(dtype).eval()


def tiny_inputs(batch: int = 2, length: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(params=ARCHITECTURES)
def arch(request):
    return request.param


def byte_tokenizer(bos: bool = True, eos: bool = True):
    """A byte-level tokenizer built by hand (no training): <s>=0, </s>=1, then one token per byte.

    bos=True adds <s> to every encoding like Llama's tokenizer; bos=False behaves like GPT-2's.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    vocab = {"<s>": 0, "</s>": 1, **{c: i + 2 for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    if bos:
        tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return T.PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>" if eos else None)


PARAGRAPHS = "\n\n".join(f"Paragraph {i}: the quick brown fox jumps over the lazy dog {i % 7} times." for i in range(200))


def save_tiny_llama(root, text: str = PARAGRAPHS, **config):
    """A tiny Llama with the byte-level tokenizer saved as `root/model`, and `text` as `root/train.txt`, for
    tests (and dry runs) that go through a model folder. `config` overrides the LlamaConfig defaults below."""
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
