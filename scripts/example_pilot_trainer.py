"""The Python API end to end on the real SmolLM2-135M (offline copy): PILoTTrainer to 50% sparsity.

    python scripts/example_pilot_trainer.py [--max_steps 32] [--output_dir outputs/example]

Same run as the CLI demo's, written out: data -> PILoTTrainer with the default recipe (Wanda warm start, the LM
loss plus distillation from the model as given, a constant lr of 5e-4 x the weights' RMS, the last quarter of the
steps as recovery) -> plain sparse model -> perplexity -> save. `warm_start=None` starts PILoT from the dense weights
instead; `distill_logit_weight=0, distill_feature_weight=0` trains on the LM loss alone, `lm_loss_weight=0` on
distillation alone.
"""

import argparse

from transformers import default_data_collator

from pilot_hf import PILoTTrainer, PILoTTrainingArguments
from pilot_hf.assets import load_demo_model
from pilot_hf.data import DataArguments, prepare_lm_datasets
from pilot_hf.evaluation import heldout_perplexity


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--max_steps", type=int, default=32)
    parser.add_argument("--output_dir", default="outputs/example")
    cli = parser.parse_args()

    model, tokenizer = load_demo_model()  # or AutoModelForCausalLM.from_pretrained("HuggingFaceTB/SmolLM2-135M")
    blocks = prepare_lm_datasets(DataArguments(dataset_name="builtin:kjv", block_size=256,
                                               validation_split_percentage=0), tokenizer, model)
    dense = heldout_perplexity(model, tokenizer, ["pydoc"], max_tokens=4096, max_length=512)["pydoc"].perplexity

    # The defaults are the recipe; x_init = Wanda's 50% model (pruned entries start at weight 0, may regrow),
    # calibrated on training blocks inside the trainer, after the dense teacher was copied.
    args = PILoTTrainingArguments(output_dir=cli.output_dir, sparsity=0.5, max_steps=cli.max_steps)
    trainer = PILoTTrainer(model=model, args=args, train_dataset=blocks["train"], processing_class=tokenizer,
                           data_collator=default_data_collator)
    trainer.train()  # Wanda -> wrap -> regularized LM loss + distillation -> prune -> recovery -> merge
    sparse = heldout_perplexity(trainer.model, tokenizer, ["pydoc"], max_tokens=4096, max_length=512)["pydoc"].perplexity
    trainer.save_model()  # plain safetensors; loads with AutoModelForCausalLM, no pilot_hf needed
    print(f"sparsity {trainer.sparsity_report['total']['sparsity']:.4f}; held-out pydoc perplexity "
          f"dense {dense:.2f} -> sparse {sparse:.2f}; saved to {cli.output_dir}")


if __name__ == "__main__":
    main()
