"""`pilot-hf oneshot`: prune with magnitude, Wanda or SparseGPT (no training), evaluate, save."""

from __future__ import annotations

import time
from dataclasses import asdict

from ..data import calibration_samples, check_text_file
from ..evaluation import EvalArguments
from ..loading import ModelArguments, base_model_id, check_model_source, load_model
from ..oneshot import OneShotArguments, oneshot_prune
from ..runs import OutputFolder
from .arguments import OutputArguments
from .parser import NO_COMMAND_LINE, CommandLine
from .report import finish, scores_before

HELP = "One-shot pruning (magnitude, Wanda, SparseGPT), evaluate and save."
ARGUMENTS = (ModelArguments, OneShotArguments, EvalArguments, OutputArguments)


def run(model_args: ModelArguments, os_args: OneShotArguments, eval_args: EvalArguments,
        out_args: OutputArguments, argv: CommandLine = NO_COMMAND_LINE) -> dict:
    started_at = time.perf_counter()
    output = OutputFolder(out_args.output_dir, out_args.overwrite_output_dir)
    check_model_source(model_args)
    if os_args.calibrates and os_args.calibration_data().train_file is not None:
        check_text_file(os_args.calibration_dataset, "calibration_dataset")  # named as the user gave it
    os_args.check_sources()
    eval_args.check_sources()
    with output:
        model, tokenizer = load_model(model_args)
        dense = scores_before(model, tokenizer, eval_args)
        calibration = None
        if os_args.calibrates:
            calibration = calibration_samples(tokenizer, os_args.calibration_data(), os_args.num_calibration_samples,
                                              os_args.calibration_seqlen, seed=os_args.seed)
        report = oneshot_prune(model, calibration, method=os_args.method, sparsity=os_args.sparsity,
                               pattern=os_args.sparsity_pattern)
        model.save_pretrained(output.staging)
        tokenizer.save_pretrained(output.staging)
        results = finish(output.staging, "oneshot", argv, model, tokenizer, eval_args, started_at=started_at,
                         before=dense, sparsity_report={"layers": report.layers, "total": report.total},
                         settings=os_args.run_settings(), metrics={"prune_time_s": report.prune_time_s},
                         inputs={"model": asdict(model_args), "eval": asdict(eval_args)},
                         card={"base_model": base_model_id(model_args, model)})
    print(results.tables(output.final))
    return results.metrics
