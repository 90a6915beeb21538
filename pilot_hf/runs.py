"""The life of a run's output: one protocol for every command, and the record of what defined the run.

Output protocol (`OutputFolder`), the guarantees of docs/DESIGN.md "Output and resume":
- an exclusive lock per output folder (`.<name>.lock` beside it): a second run into the same folder fails
  at once instead of silently replacing the first one's result;
- results are written into a staging folder `.<name>.partial` beside `output_dir` and renamed into place
  only when complete, so `output_dir` is never half-written;
- the overwrite rule is checked at the start and again at the final rename; a folder is only ever removed
  if pilot-hf wrote it (it holds the marker file `.pilot-hf`), never a user's folder such as `.`;
- on any failure the staging folder is removed unless it already holds a saved model, which is kept and
  named; Trainer checkpoints live in their own folder (`checkpoint_dir`) and are never removed.

Resume: `latest_checkpoint` picks the newest *complete* checkpoint by step number (a checkpoint whose save
was interrupted lacks its state files and is skipped).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import shutil
import time
from pathlib import Path

from .trainer import latest_checkpoint

logger = logging.getLogger(__name__)

MARKER_NAME = ".pilot-hf"  # in every folder pilot-hf writes; only such folders may be replaced
_SECRET = re.compile(r"(hf_[A-Za-z0-9]{10,})")
_SECRET_FLAG = re.compile(r"^--(hub_token|hub-token|token)(=.*)?$")  # HfArgumentParser also takes --hub-token


def peak_memory_bytes(device=None) -> int:
    """Peak memory of this process so far: CUDA's peak allocated bytes on a CUDA device, else the peak
    resident set size (on CPU it includes loading the model and anything run before training)."""
    import torch

    if device is not None and torch.device(device).type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


class OutputError(ValueError):
    """The output folder cannot be used as asked; the message says why and what to do."""


def redact_argv(argv: list[str]) -> list[str]:
    """argv with token values (after --hub_token/--token, or anything shaped like an hf_ token) replaced."""
    out, hide_next = [], False
    for arg in argv:
        if hide_next:
            out.append("<redacted>")
            hide_next = False
            continue
        match = _SECRET_FLAG.match(arg)
        if match:
            out.append(f"--{match.group(1)}=<redacted>" if match.group(2) else arg)
            hide_next = not match.group(2)
            continue
        out.append(_SECRET.sub("<redacted>", arg))
    return out


def write_json(path: Path, data) -> None:
    """Write JSON atomically (a reader never sees half a file)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def is_pilot_folder(path: Path) -> bool:
    return (path / MARKER_NAME).is_file()


def resume_hint(checkpoint_dir: str | Path | None) -> str:
    checkpoint = latest_checkpoint(checkpoint_dir)
    if checkpoint is None:
        return "no complete checkpoint was written, so a new run starts from the beginning"
    return f"resume with --resume_from_checkpoint {checkpoint} (its latest complete checkpoint)"


def _listing(folder: Path) -> dict:
    """{relative path: (size, mtime)} of every file under `folder`: tells whether anyone changed it."""
    return {str(p.relative_to(folder)): (p.lstat().st_size, p.lstat().st_mtime_ns)
            for p in folder.rglob("*") if not p.is_dir()}


