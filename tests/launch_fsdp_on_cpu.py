"""scripts/compress.py with Accelerate's FSDP kept on CPU processes: how the slow tests execute FSDP2 over gloo.

    accelerate launch --config_file configs/accelerate/cpu_fsdp_2proc.yaml tests/launch_fsdp_on_cpu.py ... --use_cpu

Accelerate 1.16 gives CPU processes the MULTI_CPU type and keeps an FSDP plugin only for accelerator types
(accelerate/state.py, AcceleratorState.__init__), so on a machine without GPUs FSDP never starts. torch's
FSDP2 (`fully_shard`) itself runs on CPU over gloo. This launcher turns only that one decision around: a
MULTI_CPU state that was given an FSDP plugin becomes an FSDP state with it; everything after that (the
plugin's settings, `fully_shard`, the optimizer switch to sharded parameters, state dicts) is Accelerate's
and torch's own code. It also prints, per process, what was sharded (the tests read those lines). A test
vehicle, not a way to train: no user needs FSDP on CPU.
"""

import runpy
import sys
from pathlib import Path

from accelerate import state
from accelerate.utils import DistributedType

from pilot_hf.pruning import is_sharded, local_tensor
from pilot_hf.schedule import SparsitySchedule
from pilot_hf.trainer import PILoTTrainer
from pilot_hf.wrapping import masked_layers

_state_init = state.AcceleratorState.__init__
_train_begin, _step_end = PILoTTrainer._on_train_begin, SparsitySchedule.on_step_end


def _state_init_keeping_fsdp_on_cpu(self, *args, fsdp_plugin=None, **kwargs):
    _state_init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
        if fsdp_plugin.fsdp_version != 2:
            raise SystemExit("FSDP on CPU runs as FSDP2 only: FSDP1 stops at \"Inconsistent compute device and "
                             "`device_id`: cpu vs cpu:0\".")
        self.fsdp_plugin = fsdp_plugin
        self.distributed_type = state.PartialState._shared_state["distributed_type"] = DistributedType.FSDP


def _train_begin_reporting(trainer):
    _train_begin(trainer)
    name, layer = next(iter(masked_layers(trainer.model).items()))
    print(f"[fsdp-on-cpu] rank {trainer.args.process_index}: {type(trainer.model).__name__}, {name}.mask "
          f"sharded={is_sharded(layer.mask)} local={tuple(local_tensor(layer.mask).shape)} "
          f"full={tuple(layer.mask.shape)}", flush=True)


def _step_end_reporting(schedule, step):
    pruned = schedule.pruned
    _step_end(schedule, step)
    if schedule.pruned and not pruned:  # recovery follows: these keep-masks are re-applied after every step
        keep = schedule.frozen[0][1]
        print(f"[fsdp-on-cpu] rank {schedule.args.process_index}: step {step} keep-masks "
              f"sharded={all(is_sharded(k) for _, k in schedule.frozen)} first local={tuple(local_tensor(keep).shape)}",
              flush=True)


state.AcceleratorState.__init__ = _state_init_keeping_fsdp_on_cpu
PILoTTrainer._on_train_begin, SparsitySchedule.on_step_end = _train_begin_reporting, _step_end_reporting

if __name__ == "__main__":
    script = Path(__file__).resolve().parents[1] / "scripts" / "compress.py"
    sys.argv[0] = str(script)
    runpy.run_path(str(script), run_name="__main__")
