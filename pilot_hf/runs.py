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

- a result is published by renaming the staging folder into place; an output_dir that is a mount point (a
  Docker volume, a tmpfs) cannot be renamed, so there the staging folder lives inside it and the result's files
  are moved into it one by one at the end;
- a failure says what was kept and where: a saved model only if it is complete (`is_complete_model`), and the
  checkpoints; a full disk is one paragraph (`DiskFullError`), not a traceback.

Checkpoints (the Trainer's, in `checkpoint_dir`): `latest_checkpoint` picks the newest *complete* checkpoint by
step number (a checkpoint whose save was interrupted lacks its state files, or has a truncated file, and is
skipped). The checkpoint folder carries the marker too: Trainer's rotation (`save_total_limit`) deletes the
oldest `checkpoint-*` it finds, so a folder holding `checkpoint-*` that pilot-hf did not write is refused.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import re
import shutil
import tempfile
import time
import zipfile
from pathlib import Path

logger = logging.getLogger(__name__)

MARKER_NAME = ".pilot-hf"  # in every folder pilot-hf writes; only such folders may be replaced
# In a checkpoint folder pilot-hf uses: its checkpoint-* are pilot-hf's. Not MARKER_NAME, which would let
# --overwrite_output_dir replace that folder (a user may have given a folder holding other files).
CHECKPOINTS_MARKER_NAME = ".pilot-hf-checkpoints"
PILOT_STATE_NAME = "pilot_state.json"
# A complete PILoTTrainer checkpoint holds these (pilot_state.json is written last, atomically).
CHECKPOINT_FILES = ("trainer_state.json", PILOT_STATE_NAME)
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
# How a full disk shows: OSError ENOSPC/EDQUOT, or the text torch (PytorchStreamWriter) and safetensors (Rust
# IoError) raise it as.
_DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_DISK_FULL_TEXTS = ("No space left on device", "StorageFull", "Disk quota exceeded", "file write failed")


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


def write_json(path: Path, data, replace: bool = True) -> None:
    """Write JSON atomically (a reader never sees half a file). replace=False: only if no file is there
    (FileExistsError otherwise, also for one that appeared while writing)."""
    text = json.dumps(data, indent=2, default=str) + "\n"
    if not replace:
        write_new_file(path, text)
        return
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_new_file(path: Path, text: str) -> None:
    """Write `path` atomically, only if no file is there (also none that appeared while we wrote): never
    overwrites a file someone else wrote. FileExistsError if one is there."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.link(tmp, path)  # fails if path exists, unlike a rename
    finally:
        os.unlink(tmp)


def is_pilot_folder(path: Path) -> bool:
    return (path / MARKER_NAME).is_file()


# ----- checkpoints -------------------------------------------------------------------------------------------

def _safetensors_intact(path: Path) -> bool:
    """The header parses and the file is exactly as long as the header says (a cut-off file is shorter)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        length = int.from_bytes(f.read(8), "little")
        if size < 8 + length or length < 2:
            return False
        header = json.loads(f.read(length))
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    return size == 8 + length + end


def file_intact(path: Path) -> bool:
    """A cheap structure check of one saved file: safetensors (header vs length), torch.save's zip archives (the
    end record, which a cut-off file lacks) and JSON (parses). Other files are taken as they are."""
    try:
        if path.suffix == ".safetensors":
            return _safetensors_intact(path)
        if path.suffix in (".pt", ".pth", ".bin"):
            return zipfile.is_zipfile(path)
        if path.suffix == ".json":
            json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, KeyError, TypeError, AttributeError, IndexError):
        return False
    return True


def checkpoint_problem(path: str | os.PathLike) -> str | None:
    """Why `path` is not a complete checkpoint (None if it is): state files missing, or a file cut short."""
    path = Path(path)
    missing = [name for name in CHECKPOINT_FILES if not (path / name).is_file()]
    if missing:
        return f"no {', '.join(missing)}: its save was interrupted, or it is no pilot-hf checkpoint"
    broken = sorted(f.name for f in path.iterdir() if f.is_file() and not file_intact(f))
    if broken:
        return f"{', '.join(broken)} {'is' if len(broken) == 1 else 'are'} cut short or damaged"
    return None


