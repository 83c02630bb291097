"""Artifact I/O shared by the stages: every stage writes into a temporary folder and swaps it in
with a manifest that lists its files; every later stage reads through these functions, so a missing,
truncated or corrupt artifact, or one made from another model or other settings, is one line naming
the file and the command that remakes it. JSON is written to a temporary file and renamed.
"""
import hashlib
import json
import os
import shutil
import signal
import sys

import torch

from common import FORMAT_VERSION, UserError, check_run_dir


def crash_point(name):
    """Test hook: RANKALLOC_CRASH=name makes the process SIGKILL itself here, where a kill is most
    harmful (inside a folder swap or a JSON write), so the crash tests do not depend on timing."""
    if os.environ.get("RANKALLOC_CRASH") == name:
        os.kill(os.getpid(), signal.SIGKILL)


def file_hash(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def config_hash(model):
    """Fingerprint of a model's config, to catch artifacts made from another model."""
    text = json.dumps(model.config.to_dict(), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def weights_hash(model):
    """Fingerprint of the weights themselves (every tensor's bytes, in name order): a folder replaced by
    one with the same config and other weights is caught. ~1 s per GB."""
    h = hashlib.blake2b(digest_size=8)
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def check_model(model, whiten, rerun="python whiten.py"):
    """The model now on disk must be the one whiten/ was made from: same config, same weights."""
    if config_hash(model) != whiten["config_hash"] or weights_hash(model) != whiten["weights_hash"]:
        raise UserError(f"model {whiten['model']!r} is not the one whiten/ was made from (other config or "
                        f"weights): re-run the pipeline from `{rerun}`")


def tensor_hash(t):
    return hashlib.blake2b(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes(), digest_size=8).hexdigest()


def versions():
    import transformers
    return {"python": sys.version.split()[0], "torch": torch.__version__, "transformers": transformers.__version__}


def read_json(path, rerun, keys=()):
    """A JSON artifact, or one line naming the file and the command that remakes it."""
    if not os.path.isfile(path):
        raise UserError(f"{path} not found: run `{rerun}` first")
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except (ValueError, OSError):
        raise UserError(f"{path} is damaged or incomplete: re-run `{rerun}`") from None
    missing = [k for k in keys if not isinstance(obj, dict) or k not in obj]
    if missing:
        raise UserError(f"{path} is damaged or incomplete (no {', '.join(missing)}): re-run `{rerun}`")
    return obj


class TensorFile:
    """A safetensors artifact read one tensor at a time (so a stage can stream it); a missing,
    truncated or corrupt file, or a missing tensor, is one line naming the file and the command
    that remakes it."""

    def __init__(self, path, rerun, device="cpu"):
        from safetensors import safe_open
        self.path, self.rerun = path, rerun
        if not os.path.isfile(path):
            raise UserError(f"{path} not found: re-run `{rerun}`")
        try:
            self.f = safe_open(path, "pt", device=str(device))
            self.names = list(self.f.keys())
        except Exception:  # SafetensorError: bad header, truncated file
            self.damaged()

    def damaged(self):
        raise UserError(f"{self.path} is damaged or incomplete: re-run `{self.rerun}`") from None

    def get(self, name):
        try:
            return self.f.get_tensor(name)
        except Exception:  # a tensor missing, or its bytes past the end of a truncated file
            self.damaged()


class Shards:
    """The tensors of a sharded stage folder (one safetensors file per decoder block), one tensor at a time:
    `where` maps a tensor's prefix (a layer or group name) to its file, as the stage's manifest records
    it. One file is open at a time (stages read block by block); damage is one line, as in TensorFile."""

    def __init__(self, run_dir, stage, rerun, where, device="cpu"):
        self.folder, self.rerun, self.where, self.device, self.open = os.path.join(run_dir, stage), rerun, where, device, {}

    def get(self, name):
        prefix = name.rsplit(".", 1)[0]
        if prefix not in self.where:
            raise UserError(f"{self.folder} has no tensor {name}: re-run `{self.rerun}`")
        file = self.where[prefix]
        if file not in self.open:  # one file open at a time: a closed shard's mapped pages leave the process
            self.open = {file: TensorFile(os.path.join(self.folder, file), self.rerun, self.device)}
        return self.open[file].get(name)

    __getitem__ = get  # a Shards serves where a {name: tensor} dict is expected


def read_tensors(path, rerun, keys=None, device="cpu"):
    """{name: tensor} of a whole safetensors artifact (or of `keys`), through TensorFile."""
    f = TensorFile(path, rerun, device)
    return {k: f.get(k) for k in (f.names if keys is None else keys)}


def write_json(path, obj):
    """Write a temporary file, then rename it over `path`: a kill leaves the old file or the new one."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    crash_point("json")
    os.replace(tmp, path)


def read_manifest(run_dir, stage, hint):
    """Load DIR/stage/manifest.json and check that every file it lists is there, whole."""
    rerun = f"{hint} --run_dir {run_dir}"
    path = os.path.join(run_dir, stage, "manifest.json")
    manifest = read_json(path, rerun, keys=("stage", "format_version", "inputs", "files"))
    if manifest.get("stage") != stage or manifest.get("format_version") != FORMAT_VERSION:
        raise UserError(f"{path} is not a {stage} manifest of format {FORMAT_VERSION}: re-run `{rerun}`")
    for name, size in manifest["files"].items():
        file = os.path.join(run_dir, stage, name)
        if not os.path.isfile(file) or os.path.getsize(file) != size:
            raise UserError(f"{file} is damaged or incomplete: re-run `{rerun}`")
    manifest["hash"] = file_hash(path)
    return manifest


def check_parent(manifest, parent, run_dir, rerun):
    """The artifact must have been made from the parent artifact now on disk (chain of hashes)."""
    if manifest["inputs"].get(parent["stage"]) != parent["hash"]:
        raise UserError(f"{run_dir}/{manifest['stage']} was made from a different {parent['stage']}/ run "
                        f"(other model or settings): re-run `{rerun} --run_dir {run_dir}`")


def stage_dir(run_dir, stage):
    """A fresh temporary folder; `commit_stage` moves it into place, so a failed run leaves nothing
    that a later stage would accept."""
    check_run_dir(run_dir)
    tmp = os.path.join(run_dir, f".{stage}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    return tmp


def commit_stage(run_dir, stage, tmp, manifest):
    """Manifest (listing every file and its size) into the temporary folder, then the swap: old folder
    aside, new one in, old one deleted. A kill anywhere leaves either no stage folder (the next stage
    says which command to run) or a complete one, never a half-deleted folder with a manifest."""
    files = {f: os.path.getsize(os.path.join(tmp, f)) for f in sorted(os.listdir(tmp))}
    manifest = {"stage": stage, "format_version": FORMAT_VERSION, "versions": versions(), **manifest,
                "files": files}
    write_json(os.path.join(tmp, "manifest.json"), manifest)
    crash_point("commit:before")
    final, old = os.path.join(run_dir, stage), os.path.join(run_dir, f".{stage}.old")
    shutil.rmtree(old, ignore_errors=True)
    if os.path.exists(final):
        os.replace(final, old)
    crash_point("commit:aside")
    os.replace(tmp, final)
    crash_point("commit:in")
    shutil.rmtree(old, ignore_errors=True)
    return final
