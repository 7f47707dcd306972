"""The run folder of `ltk train --out DIR`: checked before any work, resumed or refused when it holds a run, and
the run's records: `config.json`, `train.log` (Python logging, the console's lines), `metrics.jsonl` (one JSON
line per iteration and per evaluation) and TensorBoard scalars in `tb/`. A resumed run drops the records after
its checkpoint's iteration, so the folder always holds one continuous history."""
from __future__ import annotations

import contextlib
import glob
import json
import logging
import os
import re
import shutil
import tempfile

from .checkpoint import fsync_dir

LAST = "last_checkpoint"
RUN_FILES = ("config.json", "train.log", "metrics.jsonl", "train_log.json", "metrics.json", LAST, "model_best.pt",
             "checkpoint.pt")
_PERIODIC = re.compile(r"checkpoint_(\d+)\.pt$")


class RunFolderError(ValueError):
    """The output folder cannot take this run (not writable, holds another run, nothing to resume)."""


def write_text_atomic(path: str, text: str) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(folder)


def check_writable(out_dir: str) -> None:
    try:
        os.makedirs(out_dir, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write_test.", dir=out_dir)
        os.close(fd)
        with contextlib.suppress(FileNotFoundError):  # another rank's prepare may have swept it already
            os.remove(probe)
    except OSError as err:
        raise RunFolderError(f"--out {out_dir}: cannot write there ({err.strerror or err})") from None


def holds_run(out_dir: str) -> bool:
    return os.path.isdir(out_dir) and (any(os.path.exists(os.path.join(out_dir, f)) for f in RUN_FILES)
                                       or bool(glob.glob(os.path.join(out_dir, "checkpoint_*.pt"))))


def latest_checkpoint(out_dir: str) -> str | None:
    """The checkpoint `last_checkpoint` names, else the newest `checkpoint_<iter>.pt` / `checkpoint.pt`."""
    pointer = os.path.join(out_dir, LAST)
    if os.path.exists(pointer):
        with open(pointer) as f:
            name = f.read().strip()
        path = os.path.join(out_dir, name)
        if name and os.path.exists(path):
            return path
    periodic = sorted((int(m.group(1)), p) for p in glob.glob(os.path.join(out_dir, "checkpoint_*.pt"))
                      if (m := _PERIODIC.search(p)))
    final = os.path.join(out_dir, "checkpoint.pt")
    if os.path.exists(final):
        return final
    return periodic[-1][1] if periodic else None


def prepare(out_dir: str, resume: str | None, overwrite: bool, main: bool = True) -> str | None:
    """Check `out_dir` before any work; returns the checkpoint to resume from (None: a fresh run).
    `resume="auto"` takes the newest checkpoint of `out_dir`."""
    if resume and overwrite:
        raise RunFolderError("--resume and --overwrite exclude each other")
    check_writable(out_dir)
    if main:
        remove_stale_temporaries(out_dir)
    if resume == "auto":
        found = latest_checkpoint(out_dir)
        if found is None:
            raise RunFolderError(f"--resume: {out_dir} holds no checkpoint to resume from")
        return found
    if resume:
        return resume
    if holds_run(out_dir):
        if not overwrite:
            raise RunFolderError(f"--out {out_dir} already holds a run: pass --resume to continue it from its last "
                                 "checkpoint, or --overwrite to start again")
        if main:
            clear(out_dir)
    return None


def remove_stale_temporaries(out_dir: str) -> None:
    """Temporary files a killed save left behind (`<name>.<random>.tmp`; never a finished file). Under torchrun
    the other ranks' write probes come and go meanwhile: one that is gone already is no error."""
    for path in glob.glob(os.path.join(out_dir, "*.pt.*.tmp")) + glob.glob(os.path.join(out_dir, ".write_test.*")):
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)


def clear(out_dir: str) -> None:
    """Remove a previous run's files (only the ones a run writes)."""
    for name in RUN_FILES:
        path = os.path.join(out_dir, name)
        if os.path.exists(path):
            os.remove(path)
    for path in glob.glob(os.path.join(out_dir, "checkpoint_*.pt")):
        os.remove(path)
    shutil.rmtree(os.path.join(out_dir, "tb"), ignore_errors=True)


class RunLog:
    """The records of one run, written by the main rank (`enabled`); `start` is the first iteration this process
    runs (records after it, left by a killed run, are dropped)."""

    def __init__(self, out_dir: str, start: int, enabled: bool = True, console=print, tensorboard: bool = True):
        self.out_dir, self.enabled, self.console = out_dir, enabled, console
        self.logger = logging.getLogger(f"ltkernels.run.{os.path.abspath(out_dir)}")
        self.logger.setLevel(logging.INFO)
        self.logger.propagate = False
        self._handler = self._jsonl = self._tb = None
        if not enabled:
            return
        self._handler = logging.FileHandler(os.path.join(out_dir, "train.log"))
        self._handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        self.logger.addHandler(self._handler)
        path = os.path.join(out_dir, "metrics.jsonl")
        kept = [r for r in read_jsonl(path) if int(r.get("iter", 0)) <= start]
        write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in kept))
        self._jsonl = open(path, "a")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as err:  # the `models` extra brings tensorboard
                self.info(f"TensorBoard scalars skipped ({err}); pip install tensorboard")
            else:
                self._tb = SummaryWriter(os.path.join(out_dir, "tb"), purge_step=start + 1 if start else None)

    def info(self, message: str) -> None:
        if self.enabled:
            if self.console is not None:
                self.console(message)
            self.logger.info(message)

    def record(self, rec: dict, prefix: str = "train") -> None:
        if not self.enabled:
            return
        self._jsonl.write(json.dumps(rec) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for k, v in rec.items():
                if k not in ("iter", "type") and isinstance(v, (int, float)) and v == v:
                    self._tb.add_scalar(f"{prefix}/{k}", v, rec["iter"])

    def sync(self) -> None:
        """Make the records durable (at each checkpoint)."""
        if self._jsonl is not None:
            self._jsonl.flush()
            os.fsync(self._jsonl.fileno())
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        self.sync()
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
        if self._handler is not None:
            self.logger.removeHandler(self._handler)
            self._handler.close()
        self._handler = self._jsonl = self._tb = None


def read_jsonl(path: str) -> list:
    """The records of a `metrics.jsonl`; a last line cut short by a crash is dropped."""
    if not os.path.exists(path):
        return []
    out = []
    with open(path) as f:
        for line in f:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                break
    return out
