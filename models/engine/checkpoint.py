"""Checkpoints with everything an exact resume needs: model, optimizer, scheduler, AMP scaler, sampler position,
iteration, the RNG states (python, numpy, torch, CUDA) and the config.

A checkpoint holds only tensors, numbers, strings, None, lists, tuples and dicts, so it loads with
`torch.load(..., weights_only=True)`: reading one never runs code from the file. The RNG states, which Python
and numpy give as tuples of their own types, are converted to tensors and numbers on save and back on load
(bit for bit). Every `.pt` the package reads goes through `load_checkpoint`; a file that needs full unpickling
(one written by an older version, or a crafted one) is refused unless the caller passes `trust=True`
(`--trust-checkpoint` on the command line)."""
from __future__ import annotations

import _compat_pickle
import io
import logging
import os
import pickletools
import random
import re
import tempfile
import warnings
import zipfile
from collections import OrderedDict

import numpy as np
import torch

logger = logging.getLogger(__name__)

FORMAT = 2  # 1: the pickled RNG tuples of older versions (needs trust); 2: plain types only

_PLAIN = (type(None), bool, int, float, str, torch.Tensor, torch.nn.Parameter)


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: missing, unreadable, or without what the caller needs."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint whose loading needs full unpickling, i.e. could run code from the file."""


