"""Push a pilot-hf output folder to the Hugging Face Hub (its model card is `card.py`'s).

The push goes through `HfApi.create_repo` + `HfApi.create_commit` with exactly the files `upload_plan` lists
(one commit; hidden files, secrets and symlinks never go up). The token comes from where huggingface_hub
looks (HF_TOKEN, the `hf auth login` cache) and is never written anywhere.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from fnmatch import fnmatch
from pathlib import Path

from huggingface_hub import CommitOperationAdd, HfApi, get_token
from huggingface_hub.utils import filter_repo_objects

from .naming import hub_id_error
from .runs import MARKER_NAME
from .serialization import (
    CONFIG_NAME,
    SAFE_WEIGHTS_INDEX_NAME,
    SAFE_WEIGHTS_NAME,
    compress_checkpoint,
    is_compressed,
)

# Upload everything in the folder except training state and pickles (only safetensors weights go up).
IGNORE_PATTERNS = [".pilot-hf", "checkpoint-*", "runs/*", "*.bin", "*.pt", "*.pth", "*.pkl", "*.pickle", "*.ckpt",
                   ".git/*", ".cache/*"]
# Never uploaded, whatever else the folder holds: hidden files and folders (.env, .ssh/, .netrc, .git-credentials),
# key and credential files, and symlinks (their targets may lie anywhere on the machine).
SECRET_PATTERNS = ["*.pem", "*.key", "*.p12", "*.pfx", "id_rsa*", "id_ed25519*", "id_ecdsa*", "id_dsa*",
                   "*credentials*", "*.kdbx"]


# ----------------------------------------------------------------------------------------------------
# Push
# ----------------------------------------------------------------------------------------------------

class PushError(RuntimeError):
    """The push could not be done (no token, or the Hub refused); local files are left as they were."""


@dataclass
class PushResult:
    repo_id: str
    revision: str | None
    files: list[tuple[str, int]]  # (path in repo, size in bytes), what was (or would be) uploaded
    compressed: bool  # the uploaded weights are in the pilot_sparse format
    dry_run: bool
    commit_url: str | None = None
    left_out: list[str] = field(default_factory=list)  # hidden, secret-looking or linked paths, never uploaded

    @property
    def total_bytes(self) -> int:
        return sum(size for _, size in self.files)

    def describe(self) -> str:
        width = max([len(name) for name, _ in self.files] + [4])
        what = "would upload" if self.dry_run else "uploaded"
        target = self.repo_id + (f"@{self.revision}" if self.revision else "")
        lines = [f"{what} {len(self.files)} files ({_size(self.total_bytes)}) to {target}"
                 + (" [compressed]" if self.compressed else "")]
        lines += [f"  {name:<{width}}  {_size(size):>10}" for name, size in self.files]
        if self.left_out:
            lines.append(f"left out (hidden, secret or linked; never uploaded): {', '.join(self.left_out)}")
        if self.commit_url:
            lines.append(f"commit: {self.commit_url}")
        return "\n".join(lines)


def _size(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    exp = min(int(math.log(n, 1024)), 4)
    return f"{n / 1024 ** exp:.1f} {'KMGT'[exp - 1]}B"


def check_pilot_output(folder: str | Path) -> None:
    """A folder pilot-hf can push: config.json and safetensors weights (single file or complete shards)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{folder} is not a folder; give the output_dir a pilot-hf run (or save_pretrained) wrote.")
    missing = []
    if not (folder / CONFIG_NAME).is_file():
        missing.append(CONFIG_NAME)
    index = folder / SAFE_WEIGHTS_INDEX_NAME
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing += [f"{s} (listed in {SAFE_WEIGHTS_INDEX_NAME})" for s in shards if not (folder / s).is_file()]
    elif not (folder / SAFE_WEIGHTS_NAME).is_file():
        missing.append(f"model weights ({SAFE_WEIGHTS_NAME} or {SAFE_WEIGHTS_INDEX_NAME} with its shards)")
    if missing:
        raise ValueError(f"{folder} is not a pilot-hf output folder: missing {', '.join(missing)}. Save the model "
                         "there with model.save_pretrained(folder) or pilot_hf.serialization.save_compressed(model, "
                         "folder) first.")


def check_repo_id(repo_id: str) -> None:
    error = hub_id_error(repo_id, namespace=True)
    if error:
        raise ValueError(f"repo_id {repo_id!r} is not valid: {error}. Use 'namespace/name', e.g. "
                         "'your-username/smollm2-135m-pilot-50' (letters, digits, '-', '_', '.').")


