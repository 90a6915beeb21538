"""`pilot-hf evaluate`: perplexity (built-in texts, a Hub dataset, a local file) and lm-evaluation-harness tasks
of a model (dense, sparse or compressed), scored in memory."""

from __future__ import annotations

from pathlib import Path

from ..evaluation import EvalArguments, evaluate_model, evaluate_model_tasks
from ..loading import ModelArguments, check_model_source, load_model
from ..runs import write_json
from .arguments import EvaluateArguments
from .report import task_table

HELP = ("Perplexity (built-in texts, --eval_dataset_name, --eval_file) and lm-evaluation-harness tasks (--tasks) "
        "of a model.")
ARGUMENTS = (ModelArguments, EvalArguments, EvaluateArguments)


def run(model_args: ModelArguments, eval_args: EvalArguments, args: EvaluateArguments, argv=()) -> dict:
    out = Path(args.output_file).expanduser() if args.output_file else None
    if out is not None and not out.parent.is_dir():
        raise ValueError(f"--output_file {out}: the folder {out.parent} does not exist; create it or write elsewhere.")
    if out is not None and out.is_dir():
        raise ValueError(f"--output_file {out} is a folder; give a file name (e.g. {out / 'eval.json'}).")
    if out is not None and out.exists():  # it could be the model's own config.json, or anyone's file
        raise ValueError(f"--output_file {out} already exists; pilot-hf evaluate never overwrites a file. Give a new "
                         "file name (or move that file away).")
    check_model_source(model_args)
    eval_args.check_sources()  # the Hub and the harness are checked here, before the model is loaded
    model, tokenizer = load_model(model_args)
    results = evaluate_model(model, tokenizer, eval_args)
    if results:
        print("| text | perplexity | tokens | tokens/s |\n|---|---|---|---|")
        for name, r in results.items():
            print(f"| {name} | {r['perplexity']:.3f} | {r['tokens_scored']} | {r['tokens_per_s']:.0f} |")
    tasks = evaluate_model_tasks(model, tokenizer, eval_args)
    if tasks is not None:
        print(task_table(None, tasks))
        results = {**results, "tasks": tasks}  # beside the texts' results (a text is never named 'tasks')
    if out is not None:
        try:
            write_json(out, results, replace=False)
        except FileExistsError:
            raise ValueError(f"--output_file {out} was created by someone else while the model was evaluated; it was "
                             "left as it is and the results are printed above only.") from None
    return results
