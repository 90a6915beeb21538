"""The package's layout: layering of the modules, one rule in one place, one method vocabulary, packaging.

Levels (lowest first); a module may import only from its own level or lower, and nothing outside
`pilot_hf.commands` (and `python -m pilot_hf`) imports the command line.
"""

from __future__ import annotations

import ast
import copy
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import time
import zipfile
from pathlib import Path

import pytest
import torch
from conftest import tiny_inputs, tiny_model

import pilot_hf
from pilot_hf import methods
from pilot_hf.oneshot import METHODS as ONESHOT_CONFIGS
from pilot_hf.oneshot import OneShotArguments, oneshot_prune
from pilot_hf.pruning import DEFAULT_SPARSITY, SparsityPattern, apply_keep_mask
from pilot_hf.sweep import SweepArguments, cell_arguments, parse_cell_sparsity
from pilot_hf.training_args import _METHOD_DEFAULTS, PILoTTrainingArguments
from pilot_hf.wrapping import magnitude_prune, masked_layers, merge_and_unload, prune_model, wrap_model

PACKAGE = Path(pilot_hf.__file__).resolve().parent
REPO = PACKAGE.parent

# First path component under pilot_hf -> level. Packages (oneshot, commands) take their modules with them.
LEVELS = {
    # L0 core
    "config": 0, "layers": 0, "pruning": 0, "methods": 0, "regularization": 0, "optim": 0, "assets": 0, "ham": 0,
    # L1
    "wrapping": 1, "data": 1, "evaluation": 1, "distillation": 1, "harness": 1,
    "runs": 1,  # the output protocol and checkpoint bookkeeping: below serialization and the trainer, which use it
    "metrics": 1,  # the `evaluate` metric script (metrics/perplexity/perplexity.py) wraps evaluation.perplexity
    # L2
    "oneshot": 2, "serialization": 2, "hub": 2, "loading": 2, "lora": 2, "patterns": 2,
    "_transformers_sparse": 2,  # serialization's Transformers plug-in: it imports serialization's format code
    # L3
    "training_args": 3, "schedule": 3, "trainer": 3,
    # L4
    "sweep": 4,
    # L5: the command line
    "commands": 5, "__main__": 5,
}
COMMAND_LINE = {"commands", "__main__"}


def package_modules() -> dict[str, Path]:
    """Dotted name -> file of every Python module shipped in pilot_hf (the metric script included)."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        if "__pycache__" in path.parts:
            continue
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        if is_package:
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


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
            if target == "pilot_hf":  # the package root: only its version string, which imports nothing new
                tree = ast.parse(path.read_text(encoding="utf-8"))
                names = {a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.lineno == line
                         for a in n.names}
                if names != {"__version__"}:
                    violations.append(f"{where}: {name} imports {sorted(names)} from the package root (all of it)")
                continue
            if target.split(".")[1] == "commands" and not in_cli:
                violations.append(f"{where}: {name} imports the command line ({target})")
            elif level_of(target) > own:
                violations.append(f"{where}: {name} (L{own}) imports {target} (L{level_of(target)})")
    assert not violations, "layering violations:\n" + "\n".join(violations)


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


# ----- one rule, one place: the sparsity default --------------------------------------------------------

def _sparsity_defaults(path: Path) -> list[str]:
    """Fallbacks for a missing sparsity: DEFAULT_SPARSITY-like names, `sparsity=<number>` defaults of
    parameters and dataclass fields, `sparsity = <number>`, `x or <number>` / `<number> if x is None else x`
    on a sparsity. (A dict of explicit preset values, like the CLI's demo settings, is not a fallback.)"""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    where = str(path.relative_to(REPO))
    found = []

    def is_number(node):
        return isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) \
            and not isinstance(node.value, bool) and 0 < node.value < 1

    def mentions_sparsity(node):
        return any((isinstance(n, ast.Name) and "sparsity" in n.id.lower())
                   or (isinstance(n, ast.Attribute) and "sparsity" in n.attr.lower()) for n in ast.walk(node))

    for node in ast.walk(tree):
        if isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names = [t.id if isinstance(t, ast.Name) else t.attr if isinstance(t, ast.Attribute) else ""
                     for t in targets]
            value = node.value
            if any("default" in n.lower() and "sparsity" in n.lower() for n in names):
                found.append(f"{where}:{node.lineno}: {names} names a sparsity default")
            if value is not None and any("sparsity" in n.lower() for n in names):
                if is_number(value):
                    found.append(f"{where}:{node.lineno}: {names} = {value.value}")
                if isinstance(value, ast.Call) and getattr(value.func, "id", "") == "field":
                    for kw in value.keywords:
                        if kw.arg == "default" and is_number(kw.value):
                            found.append(f"{where}:{node.lineno}: field {names} defaults to {kw.value.value}")
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            args = node.args
            positional = args.posonlyargs + args.args
            pairs = list(zip(positional[len(positional) - len(args.defaults):], args.defaults))
            pairs += [(a, d) for a, d in zip(args.kwonlyargs, args.kw_defaults) if d is not None]
            for arg, default in pairs:
                if "sparsity" in arg.arg.lower() and is_number(default):
                    found.append(f"{where}:{node.lineno}: parameter {arg.arg}={default.value}")
        elif isinstance(node, ast.BoolOp) and isinstance(node.op, ast.Or):
            if any(is_number(v) for v in node.values) and any(mentions_sparsity(v) for v in node.values):
                found.append(f"{where}:{node.lineno}: `sparsity or <number>`")
        elif isinstance(node, ast.IfExp):
            if (is_number(node.body) or is_number(node.orelse)) and mentions_sparsity(node.test) \
                    and any(isinstance(n, ast.Constant) and n.value is None for n in ast.walk(node.test)):
                found.append(f"{where}:{node.lineno}: `<number> if sparsity is None else ...`")
    return found