def _never_uploaded(path: Path) -> bool:
    return path.is_symlink() or path.name.startswith(".") or any(fnmatch(path.name, p) for p in SECRET_PATTERNS)


def upload_plan(folder: str | Path) -> list[tuple[str, int]]:
    """(path, bytes) of every file under `folder` that an upload sends: not hidden, secret-looking or a symlink
    (nor inside such a folder), then after IGNORE_PATTERNS."""
    return _plan(Path(folder))[0]


def _plan(folder: Path) -> tuple[list[tuple[str, int]], list[str]]:
    """(upload_plan, the paths left out as hidden, secret or linked)."""
    files, left_out = [], []
    for root, dirs, names in os.walk(folder):  # followlinks=False: a linked folder is never entered
        for name in sorted([*dirs, *names]):
            path = Path(root) / name
            if _never_uploaded(path):
                left_out.append(path.relative_to(folder).as_posix())
                if name in dirs:
                    dirs.remove(name)
            elif name in names:
                files.append(path.relative_to(folder).as_posix())
    kept = filter_repo_objects(sorted(files), ignore_patterns=IGNORE_PATTERNS)
    return [(p, (folder / p).stat().st_size) for p in kept], sorted(left_out)


def _retry_hint(folder: Path, repo_id: str, private: bool, compressed: bool, revision: str | None) -> str:
    flags = "".join([" --private" if private else "", " --compressed" if compressed else "",
                     f" --revision {revision}" if revision else ""])
    return f"pilot-hf push {folder} --repo_id {repo_id}{flags}"


def push_to_hub(output_dir: str | Path, repo_id: str, private: bool = False, compressed: bool = False,
                revision: str | None = None, dry_run: bool = False, api: HfApi | None = None,
                commit_message: str | None = None) -> PushResult:
    """Upload a pilot-hf output folder to the Hub repo `repo_id` (created if needed) in one commit.

    compressed=True uploads a compressed copy built in a temporary folder (`output_dir` is never
    modified); a folder that is already compressed is uploaded as it is. dry_run=True checks
    everything but the token, prints and returns the files that would be uploaded, and contacts
    nobody. `api` defaults to `HfApi()`; the token is the one huggingface_hub finds (HF_TOKEN, or
    `hf auth login`). Raises ValueError for bad inputs and PushError if the push fails.
    """
    folder = Path(output_dir)
    check_pilot_output(folder)
    check_repo_id(repo_id)
    if not dry_run and not (getattr(api, "token", None) or get_token()):
        raise PushError("No Hugging Face token found. Log in with `hf auth login` (or set the HF_TOKEN environment "
                        "variable to a token with write access, see https://huggingface.co/settings/tokens), "
                        "then run the push again.")
    compressed_on_disk = is_compressed(folder)
    never_uploaded = _plan(folder)[1]
    with contextlib.ExitStack() as stack:
        upload_dir = folder
        if compressed and not compressed_on_disk:
            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="pilot-push-")))
            upload_dir = tmp / folder.name
            compress_checkpoint(folder, upload_dir)  # its card copy says how to load it
            for name in never_uploaded:  # the copy made linked files real ones: leave out what the folder does
                if (upload_dir / name).is_file():
                    (upload_dir / name).unlink()
        files, left_out = _plan(upload_dir)
        left_out = sorted({*left_out, *never_uploaded} - {MARKER_NAME})
        result = PushResult(repo_id=repo_id, revision=revision, files=files, compressed=is_compressed(upload_dir),
                            dry_run=dry_run, left_out=left_out)
        if dry_run:
            return result
        api = api or HfApi()
        message = commit_message or f"Upload {'compressed ' if result.compressed else ''}sparse model (pilot-hf)"
        step = "create the repository"
        try:
            api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
            if revision and revision != "main":
                step = f"create the branch {revision!r}"
                api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
            step = "upload the files"
            operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(upload_dir / name))
                          for name, _ in result.files]  # exactly the plan: never a file the plan left out
            commit = api.create_commit(repo_id=repo_id, operations=operations, commit_message=message,
                                       revision=revision, repo_type="model")
        except Exception as err:
            raise PushError(
                f"Pushing {folder} to {repo_id} failed while trying to {step}: {type(err).__name__}: {err}. "
                f"Every local file in {folder} is unchanged and no partial commit was made (the upload is one "
                f"commit). Fix the cause (network, permissions, repo name) and retry the same push: "
                f"`{_retry_hint(folder, repo_id, private, compressed, revision)}`.") from err
        result.commit_url = getattr(commit, "commit_url", None) or str(commit)
        return result
