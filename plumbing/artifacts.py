"""Artifact I/O shared by the stages: every stage writes into a temporary folder of its own process and
swaps it in with a manifest that lists its files with their size and content hash (SHA-256); every later
stage reads through these functions, which check the hash, every JSON field it needs (presence and
type), every tensor (dtype kind, shape where the reader knows it, finiteness) and every index and scale
(range), so a missing, truncated, edited or corrupt artifact, or one made from another model or other
settings, is one line naming the file, the problem and the command that remakes it. JSON is written to a
temporary file and renamed. The run dir's lock (one process at a time) is cli.run_dir_lock.
"""
import hashlib
import json
import os
import shutil
import signal
import sys

import torch

from plumbing.cli import FORMAT_VERSION, TEMPORARY, UserError, check_run_dir


def crash_point(name):
    """Test hook: RANKALLOC_CRASH=name makes the process SIGKILL itself here, where a kill is most
    harmful (inside a folder swap or a JSON write), so the crash tests do not depend on timing."""
    if os.environ.get("RANKALLOC_CRASH") == name:
        os.kill(os.getpid(), signal.SIGKILL)


def file_hash(path):
    """SHA-256 of a file's bytes (first 16 hex digits): ~1 GB/s on one core, so checking the embedded model's
    decompose/ folder costs well under a second and a 7B model's (~25 GB) about half a minute per stage."""
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
    one with the same config and other weights is caught."""
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


NUMBER = (int, float)
TYPE_NAMES = {str: "a string", int: "an integer", dict: "an object", list: "a list", bool: "true/false",
              NUMBER: "a number"}


def check_fields(obj, schema, path, rerun):
    """Every key of `schema` present in the JSON object `obj`, of the type it names (bool is not an int)."""
    if not isinstance(obj, dict):
        raise UserError(f"{path} is damaged or incomplete (not a JSON object): re-run `{rerun}`")
    missing = [k for k in schema if k not in obj]
    if missing:
        raise UserError(f"{path} is damaged or incomplete (no {', '.join(missing)}): re-run `{rerun}`")
    for key, kind in schema.items():
        v = obj[key]
        if not isinstance(v, kind) or isinstance(v, bool) and kind is not bool:
            raise UserError(f"{path} is damaged: {key!r} is {type(v).__name__}, not {TYPE_NAMES[kind]}: re-run `{rerun}`")
    return obj


def read_json(path, rerun, keys=(), schema=None):
    """A JSON artifact whose `keys` (or `schema` {key: type}) are there, or one line naming the file and the
    command that remakes it."""
    if not os.path.isfile(path):
        raise UserError(f"{path} not found: run `{rerun}` first")
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except (ValueError, OSError):
        raise UserError(f"{path} is damaged or incomplete: re-run `{rerun}`") from None
    return check_fields(obj, schema or {k: object for k in keys}, path, rerun)


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

    def get(self, name, shape=None, kind="float"):
        """Tensor `name`, checked: kind "float" (finite values) or "int"; `shape` a tuple, None entries free."""
        try:
            t = self.f.get_tensor(name)
        except Exception:  # a tensor missing, or its bytes past the end of a truncated file
            self.damaged()
        return check_tensor(t, f"{self.path}: {name}", self.rerun, shape, kind)


class Shards:
    """The tensors of a sharded stage folder (one safetensors file per decoder block), one tensor at a time:
    `where` maps a tensor's prefix (a layer or group name) to its file, as the stage's manifest records
    it. One file is open at a time (stages read block by block); damage is one line, as in TensorFile."""

    def __init__(self, run_dir, stage, rerun, where, device="cpu", shape=None):
        """shape(name) -> the tuple a tensor must have (None entries free), or None: no shape check."""
        self.folder, self.rerun, self.where, self.device, self.open = os.path.join(run_dir, stage), rerun, where, device, {}
        self.shape = shape

    def get(self, name):
        prefix = name.rsplit(".", 1)[0]
        if prefix not in self.where:
            raise UserError(f"{self.folder} has no tensor {name}: re-run `{self.rerun}`")
        file = self.where[prefix]
        if file not in self.open:  # one file open at a time: a closed shard's mapped pages leave the process
            self.open = {file: TensorFile(os.path.join(self.folder, file), self.rerun, self.device)}
        return self.open[file].get(name, self.shape(name) if self.shape else None)

    __getitem__ = get  # a Shards serves where a {name: tensor} dict is expected


def check_tensor(t, what, rerun, shape=None, kind="float"):
    """One line naming the tensor when it is not of the kind, shape or finiteness its reader needs."""
    ok_kind = t.is_floating_point() if kind == "float" else not t.is_floating_point() and t.dtype != torch.bool
    if not ok_kind:
        raise UserError(f"{what} is {t.dtype}, not {'an' if kind == 'int' else 'a'} {kind} tensor: re-run `{rerun}`")
    if shape is not None and (t.dim() != len(shape) or any(s is not None and s != d for s, d in zip(shape, t.shape))):
        want = "(" + ", ".join("any" if s is None else str(s) for s in shape) + ")"
        raise UserError(f"{what} has shape {tuple(t.shape)}, not {want}: re-run `{rerun}`")
    if kind == "float" and not torch.isfinite(t).all():
        raise UserError(f"{what} holds NaN or inf: re-run `{rerun}`")
    return t


def read_ids(run_dir, whiten, vocab_size):
    """whiten/'s calibration windows (nsamples, seqlen), int64 token ids below the model's vocabulary."""
    rerun = f"python whiten.py --run_dir {run_dir}"
    path = f"{run_dir}/whiten/calib_ids.safetensors"
    ids = TensorFile(path, rerun).get("ids", shape=(whiten["nsamples"], whiten["seqlen"]), kind="int")
    if ids.numel() and not 0 <= int(ids.min()) <= int(ids.max()) < vocab_size:
        raise UserError(f"{path}: token ids outside the model's vocabulary 0..{vocab_size - 1}: re-run `{rerun}`")
    return ids


def factor_shapes(decomp):
    """The shape every tensor of decompose/ must have, from its manifest: U (m, k_max), sigma (>= k_max,),
    VtSinv (k_max, n)."""
    def shape(name):
        layer, _, what = name.rpartition(".")
        v = decomp["layers"].get(layer)
        if v is None:
            return None
        return {"U": (v["m"], v["k_max"]), "sigma": (None,), "VtSinv": (v["k_max"], v["n"])}.get(what)
    return shape


def read_tensors(path, rerun, keys=None, device="cpu", kind=lambda name: "float"):
    """{name: tensor} of a whole safetensors artifact (or of `keys`), through TensorFile; kind(name) -> "float" | "int"."""
    f = TensorFile(path, rerun, device)
    return {k: f.get(k, kind=kind(k)) for k in (f.names if keys is None else keys)}


def write_json(path, obj):
    """Write a temporary file, then rename it over `path`: a kill leaves the old file or the new one, and a
    failed write (a full disk) removes the temporary file and leaves the old one."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=1)
        crash_point("json")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def read_manifest(run_dir, stage, hint, reads=None):
    """Load DIR/stage/manifest.json and check that every file it lists is there, whole (size), and that the
    files this stage `reads` (names; None = all) have their recorded content hash: a stage never pays to
    hash an earlier stage's files it does not open (a 7B model's whiten/ is large)."""
    rerun = f"{hint} --run_dir {run_dir}"
    path = os.path.join(run_dir, stage, "manifest.json")
    manifest = read_json(path, rerun, schema={"stage": str, "format_version": int, "inputs": dict, "files": dict})
    if manifest["stage"] != stage or manifest["format_version"] != FORMAT_VERSION:
        raise UserError(f"{path} is not a {stage} manifest of format {FORMAT_VERSION}: re-run `{rerun}`")
    check_fields(manifest, MANIFEST[stage], path, rerun)
    for key, (kind, fields) in NESTED.get(stage, {}).items():
        for name, v in manifest[key].items():
            if kind is dict:
                check_fields(v, fields, f"{path} ({key} of {name})", rerun)
            elif not isinstance(v, kind) or kind is str and os.path.basename(v) != v:
                raise UserError(f"{path} is damaged: {key} of {name} is {v!r}: re-run `{rerun}`")
    for name, entry in manifest["files"].items():
        file = os.path.join(run_dir, stage, name)
        if os.path.basename(name) != name or not isinstance(entry, dict) or set(entry) != {"bytes", "sha256"}:
            raise UserError(f"{path} is damaged (its entry for {name!r}): re-run `{rerun}`")
        if not os.path.isfile(file) or os.path.getsize(file) != entry["bytes"]:
            raise UserError(f"{file} is damaged or incomplete (size): re-run `{rerun}`")
        if (reads is None or name in reads) and file_hash(file) != entry["sha256"]:
            raise UserError(f"{file} is damaged or was edited (content hash): re-run `{rerun}`")
    manifest["hash"] = file_hash(path)
    return manifest