class FolderLock:
    """An exclusive, non-blocking lock for writing `folder` (the file `.<name>.lock` beside it)."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.path = folder.parent / f".{folder.name}.lock"
        self._file = None

    def __enter__(self) -> FolderLock:
        try:
            self.folder.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a+")  # noqa: SIM115 (held until __exit__)
        except OSError as err:
            raise OutputError(f"cannot create {self.folder.parent} for {self.folder} ({err.strerror}). Choose a "
                              "folder you can write to.") from None
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._file.close()
            self._file = None
            raise OutputError(f"another pilot-hf run is writing to {self.folder} right now (it holds {self.path}). "
                              "Wait for it to finish, or choose another output folder.") from None
        return self

    def __exit__(self, *exc) -> None:
        if self._file is not None:
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()  # the empty lock file stays: unlinking it would race with a waiting opener
            self._file = None


class OutputFolder:
    """Context manager for one run's output folder (see the module docstring).

        with OutputFolder(output_dir, overwrite) as out:
            ... write into out.staging ...
        # out.final now holds the result

    Only the main process of a multi-process run writes (`is_main`); the others get the same paths.
    """

    def __init__(self, output_dir: str | os.PathLike, overwrite: bool = False, is_main: bool = True,
                 checkpoint_dir: str | os.PathLike | None = None):
        self.final = Path(output_dir).expanduser().resolve()
        self.staging = self.final.parent / f".{self.final.name}.partial"
        self._lock = FolderLock(self.final)
        self.overwrite, self.is_main = overwrite, is_main
        self.checkpoint_dir = Path(checkpoint_dir).expanduser().resolve() if checkpoint_dir else None
        self._replaces: dict | None = None  # the listing of the earlier result this run may replace
        self.check()

    def check(self) -> None:
        """Everything that can be refused before the run starts."""
        final = self.final
        if final.exists() and not final.is_dir():
            raise OutputError(f"output_dir {final} is a file; give a folder path (it is created if needed).")
        cwd = Path.cwd().resolve()
        if final == cwd or final in cwd.parents or final == Path.home().resolve():
            raise OutputError(f"output_dir {final} is the current folder, one of its parents or the home folder; "
                              "pilot-hf writes its result into a folder of its own. Give a new folder name.")
        if final.exists() and any(final.iterdir()):
            if not self.overwrite:
                raise OutputError(f"output_dir {final} already exists and is not empty. Choose another "
                                  "--output_dir, or pass --overwrite_output_dir to replace a result pilot-hf wrote.")
            if not is_pilot_folder(final):
                raise OutputError(f"output_dir {final} was not written by pilot-hf (no {MARKER_NAME} marker), so it "
                                  "is never replaced, even with --overwrite_output_dir. Choose another --output_dir.")
            self._replaces = _listing(final)
        if self.checkpoint_dir is not None and (self.checkpoint_dir == final or final in self.checkpoint_dir.parents):
            raise OutputError(f"checkpoint_dir {self.checkpoint_dir} is inside output_dir {final}; the result folder "
                              "holds the model only. Give a checkpoint_dir outside it.")
        existing = final.parent
        while not existing.exists():
            existing = existing.parent
        if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
            raise OutputError(f"cannot write under {existing}, so output_dir {final} cannot be created. Choose an "
                              "--output_dir in a folder you can write to.")

    def __enter__(self) -> OutputFolder:
        if not self.is_main:
            return self
        self._lock.__enter__()
        if self.staging.exists():  # left by a run that was killed; we hold the lock, so it is nobody's now
            if not is_pilot_folder(self.staging):
                self._lock.__exit__()
                raise OutputError(f"{self.staging} exists but was not written by pilot-hf; move it away first.")
            if self.holds_model():  # a finished training whose run failed later: never thrown away silently
                self._lock.__exit__()
                raise OutputError(f"{self.staging} holds the trained model of an earlier run that did not finish; "
                                  "move it where you want it (or delete it), then run again.")
            shutil.rmtree(self.staging)
        self.staging.mkdir()
        write_json(self.staging / MARKER_NAME, {"written_by": "pilot-hf", "pid": os.getpid(), "time": time.time()})
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self.is_main:
            return
        try:
            if exc_type is None:
                self._publish()
            else:
                if self.kept():  # say what was kept and where; the error itself is the command's one paragraph
                    logger.warning(self.failure_message())
                if not self.holds_model():
                    shutil.rmtree(self.staging, ignore_errors=True)
        finally:
            self._lock.__exit__()

    def holds_model(self) -> bool:
        return self.staging.is_dir() and (self.staging / "config.json").is_file()

    def failure_message(self) -> str:
        """One sentence on what was kept: the saved model (if any) and the checkpoints (if any)."""
        kept = self.kept()
        return "the run did not finish; " + ("; ".join(kept) if kept else f"nothing was written to {self.final}")

    def kept(self) -> list[str]:
        kept = []
        if self.holds_model():
            kept.append(f"the trained model is saved in {self.staging} (move it where you want it)")
        if self.checkpoint_dir is not None and latest_checkpoint(self.checkpoint_dir) is not None:
            kept.append(f"checkpoints are in {self.checkpoint_dir}; {resume_hint(self.checkpoint_dir)}")
        return kept

    def _publish(self) -> None:
        # Checked again now: the folder may have appeared, or been filled by someone, during the run.
        final = self.final
        if final.exists() and any(final.iterdir()):
            # Replace only the earlier result seen at the start, as it was: a file added since is someone's.
            if not (self.overwrite and is_pilot_folder(final) and _listing(final) == self._replaces):
                raise OutputError(f"output_dir {final} was created or changed while this run worked, so the result "
                                  f"was not moved there; it is complete in {self.staging}. Move it yourself.")
            old = final.parent / f".{final.name}.replaced"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(self.staging, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            if final.exists():
                final.rmdir()  # empty
            os.replace(self.staging, final)
