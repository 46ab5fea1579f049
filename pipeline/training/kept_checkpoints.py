"""Checkpoints kept on purpose in a run's `checkpoints/` folder, beside the one the run resumes from.

A run keeps only its newest checkpoint, except those saved as kept: a ladder's stable run keeps one at each
branch step, for the branches to start from (pipeline/sweep/ladder.py). A kept checkpoint is a DeepSpeed tag
folder (`step00000123`) holding a marker file, written once every rank has finished writing the tag, so a
marked folder is always complete; the marker goes first when the checkpoint is dropped, so a half-deleted
folder is never taken for a complete one.
"""
from __future__ import annotations

import shutil
from pathlib import Path

MARKER = "kept"
LATEST = "latest"  # DeepSpeed's pointer to the newest tag of a checkpoint folder


def tag(step: int) -> str:
    return f"step{step:08d}"


def step_of(tag_name: str) -> int | None:
    """The step a tag names (None for anything else)."""
    digits = tag_name.removeprefix("step")
    return int(digits) if tag_name.startswith("step") and digits.isdigit() else None


def is_kept(tag_folder: Path) -> bool:
    return (tag_folder / MARKER).is_file()


def mark(folder: Path, step: int) -> None:
    """Mark the complete checkpoint of `step` in checkpoint folder `folder` as kept."""
    (folder / tag(step) / MARKER).write_text(f"{step}\n")


def kept_steps(folder: Path) -> set[int]:
    """The steps of the complete kept checkpoints in checkpoint folder `folder`."""
    if not folder.is_dir():
        return set()
    return {step for entry in folder.iterdir() if (step := step_of(entry.name)) is not None and is_kept(entry)}


def has_checkpoint(folder: Path) -> bool:
    """Whether checkpoint folder `folder` holds a DeepSpeed checkpoint to resume from."""
    return (folder / LATEST).exists()


def latest_step(folder: Path) -> int | None:
    """The step of the newest complete checkpoint DeepSpeed points at, if its folder is still there."""
    pointer = folder / LATEST
    if not pointer.is_file():
        return None
    name = pointer.read_text().strip()
    return step_of(name) if (folder / name).is_dir() else None


def drop(folder: Path, step: int) -> None:
    """Delete the kept checkpoint of `step`: its marker first, then its files."""
    where = folder / tag(step)
    (where / MARKER).unlink(missing_ok=True)
    shutil.rmtree(where, ignore_errors=True)