def test_the_sparsity_default_lives_only_in_pruning():
    found = {name: _sparsity_defaults(path) for name, path in MODULES.items()}
    assert found.pop("pilot_hf.pruning"), "the scan must find DEFAULT_SPARSITY in pruning.py"
    assert not [f for fs in found.values() for f in fs], "\n".join(f for fs in found.values() for f in fs)
    assert DEFAULT_SPARSITY == 0.5
    # the one rule
    assert SparsityPattern.parse("unstructured").resolve_sparsity(None) == 0.5
    assert SparsityPattern.parse("2:4").resolve_sparsity(None) == 0.5
    assert SparsityPattern.parse("1:4").resolve_sparsity(None) == 0.75
    with pytest.raises(ValueError, match="1:4"):
        SparsityPattern.parse("1:4").resolve_sparsity(0.5)


def _targets_of(model):
    from pilot_hf.wrapping import find_target_layers

    return find_target_layers(model)


def _zero_fractions(model) -> dict[str, float]:
    from pilot_hf.wrapping import effective_weight

    layers = masked_layers(model) or _targets_of(model)
    return {n: float((effective_weight(m) == 0).float().mean()) for n, m in layers.items()}


def _wrapped():
    return wrap_model(tiny_model())


PRUNERS = {
    "prune_model": lambda model, sparsity, pattern: prune_model(model, sparsity, pattern),
    "magnitude_prune": lambda model, sparsity, pattern: magnitude_prune(model, sparsity, pattern),
    "oneshot_prune": lambda model, sparsity, pattern: oneshot_prune(model, None, "magnitude", sparsity, pattern),
}


@pytest.mark.parametrize("entry", sorted(PRUNERS))
@pytest.mark.parametrize("sparsity, pattern, expected", [(None, "unstructured", 0.5), (None, "2:4", 0.5),
                                                         (None, "1:4", 0.75), (0.25, "unstructured", 0.25)])
def test_pruning_entry_points_resolve_the_sparsity_alike(entry, sparsity, pattern, expected):
    model = _wrapped() if entry == "prune_model" else tiny_model()
    PRUNERS[entry](model, sparsity, pattern)
    fractions = _zero_fractions(model)
    assert fractions and all(f == expected for f in fractions.values()), fractions


