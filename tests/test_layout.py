"""The package's layout: layering of the modules and one method vocabulary.

Levels (lowest first); a module may import only from its own level or lower, never from the package root,
and nothing outside `pilot_hf.commands` (and `python -m pilot_hf`) imports the command line. Modules of one
level never import each other in a circle (counting imports inside functions). Numeric invariants are in
test_invariants.py, packaging in test_packaging.py.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO, package_modules

from pilot_hf import methods
from pilot_hf.oneshot import METHODS as ONESHOT_CONFIGS
from pilot_hf.oneshot import OneShotArguments
from pilot_hf.sweep import SweepArguments
from pilot_hf.training_args import _METHOD_DEFAULTS, PILoTTrainingArguments

# First path component under pilot_hf -> level. Packages (oneshot, commands) take their modules with them.
LEVELS = {
    # L0 core
    "config": 0, "layers": 0, "pruning": 0, "methods": 0, "regularization": 0, "optim": 0, "assets": 0, "ham": 0,
    "version": 0,  # the package version's one home (pyproject.toml reads it; the card and run records import it)
    "naming": 0,  # what a Hub id is, and token redaction
    "testing": 0,  # tiny models for the tests and gpu_check's dry run; no library module imports it
    # L1
    "wrapping": 1, "data": 1, "evaluation": 1, "distillation": 1, "harness": 1,
    "runs": 1,  # the output protocol and checkpoint bookkeeping: below serialization and the trainer, which use it
    "metrics": 1,  # the `evaluate` metric script (metrics/perplexity/perplexity.py) wraps evaluation.perplexity
    "sparse_format": 1,  # the pilot_sparse format, which serialization and _transformers_sparse both use
    # L2
    "oneshot": 2, "serialization": 2, "hub": 2, "card": 2, "loading": 2, "lora": 2, "patterns": 2,
    "_transformers_sparse": 2,  # the format's Transformers plug-in; serialization registers it (no circle)
    # L3
    "training_args": 3, "schedule": 3, "trainer": 3,
    # L4
    "sweep": 4,
    # L5: the command line
    "commands": 5, "__main__": 5,
}
COMMAND_LINE = {"commands", "__main__"}


MODULES = package_modules()


def _is_package(name: str) -> bool:
    return MODULES.get(name, Path()).name == "__init__.py"


def imported_modules(name: str, path: Path) -> list[tuple[str, int]]:
    """Every pilot_hf module `name` imports (top level and inside functions), as (dotted name, line)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    package = name if _is_package(name) else name.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names if alias.name.split(".")[0] == "pilot_hf"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if module.split(".")[0] != "pilot_hf":
                continue
            for alias in node.names:  # `from . import x` imports the module pilot_hf.x when there is one
                sub = f"{module}.{alias.name}"
                found.append((sub if sub in MODULES else module, node.lineno))
    return list(dict.fromkeys(found))


def level_of(module: str) -> int | None:
    parts = module.split(".")
    if len(parts) == 1:
        return None  # the package root (re-exports; exempt)
    if parts[1] not in LEVELS:
        raise AssertionError(f"{module} has no level in tests/test_layout.py LEVELS; add it.")
    return LEVELS[parts[1]]


def test_every_module_has_a_level():
    top = {name.split(".")[1] for name in MODULES if "." in name}
    assert top <= set(LEVELS), f"modules without a level: {sorted(top - set(LEVELS))}"


def test_imports_only_go_down_and_only_the_command_line_imports_commands():
    violations = []
    for name, path in MODULES.items():
        if name == "pilot_hf":
            continue  # __init__ re-exports the public API
        own = level_of(name)
        in_cli = name.split(".")[1] in COMMAND_LINE
        for target, line in imported_modules(name, path):
            where = f"{path.relative_to(REPO)}:{line}"
            if target == "pilot_hf":  # the package root imports everything: the version has its own module
                violations.append(f"{where}: {name} imports the package root (all of it)")
                continue
            if target.split(".")[1] == "commands" and not in_cli:
                violations.append(f"{where}: {name} imports the command line ({target})")
            elif level_of(target) > own:
                violations.append(f"{where}: {name} (L{own}) imports {target} (L{level_of(target)})")
    assert not violations, "layering violations:\n" + "\n".join(violations)


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The circles of an import graph (module -> the modules it imports): its strongly connected components of
    more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def test_no_import_circle_even_within_a_level():
    """Levels only forbid imports upwards; within one level modules must not import each other in a circle
    either (top-level or inside functions), e.g. serialization <-> its Transformers plug-in."""
    graph = {name: {t for t, _ in imported_modules(name, path) if t != "pilot_hf" and t != name}
             for name, path in MODULES.items() if name != "pilot_hf"}
    cycles = import_cycles(graph)
    assert not cycles, "import circles:\n" + "\n".join(" <-> ".join(c) for c in cycles)
    # and the check does see one
    assert import_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert import_cycles({"a": {"b"}, "b": set()}) == []


