"""Tiny causal LMs built from configs (seconds on CPU) and the fixtures shared by every test module. Shared
plain helpers live in tests/helpers.py; test modules never import each other."""

import pytest
import torch
import transformers as T

from pilot_hf.testing import PARAGRAPHS, byte_tokenizer, save_tiny_llama  # noqa: F401  (shared by the tests)

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
# recipe: a Wanda start, recovery, LM loss + distillation, a constant learning rate, HAM when the run prunes): plain
# training on the LM loss with the optimizer's own step.
PLAIN_TRAINING = dict(warm_start=None, recovery_steps=0, lm_loss_weight=1.0, distill_logit_weight=0.0,
                      distill_feature_weight=0.0, lr_scheduler_type="linear", ham=False)


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


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A tiny Llama with a byte-level tokenizer, saved as a model folder, and a local training text (one per
    test module)."""
    return save_tiny_llama(tmp_path_factory.mktemp("cli"))