def latest_checkpoint(folder: str | os.PathLike | None) -> str | None:
    """The complete checkpoint with the highest step in `folder` (by number: checkpoint-12 comes after
    checkpoint-8), skipping checkpoints whose save was interrupted or whose files are cut short."""
    if folder is None or not os.path.isdir(folder):
        return None
    steps = []
    for name in os.listdir(folder):
        match = _CHECKPOINT.match(name)
        if match and os.path.isdir(os.path.join(folder, name)):
            steps.append((int(match.group(1)), os.path.join(folder, name)))
    for _, path in sorted(steps, reverse=True):
        if checkpoint_problem(path) is None:
            return path
    return None


def foreign_checkpoints(folder: Path) -> list[str]:
    """The `checkpoint-*` entries of `folder` that pilot-hf did not write. A folder with the checkpoints marker is
    pilot-hf's; one without it (written before the marker existed) counts a checkpoint as pilot-hf's if it has
    pilot_state.json."""
    if not folder.is_dir() or (folder / CHECKPOINTS_MARKER_NAME).is_file():
        return []
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("checkpoint-")
                  and not (p / PILOT_STATE_NAME).is_file())


def resume_hint(checkpoint_dir: str | Path | None) -> str:
    checkpoint = latest_checkpoint(checkpoint_dir)
    if checkpoint is None:
        return "no complete checkpoint was written, so a new run starts from the beginning"
    return f"resume with --resume_from_checkpoint {checkpoint} (its latest complete checkpoint)"


# ----- the result ----------------------------------------------------------------------------------------------