# the fields each stage's manifest must hold (beyond stage, format_version, inputs, files), checked on
# every read, so a hand-edited manifest is one line and never a KeyError further on
MANIFEST = {
    "whiten": {"model": str, "config_hash": str, "weights_hash": str, "dtype": str, "nsamples": int, "seqlen": int,
               "whitening": str, "groups": dict, "shards": dict, "shapes": dict},
    "decompose": {"model": str, "factor_dtype": str, "layers": dict, "shards": dict},
    "allocation": {"method": str, "keep": NUMBER},
    "compressed": {"model": str, "params_original": int, "params_compressed": int, "kept_fraction_linear": NUMBER},
}
NESTED = {  # {key: (type of every value, fields of a value that is an object)}
    "whiten": {"groups": (str, None), "shards": (str, None)},
    "decompose": {"layers": (dict, {"m": int, "n": int, "k_star": int, "k_max": int}), "shards": (str, None)},
}


def check_parent(manifest, parent, run_dir, rerun):
    """The artifact must have been made from the parent artifact now on disk (chain of hashes)."""
    if manifest["inputs"].get(parent["stage"]) != parent["hash"]:
        raise UserError(f"{run_dir}/{manifest['stage']} was made from a different {parent['stage']}/ run "
                        f"(other model or settings): re-run `{rerun} --run_dir {run_dir}`")


