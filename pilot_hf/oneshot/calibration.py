"""Block-by-block calibration shared by the one-shot methods (docs/METHOD.md, section 7).

The decoder blocks are processed in sequence. The inputs of block 0 are captured once; then, for
each block, input statistics of its target layers are collected by forward hooks while the (still
dense) block runs on its current inputs, the layers are pruned, and the block is run again with the
pruned weights: its outputs are the inputs of the next block ("inputs propagated through the already
pruned layers", as SparseGPT and Wanda do). Only one block's activations exist at a time.

Nothing here knows an architecture: the block list is the nn.ModuleList that holds the most
parameters, and every block is called with exactly the positional and keyword arguments the model
itself gave it (attention masks, rotary `position_embeddings`, per-layer sliding-window masks, ...),
recorded by forward pre-hooks, with the cache disabled.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn


class _StopForward(Exception):
    """Raised by a pre-hook to end a forward pass once the inputs it needs are recorded."""


def find_decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(qualified name, module list) of the model's decoder blocks: the nn.ModuleList holding the most
    parameters (`model.layers` for Llama, `transformer.h` for GPT-2, `model.decoder.layers` for OPT)."""
    best, best_size = None, 0
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            size = sum(p.numel() for p in module.parameters())
            if size > best_size:
                best, best_size = (name, module), size
    if best is None:
        raise ValueError(f"{type(model).__name__} has no nn.ModuleList of decoder blocks with parameters; "
                         "one-shot calibration runs the model block by block and needs one.")
    return best


def blocks_of_layers(model: nn.Module, layers: dict[str, nn.Module]) -> tuple[nn.ModuleList, list[dict[str, nn.Module]]]:
    """The decoder blocks and, for each block, the given layers inside it (in module order).

    Raises ValueError if a layer is outside every block (e.g. lm_head): block-wise calibration can only
    prune what the blocks compute.
    """
    prefix, blocks = find_decoder_blocks(model)
    per_block: list[dict[str, nn.Module]] = [{} for _ in blocks]
    owner = {}
    for index, block in enumerate(blocks):
        for sub in block.modules():
            owner[id(sub)] = index
    outside = []
    for name, layer in layers.items():
        if id(layer) in owner:
            per_block[owner[id(layer)]][name] = layer
        else:
            outside.append(name)
    if outside:
        raise ValueError(f"one-shot calibration prunes layers inside the decoder blocks ({prefix or 'root'}.N), but "
                         f"{outside} are outside them; exclude them (PILoTConfig.exclude_modules) or prune them "
                         "with magnitude_prune.")
    return blocks, per_block


@dataclass
class BlockCall:
    """The arguments one block received for one calibration batch (hidden states are args[0])."""

    args: tuple
    kwargs: dict

    def with_hidden(self, hidden: torch.Tensor) -> tuple[tuple, dict]:
        if self.args:
            return (hidden,) + self.args[1:], self.kwargs
        return (), {**self.kwargs, "hidden_states": hidden}

    @property
    def hidden(self) -> torch.Tensor:
        return self.args[0] if self.args else self.kwargs["hidden_states"]

    def without_hidden(self) -> BlockCall:
        if self.args:
            return BlockCall((None,) + self.args[1:], self.kwargs)
        return BlockCall((), {**self.kwargs, "hidden_states": None})


def _same(a, b) -> bool:
    if a is b:
        return True
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape == b.shape and a.dtype == b.dtype and bool(torch.equal(a, b))
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 -- objects without a usable == are treated as different
        return False


def _same_call(a: BlockCall, b: BlockCall) -> bool:
    return len(a.args) == len(b.args) and _same(a.args[1:], b.args[1:]) and _same(
        {k: v for k, v in a.kwargs.items() if k != "hidden_states"},
        {k: v for k, v in b.kwargs.items() if k != "hidden_states"})


def _model_inputs(model: nn.Module, ids: torch.Tensor) -> dict:
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "use_cache": False}