def is_complete_model(folder: Path) -> bool:
    """A saved model that loads: config.json and every weight file (the index's shards, or model.safetensors), and
    every JSON file beside them (tokenizer, generation config), each intact."""
    folder = Path(folder)
    try:
        index = folder / "model.safetensors.index.json"
        shards = set(json.loads(index.read_text())["weight_map"].values()) if index.is_file() else \
            {"model.safetensors"}
        needed = [folder / "config.json", *(folder / name for name in shards)]
        return all(f.is_file() for f in needed) and all(file_intact(f) for f in {*needed, *folder.glob("*.json")})
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def is_disk_full(error: BaseException | None) -> bool:
    """Whether `error` (or what caused it) is a full disk or quota, however the writing library reports it."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in _DISK_FULL_ERRNOS:
            return True
        if any(text in str(error) for text in _DISK_FULL_TEXTS):
            return True
        error = error.__cause__ or error.__context__
    return False


class DiskFullError(OutputError):
    """The disk filled up while pilot-hf was saving; the message says what was kept."""


def _listing(folder: Path, skip: tuple[str, ...] = ()) -> dict:
    """{relative path: (size, mtime)} of every file under `folder`: tells whether anyone changed it."""
    return {str(p.relative_to(folder)): (p.lstat().st_size, p.lstat().st_mtime_ns)
            for p in folder.rglob("*") if not p.is_dir() and p.relative_to(folder).parts[0] not in skip}


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


class FolderLock:
    """An exclusive, non-blocking lock for writing `folder` (the file `path`, by default `.<name>.lock` beside it)."""

    def __init__(self, folder: Path, path: Path | None = None):
        self.folder = folder
        self.path = path or folder.parent / f".{folder.name}.lock"
        self._file = None

    def __enter__(self) -> FolderLock:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a+")  # noqa: SIM115 (held until __exit__)
        except OSError as err:
            raise OutputError(f"cannot create {self.path.parent} for {self.folder} ({err.strerror}). Choose a "
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

    IN_PLACE_STAGING, IN_PLACE_LOCK = ".pilot-hf.partial", ".pilot-hf.lock"
    MOUNT_ENTRIES = ("lost+found",)  # what a fresh file system holds: not a user's file, never touched

    def __init__(self, output_dir: str | os.PathLike, overwrite: bool = False, is_main: bool = True,
                 checkpoint_dir: str | os.PathLike | None = None):
        self.final = Path(output_dir).expanduser().resolve()
        # A mount point (Docker volume, tmpfs) cannot be renamed or replaced: stage inside it and publish by
        # moving the files in (its own file system, so each move is a rename).
        self.in_place = os.path.ismount(self.final)
        if self.in_place:
            self.staging = self.final / self.IN_PLACE_STAGING
            self._lock = FolderLock(self.final, self.final / self.IN_PLACE_LOCK)
        else:
            self.staging = self.final.parent / f".{self.final.name}.partial"
            self._lock = FolderLock(self.final)
        self.overwrite, self.is_main = overwrite, is_main
        self.checkpoint_dir = Path(checkpoint_dir).expanduser().resolve() if checkpoint_dir else None
        self._made_checkpoint_dir = False
        self._replaces: dict | None = None  # the listing of the earlier result this run may replace
        self.check()

    @property
    def _own_names(self) -> tuple[str, ...]:
        """Entries of output_dir that are this protocol's own (a mount point holds its lock and staging)."""
        return (self.IN_PLACE_STAGING, self.IN_PLACE_LOCK, *self.MOUNT_ENTRIES) if self.in_place else ()

    def _user_entries(self) -> list[Path]:
        return [p for p in self.final.iterdir() if p.name not in self._own_names] if self.final.is_dir() else []

    def check(self) -> None:
        """Everything that can be refused before the run starts."""
        final = self.final
        if final.exists() and not final.is_dir():
            raise OutputError(f"output_dir {final} is a file; give a folder path (it is created if needed).")
        cwd = Path.cwd().resolve()
        if final == cwd or final in cwd.parents or final == Path.home().resolve():
            raise OutputError(f"output_dir {final} is the current folder, one of its parents or the home folder; "
                              "pilot-hf writes its result into a folder of its own. Give a new folder name.")
        if self._user_entries():
            if not self.overwrite:
                raise OutputError(f"output_dir {final} already exists and is not empty. Choose another "
                                  "--output_dir, or pass --overwrite_output_dir to replace a result pilot-hf wrote.")
            if not is_pilot_folder(final):
                raise OutputError(f"output_dir {final} was not written by pilot-hf (no {MARKER_NAME} marker), so it "
                                  "is never replaced, even with --overwrite_output_dir. Choose another --output_dir.")
            self._replaces = _listing(final, self._own_names)
        if self.checkpoint_dir is not None:
            self._check_checkpoint_dir()
        existing = final if self.in_place else final.parent
        while not existing.exists():
            existing = existing.parent
        if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
            raise OutputError(f"cannot write under {existing}, so output_dir {final} cannot be created. Choose an "
                              "--output_dir in a folder you can write to.")

    def _check_checkpoint_dir(self) -> None:
        checkpoints, final = self.checkpoint_dir, self.final
        if checkpoints == final or final in checkpoints.parents:
            raise OutputError(f"checkpoint_dir {checkpoints} is inside output_dir {final}; the result folder "
                              "holds the model only. Give a checkpoint_dir outside it.")
        foreign = foreign_checkpoints(checkpoints)
        if foreign:  # Trainer's rotation (save_total_limit) deletes the oldest checkpoint-* it finds
            raise OutputError(f"checkpoint_dir {checkpoints} holds {', '.join(foreign[:3])}"
                              f"{' ...' if len(foreign) > 3 else ''}, which pilot-hf did not write; a run there "
                              "could overwrite them or delete them when it rotates checkpoints (--save_total_limit). "
                              "They were left untouched. Give another --checkpoint_dir.")

    def __enter__(self) -> OutputFolder:
        if not self.is_main:
            return self
        self._lock.__enter__()
        try:
            if self.staging.exists():  # left by a run that was killed; we hold the lock, so it is nobody's now
                if not is_pilot_folder(self.staging):
                    raise OutputError(f"{self.staging} exists but was not written by pilot-hf; move it away first.")
                if self.holds_model():  # a finished model whose run failed later: never thrown away silently
                    raise OutputError(f"{self.staging} holds the trained model of an earlier run that did not finish "
                                      "(complete and loadable); move it where you want it (or delete it), then run "
                                      "again.")
                shutil.rmtree(self.staging)
            self.staging.mkdir(parents=True)
            write_json(self.staging / MARKER_NAME, {"written_by": "pilot-hf", "pid": os.getpid(),
                                                    "time": time.time()})
            marker = self.checkpoint_dir / CHECKPOINTS_MARKER_NAME if self.checkpoint_dir is not None else None
            if marker is not None and not marker.is_file():
                self._made_checkpoint_dir = not self.checkpoint_dir.exists()
                self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
                write_json(marker, {"written_by": "pilot-hf", "what": "its checkpoint-* folders are pilot-hf's"})
        except BaseException:
            self._lock.__exit__()
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self.is_main:
            return
        try:
            if exc_type is None:
                self._publish()
                return
            disk_full = is_disk_full(exc)
            if self.kept() and not disk_full:  # what was kept and where; the error is the command's paragraph
                logger.warning(self.failure_message())
            message = self.failure_message()  # before the staging folder is cleaned
            if not self.holds_model():
                shutil.rmtree(self.staging, ignore_errors=True)
            if disk_full:
                raise DiskFullError(f"the disk filled up while pilot-hf was saving ({' '.join(str(exc).split())[:200]})"
                                    f"; {message}. Free some space (or choose another --output_dir or "
                                    "--checkpoint_dir), then run again.") from None
        finally:
            self._drop_unused_checkpoint_dir()
            self._lock.__exit__()

    def _drop_unused_checkpoint_dir(self) -> None:
        """A checkpoint folder this run made and wrote no checkpoint into is removed (it holds only the marker)."""
        folder = self.checkpoint_dir
        if self._made_checkpoint_dir and folder.is_dir() and \
                [p.name for p in folder.iterdir()] == [CHECKPOINTS_MARKER_NAME]:
            shutil.rmtree(folder, ignore_errors=True)

    def holds_model(self) -> bool:
        return self.staging.is_dir() and is_complete_model(self.staging)

    def failure_message(self) -> str:
        """One sentence on what was kept: the saved model (if complete) and the checkpoints (if any)."""
        kept = self.kept()
        return "the run did not finish; " + ("; ".join(kept) if kept else f"nothing was written to {self.final}")

    def kept(self) -> list[str]:
        kept = []
        if self.holds_model():
            kept.append(f"the trained model is saved in {self.staging} (complete; move it where you want it)")
        if self.checkpoint_dir is not None and latest_checkpoint(self.checkpoint_dir) is not None:
            kept.append(f"checkpoints are in {self.checkpoint_dir}; {resume_hint(self.checkpoint_dir)}")
        return kept

    def _publish(self) -> None:
        # Checked again now: the folder may have appeared, or been filled by someone, during the run.
        final = self.final
        if self._user_entries():
            # Replace only the earlier result seen at the start, as it was: a file added since is someone's.
            if not (self.overwrite and is_pilot_folder(final) and _listing(final, self._own_names) == self._replaces):
                raise OutputError(f"output_dir {final} was created or changed while this run worked, so the result "
                                  f"was not moved there; it is complete in {self.staging}. Move it yourself.")
        try:
            if self.in_place:
                self._publish_in_place()
            elif self._user_entries():
                old = final.parent / f".{final.name}.replaced"
                shutil.rmtree(old, ignore_errors=True)
                os.replace(final, old)
                try:
                    os.replace(self.staging, final)
                except OSError:
                    os.replace(old, final)  # the earlier result goes back where it was
                    raise
                shutil.rmtree(old, ignore_errors=True)
            else:
                if final.exists():
                    final.rmdir()  # empty
                os.replace(self.staging, final)
        except OSError as err:
            raise OutputError(f"the finished result could not be moved into {final} ({err.strerror or err}); it is "
                              f"complete in {self.staging}. Move it where you want it (or delete it) before the "
                              "next run into the same output_dir.") from None

    def _publish_in_place(self) -> None:
        """output_dir is a mount point: remove the earlier result (checked above), then move each file in."""
        for entry in self._user_entries():
            _remove(entry)
        for entry in sorted(self.staging.iterdir()):
            os.replace(entry, self.final / entry.name)
        self.staging.rmdir()