def test_the_import_scan_sees_relative_absolute_and_function_level_imports():
    loading_imports = {t for t, _ in imported_modules("pilot_hf.loading", MODULES["pilot_hf.loading"])}
    assert {"pilot_hf.assets", "pilot_hf.serialization"} <= loading_imports  # serialization: in a function
    sweep_imports = {t for t, _ in imported_modules("pilot_hf.sweep", MODULES["pilot_hf.sweep"])}
    assert {"pilot_hf.trainer", "pilot_hf.oneshot", "pilot_hf.runs"} <= sweep_imports  # trainer: in a function
    prune_imports = {t for t, _ in imported_modules("pilot_hf.oneshot.prune", MODULES["pilot_hf.oneshot.prune"])}
    assert {"pilot_hf.data", "pilot_hf.wrapping", "pilot_hf.oneshot.calibration"} <= prune_imports
    metric = [m for m in MODULES if m.startswith("pilot_hf.metrics")]
    assert metric and any(t == "pilot_hf.evaluation" for t, _ in imported_modules(metric[0], MODULES[metric[0]]))


def _io_calls(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            if isinstance(f, ast.Name) and f.id in ("print", "exit", "quit"):
                found.append(f"{path.relative_to(REPO)}:{node.lineno}: {f.id}(")
            elif isinstance(f, ast.Attribute) and f.attr in ("exit", "_exit") and isinstance(f.value, ast.Name) \
                    and f.value.id in ("sys", "os"):
                found.append(f"{path.relative_to(REPO)}:{node.lineno}: {f.value.id}.{f.attr}(")
        elif isinstance(node, ast.Attribute) and node.attr == "argv" and isinstance(node.value, ast.Name) \
                and node.value.id == "sys":
            found.append(f"{path.relative_to(REPO)}:{node.lineno}: sys.argv")
        elif isinstance(node, ast.ImportFrom) and node.module == "sys":
            found += [f"{path.relative_to(REPO)}:{node.lineno}: from sys import {a.name}" for a in node.names
                      if a.name in ("argv", "exit")]
    return found


def test_library_modules_do_not_print_exit_or_read_argv():
    found = []
    for name, path in MODULES.items():
        if name != "pilot_hf" and name.split(".")[1] in COMMAND_LINE:
            continue
        found += _io_calls(path)
    assert not found, "the library must return values and raise, not print/exit/read argv:\n" + "\n".join(found)
    # and the scan does see them where they belong
    assert _io_calls(MODULES["pilot_hf.__main__"]) and _io_calls(MODULES["pilot_hf.commands"])


def test_import_pilot_hf_does_not_import_the_command_line():
    code = ("import sys, pilot_hf; bad = sorted(m for m in sys.modules if m == 'pilot_hf.commands' "
            "or m.startswith('pilot_hf.commands.') or m == 'pilot_hf.__main__'); print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300,
                         env={**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"


# ----- one vocabulary -------------------------------------------------------------------------------------

def _accepted(make, names) -> set[str]:
    accepted = set()
    for name in names:
        try:
            make(name)
        except ValueError:
            continue
        accepted.add(name)
    return accepted


def test_one_method_vocabulary(tmp_path):
    every = {methods.DENSE, *methods.ONESHOT_METHODS, *methods.TRAINED_METHODS, "bogus", "pilot+wanda", "Dense"}

    def training(**kw):
        return PILoTTrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], **kw)

    assert _accepted(lambda m: training(method=m), every) == set(methods.TRAINED_METHODS)
    assert set(_METHOD_DEFAULTS) == set(methods.TRAINED_METHODS)
    assert _accepted(lambda m: training(warm_start=m), every) == set(methods.WARM_STARTS)
    assert set(methods.WARM_STARTS) == set(methods.ONESHOT_METHODS)
    assert set(methods.CALIBRATED_METHODS) <= set(methods.ONESHOT_METHODS)
    # one-shot pruning
    assert set(ONESHOT_CONFIGS) == set(methods.ONESHOT_METHODS)
    assert {name for name, cls in ONESHOT_CONFIGS.items() if cls().needs_calibration} == set(methods.CALIBRATED_METHODS)
    assert _accepted(lambda m: OneShotArguments(method=m), every) == set(methods.ONESHOT_METHODS)
    # the sweep
    grid = SweepArguments(methods=list(methods.ALL_METHODS))
    assert {s.name for s in grid.specs} == {methods.DENSE, *methods.ONESHOT_METHODS, *methods.TRAINED_METHODS}
    assert [str(s) for s in grid.specs] == list(methods.ALL_METHODS)
    assert set(SweepArguments().methods) <= set(methods.ALL_METHODS)
    for bad in ("bogus", "dense+wanda", "wanda+magnitude", "pilot+pilot", "pilot+"):
        with pytest.raises(ValueError):
            SweepArguments(methods=[bad])
    # the model card: a description for every method that produces a card (all but the dense reference)
    assert set(methods.DESCRIPTIONS) == set(methods.ONESHOT_METHODS) | set(methods.TRAINED_METHODS)


def test_dense_is_refused_as_a_trained_method_and_named_finetune(tmp_path):
    with pytest.raises(ValueError, match="finetune"):
        PILoTTrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], method="dense")
    assert methods.MethodSpec.parse("dense").name == "dense" and not methods.MethodSpec.parse("dense").trained


