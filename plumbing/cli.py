"""Command-line plumbing every stage shares: the one-line error format (UserError, Parser, run_main), the
run dir's lock and temporary files, flag range checks, the seed, the device and the compute dtype.
Numerics policy (stated once): Gram, Cholesky, SVD and triangular solves run in float64; factors are
stored in float32 (bfloat16 for a bf16 model) and cast to the layer's dtype when it is built.
"""
import argparse
import errno
import functools
import glob
import math
import os
import random
import re
import shutil
import sys
import time

import filelock
import numpy as np
import torch

FORMAT_VERSION = 5  # bumped whenever an artifact's layout changes: older run dirs are refused, not misread

TEMPORARY = []  # temporary folders and files of this process, removed by run_main when the stage fails


class UserError(Exception):
    """Bad input: printed as one line by `run_main`, exit code 2."""


class Parser(argparse.ArgumentParser):
    """argparse with the project's error format: one `error:` line naming the flag and the fix, exit 2."""

    def error(self, message):
        self.exit(2, f"error: {message} (see `{self.prog} --help`)\n")


OS_ERRORS = r"(No space left on device|Disk quota exceeded|Read-only file system|Permission denied|Input/output error)"


def os_error(e):
    """The OS's reason when `e` is (or wraps) a failed read or write, else None (a bug keeps its traceback)."""
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EIO):
        return e.strerror + (f" ({e.filename})" if e.filename else "")
    m = re.search(OS_ERRORS + r" \(os error \d+\)", str(e))
    return m.group(1) if m else None


def remove(path):
    shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else os.path.exists(path) and os.remove(path)


def run_dir_lock(run_dir, stage):
    """One process per run dir (the kernel drops the lock when its holder dies); a killed one's temporary files go."""
    check_run_dir(run_dir)
    lock, holder = filelock.FileLock(os.path.join(run_dir, ".lock"), timeout=0), os.path.join(run_dir, ".lock.holder")
    try:
        lock.acquire()
    except filelock.Timeout:
        try:
            with open(holder, encoding="utf-8", errors="replace") as f:
                who = f.read(300).strip()
        except OSError:  # gone or unreadable: the lock is still held
            who = ""
        raise UserError(f"--run_dir {run_dir} is in use by {who or 'another process'}: wait for it to finish, or "
                        "pass another --run_dir") from None
    except OSError as e:  # a file system without locks
        raise UserError(f"--run_dir {run_dir}: cannot lock it ({e.strerror or e}): use a local "
                        "folder") from None
    with open(holder, "w", encoding="utf-8") as f:
        f.write(f"{stage} (pid {os.getpid()}, since {time.strftime('%H:%M:%S')})")
    for pattern in (".*.tmp*", ".*.old*", "*.tmp[0-9]*", "*/*.tmp[0-9]*"):
        for left in glob.glob(os.path.join(run_dir, pattern)):
            remove(left)  # a killed process's
    return lock


def run_main(main, args):
    """main(args) holding the run dir's lock; a failure is one line (exit 2 bad input, 1 a failed write, 130 Ctrl-C)."""
    stage, lock, fail = os.path.basename(sys.argv[0]) or "a stage", None, None
    try:
        lock = run_dir_lock(args.run_dir, stage)
        main(args)
    except UserError as e:
        fail = f"{e}", 2
    except KeyboardInterrupt:  # Ctrl-C: the shell's status for SIGINT, and nothing a later stage accepts
        fail = f"{stage} interrupted; its temporary files are removed, earlier artifacts untouched", 130
    except (IsADirectoryError, NotADirectoryError) as e:  # a run-dir entry of the wrong kind
        fail = (f"{e.filename2 or e.filename} is a folder where a file belongs, or a file where a folder belongs: "
                "remove or rename it, then re-run"), 2
    except Exception as e:
        if os_error(e) is None:
            raise  # a bug keeps its traceback
        fail = (f"{os_error(e)} while {stage} ran on --run_dir {args.run_dir}: free space (df -h {args.run_dir}) or "
                "fix the permissions, then re-run it; earlier artifacts are untouched"), 1
    finally:
        for path in TEMPORARY:
            remove(path)
        TEMPORARY.clear()
        if lock is not None:
            lock.release()
    if fail:
        print(f"error: {fail[0]}", file=sys.stderr)
        sys.exit(fail[1])