def rng_state() -> dict:
    """This process's RNG states as plain types (tensors, numbers, strings)."""
    version, internal, gauss_next = random.getstate()
    kind, keys, pos, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    state = {"python": {"version": int(version), "state": torch.tensor(internal, dtype=torch.int64),
                        "gauss_next": gauss_next},
             "numpy": {"kind": str(kind), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore the states of `rng_state()` (or the pickled tuples of older checkpoints)."""
    py = state["python"]
    if isinstance(py, dict):
        py = (py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss_next"])
    random.setstate(py)
    npy = state["numpy"]
    if isinstance(npy, dict):
        npy = (npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
               npy["cached_gaussian"])
    np.random.set_state(npy)
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def check_plain(obj, where: str = "checkpoint") -> None:
    """Raise TypeError naming the first entry of `obj` that `weights_only=True` could not load back (exact types:
    a numpy scalar is a float subclass, a namedtuple a tuple subclass, and both would need unpickling)."""
    kind = type(obj)
    if kind in (dict, OrderedDict):
        for k, v in obj.items():
            if type(k) not in (str, int):
                raise TypeError(f"{where} has a key {k!r} of type {type(k).__name__}: use str or int keys")
            check_plain(v, f"{where}[{k!r}]")
    elif kind in (list, tuple):
        for i, v in enumerate(obj):
            check_plain(v, f"{where}[{i}]")
    elif kind not in _PLAIN:
        raise TypeError(f"{where} is a {kind.__module__}.{kind.__qualname__}: a checkpoint holds only tensors, "
                        "numbers, strings, None, lists and dicts")


def save_checkpoint(path: str, state: dict) -> None:
    """Write atomically and durably: a unique temporary file in the same folder (concurrent writers never share
    one), fsync, rename over `path`, fsync of the folder. A crash mid-write leaves the previous file intact."""
    state = {**state, "format": FORMAT}
    check_plain(state)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    fsync_dir(folder)


def fsync_dir(folder: str) -> None:
    """Make a rename in `folder` durable (a no-op where directories cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


REQUIRED = {"resume": ("model", "optimizer", "scheduler", "scaler", "sampler", "iteration", "rng", "config", "meta"),
            "model": ("model", "config", "meta")}


def check_keys(ckpt, path: str, purpose: str) -> dict:
    """`ckpt` if it has what `purpose` ("resume" or "model": --base, ltk eval) needs, else CheckpointError
    saying what is missing."""
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path}: not a checkpoint of ltkernels (a {type(ckpt).__name__}, not a dict)")
    missing = [k for k in REQUIRED[purpose] if k not in ckpt]
    if missing:
        what = "resume a run" if purpose == "resume" else "build a model"
        hint = " (a bare state_dict? it holds weights only)" if "model" in missing else ""
        raise CheckpointError(f"{path}: cannot {what}: the checkpoint has no {', '.join(missing)}{hint}")
    return ckpt


def _pickles(path: str) -> bytes:
    """The pickle bytes of a file: `data.pkl` of a torch.save archive, else the file itself."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            names = [n for n in z.namelist() if n.endswith("data.pkl")]
            return z.read(names[0]) if names else b""
    with open(path, "rb") as f:
        return f.read()


def _pickle_globals(data: bytes) -> list:
    """The classes and functions a pickle refers to, read statically with pickletools (nothing is imported or
    called). Legacy torch files hold several pickles in a row and then raw bytes: scan until the bytes stop
    parsing."""
    found, memo, strings, last = [], {}, [], None
    stream = io.BytesIO(data)
    while stream.tell() < len(data):
        try:
            for op, arg, _ in pickletools.genops(stream):
                last = arg if isinstance(arg, str) and op.name != "GLOBAL" else last
                if op.name in ("GLOBAL", "INST"):
                    found.append(_global_name(*arg.split(" ", 1)))
                elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                    found.append(_global_name(strings[-2], strings[-1]))
                elif "UNICODE" in op.name or "STRING" in op.name:
                    strings.append(arg)
                elif op.name == "MEMOIZE":
                    memo[len(memo)] = last
                elif op.name.endswith("PUT"):
                    memo[arg] = last
                elif op.name.endswith("GET") and isinstance(memo.get(arg), str):
                    last = memo[arg]
                    strings.append(last)
        except Exception:  # noqa: BLE001 -- the end of the pickles (or a damaged file)
            break
    return list(dict.fromkeys(found))


def _global_name(module: str, name: str) -> str:
    """`module.name` as Python 3 imports it (protocol-2 pickles say `__builtin__`, `copy_reg`)."""
    module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
    return f"{_compat_pickle.IMPORT_MAPPING.get(module, module)}.{name}"


def _allowed_globals():
    """What torch's weights_only unpickler accepts (None where this torch does not say: judge by the name)."""
    try:
        from torch import _weights_only_unpickler as wo

        return set(wo._get_allowed_globals()) | set(wo._get_user_allowed_globals())
    except (ImportError, AttributeError):
        return None


def _unsafe_types(path: str, message: str) -> list:
    """The globals of a refused file that weights_only=True does not allow, by a static scan of its pickles
    and from the unpickler's error."""
    try:
        scanned = _pickle_globals(_pickles(path))
    except (OSError, zipfile.BadZipFile, KeyError):
        scanned = []
    allowed = _allowed_globals()
    names = [n for n in scanned if (n not in allowed if allowed is not None else
                                    not (n.startswith("torch.") or n == "collections.OrderedDict"))]
    if not names:
        names = re.findall(r"GLOBAL (\S+) (?:was not an allowed|whose module)", message)
    return list(dict.fromkeys(n.strip() for n in names))


def load_checkpoint(path: str, map_location="cpu", trust: bool = False) -> dict:
    """Load a `.pt` with `torch.load(weights_only=True)`: only tensors and plain Python values are rebuilt, no
    code from the file runs. A file that needs more raises UnsafeCheckpointError naming the file and the types it
    asks for, unless `trust=True`, which loads it with full unpickling (for checkpoints of older versions whose
    origin you trust). Missing or unreadable files raise CheckpointError."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        with warnings.catch_warnings():  # torch's note on pickle protocols: the refusal below says enough
            warnings.filterwarnings("ignore", message=".*pickle protocol", category=UserWarning)
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # noqa: BLE001 -- torch raises many types for damaged files; all end below
        failure = err
    names = _unsafe_types(path, str(failure))
    if not names:
        raise CheckpointError(f"{path}: not a readable checkpoint: damaged, truncated or not written by torch.save "
                              f"({_describe(failure)})")
    if not trust:
        raise UnsafeCheckpointError(
            f"{path}: refusing to load: the file needs full unpickling of {', '.join(names)}, which can run code "
            "from the file. Checkpoints of this version hold only tensors and plain values; pass "
            "--trust-checkpoint (trust=True) to load an older checkpoint whose origin you trust.")
    logger.warning("loading %s with full unpickling (--trust-checkpoint): it asks for %s", path, ", ".join(names))
    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except Exception as err:  # noqa: BLE001 -- a trusted file that still does not load
        raise CheckpointError(f"{path}: not a readable checkpoint even with full unpickling ({_describe(err)})") \
            from None


def _describe(err: Exception) -> str:
    """One line for a load failure: torch's own message without its advice paragraphs."""
    message = str(err)
    inner = re.search(r"WeightsUnpickler error: (.*)", message)
    if inner:
        message = inner.group(1)
    elif "Weights only load failed" in message:
        parts = [p.strip() for p in message.split("\n\n") if p.strip()]
        message = parts[1] if len(parts) > 2 else parts[-1]
    line = message.strip().splitlines()[0] if message.strip() else ""
    if isinstance(err, EOFError) or not line:
        return f"{type(err).__name__}: empty or truncated file"
    return f"{type(err).__name__}: {line}"