def test_method_spec_warm_start():
    spec = methods.MethodSpec.parse("pilot+wanda")
    assert (spec.name, spec.warm_start, str(spec)) == ("pilot", "wanda", "pilot+wanda")
    assert spec.trained and spec.oneshot == "wanda" and spec.calibrates
    magnitude = methods.MethodSpec.parse("spred+magnitude")
    assert magnitude.warm_start == "magnitude" and not magnitude.calibrates
    assert methods.MethodSpec.parse("finetune").warm_start is None


# ----- one rule, one place: Hub ids, token redaction, 'global' is magnitude-only, tokens trained --------------

def _sources_containing(text: str) -> set[str]:
    return {name for name, path in MODULES.items() if text in path.read_text(encoding="utf-8")}


def test_hub_ids_and_redaction_live_only_in_naming():
    assert _sources_containing("validate_repo_id") == {"pilot_hf.naming"}
    assert _sources_containing("hf_[A-Za-z0-9]") == {"pilot_hf.naming"}
    from pilot_hf.hub import check_repo_id
    from pilot_hf.naming import is_hub_id, redact, redact_argv

    for bad in ("a--b/c", "org/x.git", "org/.hidden", "/abs/path", "./rel", "a/b/c"):
        assert not is_hub_id(bad), bad
        with pytest.raises(ValueError, match="is not valid"):
            check_repo_id(bad)
    assert is_hub_id("gpt2") and is_hub_id("org/name") and not is_hub_id("gpt2", namespace=True)
    token = "hf_abcdefghijklmnopqrstuv"
    assert redact(f"--hub_token {token} --token=x HF_TOKEN=y") == \
        "--hub_token <redacted> --token=<redacted> HF_TOKEN=<redacted>"
    assert redact_argv(["--hub_token", "secret", f"--x={token}"]) == ["--hub_token", "<redacted>", "--x=<redacted>"]


def test_the_global_pattern_is_magnitude_only_in_one_place():
    from pilot_hf.pruning import SparsityPattern

    rule = "pattern 'global' is only meaningful for magnitude"
    assert _sources_containing("meaningful for magnitude") == {"pilot_hf.pruning"}
    SparsityPattern.parse("global").check_method("magnitude")
    for method in ("wanda", "sparsegpt"):
        SparsityPattern.parse("unstructured").check_method(method)
        with pytest.raises(ValueError, match=rule):
            SparsityPattern.parse("global").check_method(method)
        with pytest.raises(ValueError, match=rule):
            OneShotArguments(method=method, sparsity_pattern="global")


def test_tokens_trained_counts_every_process(tmp_path, monkeypatch):
    args = PILoTTrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], per_device_train_batch_size=4,
                                  gradient_accumulation_steps=2)
    assert args.tokens_trained(10, 32) == 10 * 4 * 2 * 32
    monkeypatch.setattr(PILoTTrainingArguments, "world_size", property(lambda self: 3))
    assert args.tokens_trained(10, 32) == 10 * 4 * 3 * 2 * 32
    assert _sources_containing("def tokens_trained") == {"pilot_hf.training_args"}