@pytest.mark.parametrize("entry", sorted(PRUNERS))
def test_pruning_entry_points_refuse_a_sparsity_the_pattern_contradicts(entry):
    model = _wrapped() if entry == "prune_model" else tiny_model()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="1:4"):
        PRUNERS[entry](model, 0.5, "1:4")
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "nothing may be pruned before the check"


def test_argument_classes_and_the_sweep_resolve_the_sparsity_alike(tmp_path):
    def training(**kw):
        return PILoTTrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], **kw)

    for make in (training, OneShotArguments):
        assert make().sparsity == 0.5
        assert make(sparsity_pattern="2:4").sparsity == 0.5
        assert make(sparsity_pattern="1:4").sparsity == 0.75
        assert make(sparsity=0.75, sparsity_pattern="1:4").sparsity == 0.75
        with pytest.raises(ValueError, match="1:4"):
            make(sparsity=0.5, sparsity_pattern="1:4")
    # the sweep names a cell by a fraction or an N:M pattern, never by both
    assert parse_cell_sparsity("0.5") == (0.5, "unstructured")
    assert parse_cell_sparsity("2:4") == (0.5, "2:4")
    assert parse_cell_sparsity("1:4") == (0.75, "1:4")
    for bad in ("0", "1", "1.5", "none", "4:4", "global"):
        with pytest.raises(ValueError):
            parse_cell_sparsity(bad)
    cell = cell_arguments(training(), methods.MethodSpec.parse("pilot"), "1:4", str(tmp_path / "cell"))
    assert (cell.sparsity, cell.sparsity_pattern) == (0.75, "1:4")


# ----- one rule, one place: pruned entries are +0.0 ------------------------------------------------------

def _negative_zeros(t: torch.Tensor) -> int:
    return int(((t == 0) & torch.signbit(t)).sum())


def test_apply_keep_mask_writes_positive_zeros():
    t = torch.tensor([[-1.0, 2.0, -3.0, -0.5], [0.25, -0.0, -7.0, 1.0]])
    keep = torch.tensor([[False, True, False, True], [False, False, True, False]])
    out = apply_keep_mask(t, keep)
    assert out is t  # in place
    assert torch.equal(t[~keep], torch.zeros(int((~keep).sum()))) and not torch.signbit(t[~keep]).any()
    assert torch.equal(t[keep], torch.tensor([2.0, -0.5, -7.0]))
    assert (-1.0 * torch.tensor(0.0)).signbit()  # what a multiplication by the mask would have written


def test_prune_model_and_magnitude_prune_leave_no_negative_zero():
    model = _wrapped()
    prune_model(model, 0.5)
    for name, layer in masked_layers(model).items():
        assert (layer.weight == 0).any() and _negative_zeros(layer.weight) == 0, name
        assert _negative_zeros(layer.mask) == 0, name
    merge_and_unload(model)
    for name, layer in _targets_of(model).items():
        assert _negative_zeros(layer.weight) == 0, name

    plain = tiny_model("gpt2")  # Conv1D: (in, out) layout
    magnitude_prune(plain, None, "2:4")
    for name, layer in _targets_of(plain).items():
        assert (layer.weight == 0).any() and _negative_zeros(layer.weight) == 0, name


@pytest.mark.parametrize("method", sorted(ONESHOT_CONFIGS))
def test_oneshot_prune_leaves_no_negative_zero(method):
    model = tiny_model()
    report = oneshot_prune(model, tiny_inputs(batch=4, length=16), method, 0.5)
    for name, layer in _targets_of(model).items():
        pruned = layer.weight[~report.masks[name]]
        assert pruned.numel() and torch.equal(pruned, torch.zeros_like(pruned)), name
        assert _negative_zeros(layer.weight) == 0, name


