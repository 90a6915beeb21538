"""The Python API end to end on the real SmolLM2-135M (offline copy): PILoTTrainer to 50% sparsity.

    python scripts/example_pilot_trainer.py [--max_steps 40] [--output_dir outputs/example]

Same run as the CLI demo's, written out: data -> Wanda (x_init) -> PILoTTrainer -> plain sparse model
-> perplexity -> save. The warm start is what works on a CPU budget (docs/BENCHMARKS.md); drop the
`oneshot_prune` line to start PILoT from the dense weights instead.
"""

import argparse

from transformers import default_data_collator

from pilot_hf import PILoTTrainer, PILoTTrainingArguments
from pilot_hf.assets import load_demo_model
from pilot_hf.data import DataArguments, calibration_samples, prepare_lm_datasets
from pilot_hf.evaluation import heldout_perplexity
from pilot_hf.oneshot import oneshot_prune


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--max_steps", type=int, default=40)
    parser.add_argument("--output_dir", default="outputs/example")
    cli = parser.parse_args()

    model, tokenizer = load_demo_model()  # or AutoModelForCausalLM.from_pretrained("HuggingFaceTB/SmolLM2-135M")
    blocks = prepare_lm_datasets(DataArguments(dataset_name="builtin:kjv", block_size=256,
                                               validation_split_percentage=0), tokenizer, model)
    dense = heldout_perplexity(model, tokenizer, ["pydoc"], max_tokens=4096, max_length=512)["pydoc"].perplexity

    # x_init = Wanda's 50% model: pruned entries start at weight 0 (mask sqrt(β)) and may regrow.
    oneshot_prune(model, calibration_samples(tokenizer, "builtin:kjv", 32, 256), method="wanda", sparsity=0.5)
    args = PILoTTrainingArguments(
        output_dir=cli.output_dir, sparsity=0.5, sparsity_pattern="unstructured", method="pilot",
        max_steps=cli.max_steps, recovery_steps=cli.max_steps // 4, per_device_train_batch_size=4,
        learning_rate=1e-4, mask_learning_rate=1e-3, alpha_init=1e-4, alpha_update_interval=4,
        lr_scheduler_type="constant", logging_steps=4, save_strategy="no", report_to="none")
    trainer = PILoTTrainer(model=model, args=args, train_dataset=blocks["train"], processing_class=tokenizer,
                           data_collator=default_data_collator)
    trainer.train()  # wrap -> regularized training -> prune -> recovery -> merge
    sparse = heldout_perplexity(trainer.model, tokenizer, ["pydoc"], max_tokens=4096, max_length=512)["pydoc"].perplexity
    trainer.save_model()  # plain safetensors; loads with AutoModelForCausalLM, no pilot_hf needed
    print(f"sparsity {trainer.sparsity_report['total']['sparsity']:.4f}; held-out pydoc perplexity "
          f"dense {dense:.2f} -> sparse {sparse:.2f}; saved to {cli.output_dir}")


if __name__ == "__main__":
    main()