@torch.no_grad()
def capture_block_calls(model: nn.Module, blocks: nn.ModuleList, batches: list[torch.Tensor]
                        ) -> tuple[list[torch.Tensor], list[list[BlockCall]]]:
    """Hidden states entering block 0 for each batch, and the call of every block for every batch.

    The first batch runs the whole (dense) model to record what each block receives. If every block
    received the same extra arguments as block 0 (the usual case: one mask, one rotary embedding), the
    other batches stop at block 0; otherwise (e.g. Gemma-2's alternating sliding-window masks) they
    run through to record each block's own arguments.
    """
    recorded: dict[int, BlockCall] = {}
    entering: dict[int, torch.Tensor] = {}
    stop_at: list[int | None] = [None]

    def make_hook(index):
        def hook(module, args, kwargs):
            call = BlockCall(tuple(args), dict(kwargs))
            entering[index] = call.hidden
            # Keep the arguments without the hidden states (replaced on every call; saves memory).
            recorded[index] = call.without_hidden()
            if stop_at[0] == index:
                raise _StopForward
        return hook

    handles = [block.register_forward_pre_hook(make_hook(i), with_kwargs=True) for i, block in enumerate(blocks)]
    hidden, calls = [], [[] for _ in blocks]
    shared = None
    try:
        for b, ids in enumerate(batches):
            recorded.clear()
            entering.clear()
            # Stop once the last needed block has been entered: block 0 when all blocks share their arguments.
            stop_at[0] = 0 if shared else len(blocks) - 1
            try:
                model(**_model_inputs(model, ids))
            except _StopForward:
                pass
            if len(recorded) < (1 if shared else len(blocks)):
                raise RuntimeError(f"the forward pass of {type(model).__name__} did not call all of its "
                                   f"{len(blocks)} decoder blocks (called {sorted(recorded)}).")
            if b == 0:
                shared = all(_same_call(recorded[0], recorded[i]) for i in range(1, len(blocks)))
            hidden.append(entering[0])
            for i in range(len(blocks)):
                calls[i].append(recorded[0] if shared else recorded[i])
    finally:
        for handle in handles:
            handle.remove()
    return hidden, calls


def _block_output(output) -> torch.Tensor:
    # Transformers 5 blocks return the hidden states; older ones (and some remote code) return a tuple.
    return output[0] if isinstance(output, (tuple, list)) else output


@torch.no_grad()
def run_block(block: nn.Module, hidden: list[torch.Tensor], calls: list[BlockCall]) -> list[torch.Tensor]:
    """The block's outputs for every batch, called exactly as the model calls it."""
    outputs = []
    for h, call in zip(hidden, calls):
        args, kwargs = call.with_hidden(h)
        outputs.append(_block_output(block(*args, **kwargs)))
    return outputs


class InputStatistic:
    """Accumulates a statistic of a linear layer's inputs (rows of X, one per token)."""

    def update(self, x: torch.Tensor) -> None:  # x: (tokens, in_features)
        raise NotImplementedError


def collect_input_statistics(layers: dict[str, nn.Module], new_statistic: Callable[[nn.Module], InputStatistic],
                             run: Callable[[], object]) -> dict[str, InputStatistic]:
    """Hook every layer, call `run()` (which runs the block on the calibration batches), unhook."""
    stats = {name: new_statistic(layer) for name, layer in layers.items()}

    def make_hook(stat):
        def hook(module, args, output):
            x = args[0]
            stat.update(x.detach().reshape(-1, x.shape[-1]))
        return hook

    handles = [layer.register_forward_hook(make_hook(stats[name])) for name, layer in layers.items()]
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
    return stats


def calibration_batches(calibration_ids: torch.Tensor, batch_size: int, device: torch.device) -> list[torch.Tensor]:
    if not isinstance(calibration_ids, torch.Tensor) or calibration_ids.dim() != 2 or calibration_ids.dtype not in (
            torch.long, torch.int, torch.int32):
        got = (f"{type(calibration_ids).__name__} of shape {tuple(calibration_ids.shape)} and dtype "
               f"{calibration_ids.dtype}" if isinstance(calibration_ids, torch.Tensor) else repr(calibration_ids))
        raise ValueError(f"calibration_ids must be an integer tensor of token ids of shape (num_samples, seqlen); "
                         f"got {got}.")
    if calibration_ids.numel() == 0:
        raise ValueError("calibration_ids is empty; give at least one sample of token ids.")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: give a positive number of samples per forward pass.")
    ids = calibration_ids.long().to(device)
    return list(ids.split(batch_size))


def sequential_blocks(model: nn.Module, layers: dict[str, nn.Module], calibration_ids: torch.Tensor,
                      batch_size: int = 8, recompute: bool = True
                      ) -> Iterator[tuple[int, dict[str, nn.Module], Callable]]:
    """Walk the decoder blocks in order, inputs propagated through the already pruned blocks.

    Yields (block index, the block's target layers, collect) where `collect(new_statistic)` runs the block
    on its current inputs and returns the statistics of its target layers. After the consumer has pruned
    the block and resumes the generator, the block is run again with the pruned weights and its outputs
    become the next block's inputs. With `recompute=False` (a read-only pass, e.g. OWL's statistics of
    the dense model) the outputs of the collecting run are passed on instead. Blocks without target
    layers are just run.
    """
    blocks, per_block = blocks_of_layers(model, layers)
    device = next(model.parameters()).device
    batches = calibration_batches(calibration_ids, batch_size, device)
    hidden, calls = capture_block_calls(model, blocks, batches)
    for index, block in enumerate(blocks):
        targets = per_block[index]
        outputs: list = []
        if targets:
            def collect(new_statistic, block=block, targets=targets, calls=calls[index], hidden=hidden,
                        outputs=outputs):
                def run():
                    outputs[:] = run_block(block, hidden, calls)
                return collect_input_statistics(targets, new_statistic, run)
            yield index, targets, collect
        if recompute or not outputs:
            outputs = run_block(block, hidden, calls[index])
        hidden = outputs