@pytest.mark.parametrize("method", ["pilot", "finetune"])
def test_the_trainers_recovery_phase_leaves_no_negative_zero(tmp_path, method):
    from test_trainer_api import make_trainer
    from transformers import TrainerCallback

    seen = []

    class Check(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if trainer.frozen:  # the recovery phase: the pattern is frozen
                seen.append(sum(_negative_zeros(p) for p, _ in trainer.frozen))
                assert all(bool((p[~keep] == 0).all()) for p, keep in trainer.frozen)

    trainer = make_trainer(tmp_path, method=method, max_steps=8, recovery_steps=4, alpha_update_interval=2,
                           sparsity=0.5)
    trainer.add_callback(Check())
    trainer.train()
    assert len(seen) >= 4 and not any(seen), seen
    for name, layer in _targets_of(trainer.model).items():
        assert float((layer.weight == 0).float().mean()) == 0.5 and _negative_zeros(layer.weight) == 0, name


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


# ----- packaging ------------------------------------------------------------------------------------------

TEMPLATE = "pilot_hf/templates/pilot_model_card.md.j2"

RENDER = textwrap.dedent("""
    import sys
    import pilot_hf
    report = {"layers": {"model.layers.0.self_attn.q_proj": {"shape": [4, 4], "numel": 16, "zeros": 8,
                                                             "sparsity": 0.5}},
              "total": {"numel": 16, "zeros": 8, "sparsity": 0.5}}
    card = pilot_hf.render_model_card({"base_model": "org/base", "sparsity_report": report, "method": "wanda",
                                       "hyperparameters": {"sparsity": 0.5}})
    print("FILE", pilot_hf.__file__)
    print("COMMANDS", any(m.startswith("pilot_hf.commands") for m in sys.modules))
    print("CARD-BEGIN")
    print(card.content)
""")


def test_wheel_ships_the_template_and_renders_a_card_in_a_clean_venv(tmp_path):
    """Build a wheel, install it into a venv that sees the project's dependencies but not its editable
    pilot_hf, and render a card there from a folder outside the repository."""
    start = time.perf_counter()
    # Build from a copy: setuptools writes build/ and *.egg-info into the source folder.
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    shutil.copytree(PACKAGE, src / "pilot_hf", symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
    dist = tmp_path / "dist"
    pip = [sys.executable, "-m", "pip"]
    env = {**os.environ, "PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1", "HF_HUB_OFFLINE": "1"}
    built = subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(dist),
                            str(src)], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    wheel = next(dist.glob("pilot_hf-*.whl"))

    template = (PACKAGE / "templates" / "pilot_model_card.md.j2").read_text(encoding="utf-8")
    with zipfile.ZipFile(wheel) as zf:
        info = zf.getinfo(TEMPLATE)
        shipped = zf.read(TEMPLATE).decode("utf-8")
        assert (info.external_attr >> 16) & 0o170000 != 0o120000, "the template is a symlink in the wheel"
        assert any(n.startswith("pilot_hf/metrics/perplexity/") for n in zf.namelist())
    assert shipped == template and shipped.startswith("---\n{{ card_data }}\n---")

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    installed = subprocess.run([*pip, "--python", str(python), "install", "--no-deps", "--no-index", str(wheel)],
                               capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert installed.returncode == 0, installed.stdout[-3000:] + installed.stderr[-3000:]
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    # The project's dependencies, as a plain path line: that folder's own .pth files (the editable
    # pilot_hf finder among them) are not executed, so pilot_hf can only come from the wheel.
    (Path(site) / "project_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

    outside = tmp_path / "elsewhere"
    outside.mkdir()
    clean_env = {k: v for k, v in env.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    ran = subprocess.run([str(python), "-c", RENDER], capture_output=True, text=True, cwd=outside, env=clean_env,
                         timeout=600)
    assert ran.returncode == 0, ran.stderr[-3000:]
    lines = ran.stdout.split("CARD-BEGIN\n", 1)
    head, card = lines[0].splitlines(), lines[1]
    file = Path(next(line for line in head if line.startswith("FILE ")).split(" ", 1)[1]).resolve()
    assert file.is_relative_to(venv.resolve()) and file.is_relative_to(Path(site).resolve()), file
    assert "COMMANDS False" in head
    for section in ("## Model details", "## How to use", "## Results", "## Method and hyper-parameters",
                    "## Reproduce", "## Per-layer sparsity", "Wanda (one-shot)", "model.layers.0.self_attn.q_proj"):
        assert section in card, section
    assert "base_model: org/base" in card and f"pilot-hf {pilot_hf.__version__}" in card
    print(f"wheel test wall time: {time.perf_counter() - start:.1f} s")