def stage_dir(run_dir, stage):
    """A fresh temporary folder of this process; `commit_stage` moves it into place, so a failed run leaves
    nothing that a later stage would accept, and cli.run_main removes it when the stage fails."""
    check_run_dir(run_dir)
    tmp = os.path.join(run_dir, f".{stage}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    TEMPORARY.append(tmp)
    os.makedirs(tmp)
    return tmp


def commit_stage(run_dir, stage, tmp, manifest):
    """Manifest (listing every file, its size and its content hash) into the temporary folder, then the swap: old folder
    aside, new one in, old one deleted. A kill anywhere leaves either no stage folder (the next stage
    says which command to run) or a complete one, never a half-deleted folder with a manifest."""
    files = {f: {"bytes": os.path.getsize(os.path.join(tmp, f)), "sha256": file_hash(os.path.join(tmp, f))}
             for f in sorted(os.listdir(tmp))}
    manifest = {"stage": stage, "format_version": FORMAT_VERSION, "versions": versions(), **manifest,
                "files": files}
    write_json(os.path.join(tmp, "manifest.json"), manifest)
    crash_point("commit:before")
    final, old = os.path.join(run_dir, stage), os.path.join(run_dir, f".{stage}.old{os.getpid()}")
    shutil.rmtree(old, ignore_errors=True)
    if os.path.exists(final):
        os.replace(final, old)
    crash_point("commit:aside")
    os.replace(tmp, final)
    crash_point("commit:in")
    shutil.rmtree(old, ignore_errors=True)
    return final
