"""`pilot-hf oneshot`: prune with magnitude, Wanda or SparseGPT (no training), evaluate, save."""

from __future__ import annotations

import time
from dataclasses import asdict

from ..data import calibration_samples, check_text_file
from ..evaluation import EvalArguments, evaluate_model, evaluate_model_tasks
from ..hub import card_info_for_run, write_model_card
from ..loading import ModelArguments, base_model_id, check_model_source, load_model
from ..oneshot import OneShotArguments, oneshot_prune
from ..runs import OutputFolder, write_json
from .arguments import OutputArguments
from .report import card_results, card_task_results, run_record, summary_table, task_table

HELP = "One-shot pruning (magnitude, Wanda, SparseGPT), evaluate and save."
ARGUMENTS = (ModelArguments, OneShotArguments, EvalArguments, OutputArguments)


def run(model_args: ModelArguments, os_args: OneShotArguments, eval_args: EvalArguments,
        out_args: OutputArguments, argv: list[str] = ()) -> dict:
    start = time.perf_counter()
    output = OutputFolder(out_args.output_dir, out_args.overwrite_output_dir)
    if os_args.sparsity_pattern == "global" and os_args.method.lower() != "magnitude":  # oneshot_prune's rule, now
        raise ValueError(f"{os_args.method} compares scores within a layer (or row); pattern 'global' is only "
                         "meaningful for magnitude. Use 'unstructured', 'row' or N:M.")
    check_model_source(model_args)
    if os_args.calibrates and os_args.calibration_data().train_file is not None:
        check_text_file(os_args.calibration_dataset, "calibration_dataset")  # named as the user gave it
    os_args.check_sources()
    eval_args.check_sources()
    with output:
        model, tokenizer = load_model(model_args)
        dense = None if eval_args.skip_dense_eval else evaluate_model(model, tokenizer, eval_args)
        dense_tasks = None if eval_args.skip_dense_eval else evaluate_model_tasks(model, tokenizer, eval_args)
        calibration = None
        if os_args.calibrates:
            calibration = calibration_samples(tokenizer, os_args.calibration_data(), os_args.num_calibration_samples,
                                              os_args.calibration_seqlen, seed=os_args.seed)
        report = oneshot_prune(model, calibration, method=os_args.method, sparsity=os_args.sparsity,
                               pattern=os_args.sparsity_pattern)
        model.save_pretrained(output.staging)
        tokenizer.save_pretrained(output.staging)
        sparse = evaluate_model(model, tokenizer, eval_args)
        sparse_tasks = evaluate_model_tasks(model, tokenizer, eval_args)
        metrics = {"dense": dense, "sparse": sparse, "prune_time_s": report.prune_time_s,
                   "elapsed_s": time.perf_counter() - start,
                   **({"tasks": {"dense": dense_tasks, "sparse": sparse_tasks}} if eval_args.tasks else {})}
        record = run_record("oneshot", argv, model=asdict(model_args), eval=asdict(eval_args),
                            settings=os_args.run_settings())
        sparsity_report = {"layers": report.layers, "total": report.total}
        write_json(output.staging / "sparsity_report.json", sparsity_report)
        write_json(output.staging / "metrics.json", metrics)
        write_json(output.staging / "run_config.json", record)
        write_model_card(output.staging, card_info_for_run(
            record["settings"], sparsity_report, base_model=base_model_id(model_args, model),
            results=card_results(dense, sparse), command=record["command"],
            task_results=card_task_results(dense_tasks, sparse_tasks)))
    if sparse_tasks:
        print(task_table(dense_tasks, sparse_tasks))
    print(summary_table(dense, sparse, report.total["sparsity"], output.final, time.perf_counter() - start))
    return metrics
