"""scripts/compress.py under DeepSpeed on CPU processes: how ZeRO-2 was executed here (by hand; deepspeed is no
dependency of pilot-hf, so no test runs it).

    DS_ACCELERATOR=cpu accelerate launch --config_file configs/accelerate/cpu_zero2_2proc.yaml \\
        tests/launch_deepspeed_on_cpu.py ... --max_grad_norm 0

On a machine without an accelerator, Accelerate 1.16 finds no distributed backend unless `cpu=True`, and with
`cpu=True` (Transformers' --use_cpu) it skips DeepSpeed; each process then believes it is alone and DeepSpeed
stops at "train_batch_size is not equal to micro_batch_per_gpu * gradient_acc_step * world_size 4 != 4 * 1 * 2".
This launcher gives such a DeepSpeed launch the gloo backend (that is all it changes); DeepSpeed's own CPU
accelerator (DS_ACCELERATOR=cpu) does the rest.
"""

import os
import runpy
import sys
from pathlib import Path

from accelerate import state
from accelerate.utils import DistributedType

_prepare_backend = state.PartialState._prepare_backend


def _prepare_backend_gloo_for_deepspeed(self, cpu=False, sagemaker_dp=False, backend=None):
    found, kind = _prepare_backend(self, cpu, sagemaker_dp, backend)
    if (found is None and not cpu and int(os.environ.get("LOCAL_RANK", -1)) != -1
            and os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"):
        return "gloo", DistributedType.MULTI_CPU
    return found, kind


state.PartialState._prepare_backend = _prepare_backend_gloo_for_deepspeed

if __name__ == "__main__":
    script = Path(__file__).resolve().parents[1] / "scripts" / "compress.py"
    sys.argv[0] = str(script)
    runpy.run_path(str(script), run_name="__main__")
