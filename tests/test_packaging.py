"""Packaging: the wheel ships the card template and the metric script, and renders a card in a clean venv."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import time
import zipfile
from pathlib import Path

from helpers import PACKAGE, REPO

import pilot_hf

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