def in_range(kind, lo, hi, lo_open, text):
    """A flag's text as a finite `kind` in [lo, hi] ((lo, hi] with lo_open), else argparse's one line."""
    try:
        v = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
    if not math.isfinite(v) or lo is not None and (v <= lo if lo_open else v < lo) or hi is not None and v > hi:
        need = " and ".join(x for x in (lo is not None and f"{'>' if lo_open else '>='} {lo}",
                                        hi is not None and f"<= {hi}") if x)
        raise argparse.ArgumentTypeError(f"{v} is out of range: it must be a finite number {need}")
    return v


def number(kind=float, lo=None, hi=None, lo_open=False):
    """An argparse type checking its range (in_range)."""
    return functools.partial(in_range, kind, lo, hi, lo_open)


SEED = number(int, 0, 2**32 - 1)
COUNT = number(int, 1)  # steps, windows, a batch size
LENGTH = number(int, 2)  # tokens of a window: at least one predicted token
POSITIVE = number(float, 0, lo_open=True)  # a learning rate, a temperature
NONNEGATIVE = number(float, 0)


def set_seed(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def check_run_dir(run_dir):
    if os.path.exists(run_dir) and not os.path.isdir(run_dir):
        raise UserError(f"--run_dir {run_dir} is a file, not a folder: pass a folder path")
    try:
        os.makedirs(run_dir, exist_ok=True)
    except OSError as e:
        raise UserError(f"--run_dir {run_dir} cannot be created ({e.strerror}): pass a writable folder") from None
    if not os.access(run_dir, os.W_OK):
        raise UserError(f"--run_dir {run_dir} is not writable: pass a writable folder")


def pick_device(name):
    """auto: cuda when there is a GPU, else cpu; otherwise a cpu or cuda device this machine has."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r} is not a device: use auto, cpu, cuda or cuda:N") from None
    gpus = torch.cuda.device_count() if device.type == "cuda" and torch.cuda.is_available() else 0
    if device.type not in ("cpu", "cuda") or device.type == "cuda" and (device.index or 0) >= gpus:
        have = f"{gpus} CUDA GPU(s)" if gpus else "no CUDA GPU"
        raise UserError(f"--device {name}: stages run on the cpu or a CUDA GPU, and this machine has {have}: use "
                        "--device cpu or auto")
    return device


def sync(device):
    """Wait for the GPU's queued work, so a wall-clock timing covers it (no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize()


def compute_dtype(dtype, device):
    """The model's dtype, but float32 for half precision on the CPU (several times faster there without bf16 units)."""
    return torch.float32 if device.type == "cpu" and dtype in (torch.bfloat16, torch.float16) else dtype


def peak_gpu(device):
    """{"peak_gpu_bytes": the largest over the visible GPUs} for the manifests; {} on the CPU."""
    if device.type != "cuda":
        return {}
    return {"peak_gpu_bytes": max(torch.cuda.max_memory_allocated(i) for i in range(torch.cuda.device_count()))}


def max_positions(config):
    """The longest sequence the model takes, when its config says (None when it does not)."""
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        if isinstance(getattr(config, key, None), int):
            return getattr(config, key)
    return None


def check_seqlen(config, seqlen, flag="--seqlen"):
    limit = max_positions(config)
    if limit is not None and seqlen > limit:
        raise UserError(f"{flag} {seqlen} is longer than the model's {limit} positions: pass {flag} {limit} or less")


DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
