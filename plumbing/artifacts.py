"""Artifact I/O shared by the stages: every stage writes into a temporary folder of its own process and
swaps it in with a manifest that lists its files with their size and content hash (SHA-256); every later
stage reads through these functions, which check the hash, every JSON field it needs (presence and
type), every tensor (dtype kind, shape where the reader knows it, finiteness) and every index and scale
(range), so a missing, truncated, edited or corrupt artifact, or one made from another model or other
settings, is one line naming the file, the problem and the command that remakes it. JSON is written to a
temporary file and renamed. The run dir's lock (one process at a time) is cli.run_dir_lock.
"""
import contextlib
import hashlib
import json
import os
import reprlib
import shutil
import sys

import pydantic
import torch

from plumbing import schema
from plumbing.layers import find_linears, layer_shapes
from plumbing.cli import FORMAT_VERSION, TEMPORARY, UserError, check_run_dir


def file_hash(path):
    """SHA-256 of a file's bytes (first 16 hex digits): ~1 GB/s on one core, so checking the embedded model's
    decompose/ folder costs well under a second and a 7B model's (~25 GB) about half a minute per stage."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def config_hash(model):
    """Fingerprint of a model's config, to catch artifacts made from another model: its content, not the
    folder it was read from (`_name_or_path`), so a moved model or a re-keyed cache folder is the same model."""
    config = {k: v for k, v in model.config.to_dict().items() if k != "_name_or_path"}
    text = json.dumps(config, sort_keys=True, default=str)
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
    """The model now on disk must be the one whiten/ was made from: same config, same weights, and the layers
    whiten/'s manifest names with the shapes it gives them."""
    if config_hash(model) != whiten["config_hash"] or weights_hash(model) != whiten["weights_hash"]:
        raise UserError(f"model {whiten['model']!r} is not the one whiten/ was made from (other config or "
                        f"weights): re-run the pipeline from `{rerun}`")
    with one_line(rerun):
        schema.same_shapes(whiten["shapes"], layer_shapes(find_linears(model)), "whiten/manifest.json 'shapes'",
                           "the model")


def tensor_hash(t):
    return hashlib.blake2b(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes(), digest_size=8).hexdigest()


def versions():
    import transformers
    return {"python": sys.version.split()[0], "torch": torch.__version__, "transformers": transformers.__version__}


def read_json(path, rerun, spec=schema.Model):
    """A JSON artifact that satisfies its schema `spec` (a model of plumbing/schema.py; by default any
    object), or one line naming the file, the field and the command that remakes it."""
    if not os.path.isfile(path):
        raise UserError(f"{path} not found: run `{rerun}` first")
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except (ValueError, OSError):
        raise UserError(f"{path} is damaged or incomplete: re-run `{rerun}`") from None
    return check(spec, obj, path, rerun)


def say(e, whole="the file"):
    """What a schema violation says: a schema.Bad's own text, or pydantic's first error as `FIELD is VALUE: what
    is wrong`, FIELD its place in the `whole` ('layers'['q_proj']['m'])."""
    if not isinstance(e, pydantic.ValidationError):
        return str(e)
    error = e.errors(include_url=False)[0]
    loc, kind, value = error["loc"], error["type"], error["input"]
    field = lambda loc: repr(loc[0]) + "".join(f"[{k!r}]" for k in loc[1:]) if loc else whole
    if kind == "missing":
        return f"{field(loc[:-1])} has no {loc[-1]!r}"
    if kind == "value_error":  # a rule of schema.py, in its words: a model validator's (no loc) names the fields
        why = str(error["ctx"]["error"])
        if not loc:
            return why
    else:  # model_type's own message names the model's class, which the user never sees
        why = "Input should be a valid dictionary" if kind == "model_type" else error["msg"]
    return f"{field(loc)} is {reprlib.repr(value)}: {why}"  # reprlib: a long value shortened


@contextlib.contextmanager
def one_line(rerun, prefix=""):
    """A schema violation (schema.Bad, pydantic's ValidationError) inside the block becomes the stage's one error
    line (say) and the command to re-run."""
    try:
        yield
    except (schema.Bad, pydantic.ValidationError) as e:
        raise UserError(f"{prefix}{say(e)}: re-run `{rerun}`") from None


def check(spec, obj, path, rerun):
    """obj against a model of plumbing/schema.py: a violation is one line naming the file and the field. Returns
    obj itself, its informational keys included."""
    with one_line(rerun, f"{path} is damaged: "):
        spec.model_validate(obj)
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

    def get(self, name, shape=None, kind="float", values=None, dtype=None):
        """Tensor `name`, checked: kind "float" (finite values) or "int"; `shape` a tuple, None entries free;
        `values` a value rule of plumbing/schema.py (check_values); `dtype` the one its manifest implies."""
        try:
            t = self.f.get_tensor(name)
        except Exception:  # a tensor missing, or its bytes past the end of a truncated file
            self.damaged()
        t = check_tensor(t, f"{self.path}: {name}", self.rerun, shape, kind)
        if dtype is not None and t.dtype != dtype:
            raise UserError(f"{self.path}: {name} is {t.dtype}, not the {dtype} its manifest implies: re-run `{self.rerun}`")
        with one_line(self.rerun):
            schema.check_values(t, values, f"{self.path}: {name}")
        return t


class Shards:
    """The tensors of a sharded stage folder (one safetensors file per decoder block), one tensor at a time:
    `where` maps a tensor's prefix (a layer or group name) to its file, as the stage's manifest records
    it. One file is open at a time (stages read block by block); damage is one line, as in TensorFile."""

    def __init__(self, run_dir, stage, rerun, where, device="cpu", shape=None):
        """shape(name) -> (the tuple a tensor must have, its value rule, its dtype) (schema.whiten_shape,
        factor_shape); a name it does not know (None) is refused; shape=None: no check."""
        self.folder, self.rerun, self.where, self.device, self.open = os.path.join(run_dir, stage), rerun, where, device, {}
        self.shape = shape

    def get(self, name):
        prefix = name.rsplit(".", 1)[0]
        if prefix not in self.where:
            raise UserError(f"{self.folder} has no tensor {name}: re-run `{self.rerun}`")
        file = self.where[prefix]
        rule = self.shape(name) if self.shape else (None, None, None)
        if rule is None:
            raise UserError(f"{self.folder} has no tensor {name} by its manifest: re-run `{self.rerun}`")
        if file not in self.open:  # one file open at a time: a closed shard's mapped pages leave the process
            self.open = {file: TensorFile(os.path.join(self.folder, file), self.rerun, self.device)}
        shape, values, dtype = rule
        return self.open[file].get(name, shape, values=values, dtype=dtype)

    __getitem__ = get  # a Shards serves where a {name: tensor} dict is expected


def check_tensor(t, what, rerun, shape=None, kind="float"):
    """One line naming the tensor when it is not of the kind, shape or finiteness its reader needs."""
    ok_kind = t.is_floating_point() if kind == "float" else not t.is_floating_point() and t.dtype != torch.bool
    if not ok_kind:
        raise UserError(f"{what} is {t.dtype}, not {'an' if kind == 'int' else 'a'} {kind} tensor: re-run `{rerun}`")
    if shape is not None and (t.dim() != len(shape) or any(s is not None and s != d for s, d in zip(shape, t.shape))):
        want = "(" + ", ".join("any" if s is None else str(s) for s in shape) + ("," if len(shape) == 1 else "") + ")"
        raise UserError(f"{what} has shape {tuple(t.shape)}, not {want}: re-run `{rerun}`")
    if kind == "float" and not torch.isfinite(t).all():
        raise UserError(f"{what} holds NaN or inf: re-run `{rerun}`")
    return t


def read_ids(run_dir, whiten):
    """whiten/'s calibration windows (nsamples, seqlen), non-negative int64 token ids."""
    rerun = f"python whiten.py --run_dir {run_dir}"
    path = f"{run_dir}/whiten/calib_ids.safetensors"
    ids = TensorFile(path, rerun).get("ids", shape=(whiten["nsamples"], whiten["seqlen"]), kind="int", dtype=torch.int64)
    if ids.numel() and int(ids.min()) < 0:
        raise UserError(f"{path}: negative token ids: re-run `{rerun}`")
    return ids


def check_vocabulary(ids, rows, run_dir):
    """Calibration ids below the model's embedding rows."""
    if ids.numel() and int(ids.max()) >= rows:
        raise UserError(f"{run_dir}/whiten/calib_ids.safetensors: token ids outside the model's vocabulary "
                        f"0..{rows - 1}: re-run `python whiten.py --run_dir {run_dir}`")


def read_tensors(path, rerun, keys=None, device="cpu", kind=lambda name: "float", dtype=lambda name: None):
    """{name: tensor} of a whole safetensors artifact (or of `keys`), through TensorFile; kind(name) -> "float" |
    "int"; dtype(name) -> the dtype it must have, or None."""
    f = TensorFile(path, rerun, device)
    return {k: f.get(k, kind=kind(k), dtype=dtype(k)) for k in (f.names if keys is None else keys)}


def write_json(path, obj):
    """Write a temporary file, then rename it over `path`: a kill leaves the old file or the new one, and a
    failed write (a full disk) removes the temporary file and leaves the old one."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=1)
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
    manifest = read_json(path, rerun, schema.Header)
    if manifest["stage"] != stage or manifest["format_version"] != FORMAT_VERSION:
        raise UserError(f"{path} is not a {stage} manifest of format {FORMAT_VERSION}: re-run `{rerun}`")
    check(schema.MANIFEST[stage], manifest, path, rerun)
    for name, entry in manifest["files"].items():
        file = os.path.join(run_dir, stage, name)
        if os.path.basename(name) != name or name in (".", ".."):
            raise UserError(f"{path} is damaged (its entry for {name!r}): re-run `{rerun}`")
        if not os.path.isfile(file) or os.path.getsize(file) != entry["bytes"]:
            raise UserError(f"{file} is damaged or incomplete (size): re-run `{rerun}`")
        if (reads is None or name in reads) and file_hash(file) != entry["sha256"]:
            raise UserError(f"{file} is damaged or was edited (content hash): re-run `{rerun}`")
    manifest["hash"] = file_hash(path)
    return manifest


def check_parent(manifest, parent, run_dir, rerun):
    """The artifact must have been made from the parent artifact now on disk (chain of hashes), and
    decompose/'s layers must be whiten/'s, with the same shapes."""
    if manifest["inputs"].get(parent["stage"]) != parent["hash"]:
        raise UserError(f"{run_dir}/{manifest['stage']} was made from a different {parent['stage']}/ run "
                        f"(other model or settings): re-run `{rerun} --run_dir {run_dir}`")
    if (manifest["stage"], parent["stage"]) == ("decompose", "whiten"):
        with one_line(f"{rerun} --run_dir {run_dir}", f"{run_dir}/decompose/manifest.json is damaged: "):
            schema.same_shapes({name: [v["m"], v["n"]] for name, v in manifest["layers"].items()}, parent["shapes"],
                               "decompose/manifest.json 'layers'", "whiten/manifest.json 'shapes'")


RERUN = {"whiten": "python whiten.py", "decompose": "python decompose.py", "allocation": "python learn_masks.py",
         "compressed": "python truncate.py"}


def read_chain(run_dir, *stages, reads=None):
    """{stage: manifest} for `stages` in pipeline order, each read (read_manifest; reads: {stage: the files this
    stage opens}, default all) and then each checked against the one before it (check_parent)."""
    reads = reads or {}
    manifests = [read_manifest(run_dir, s, RERUN[s], reads=reads.get(s)) for s in stages]
    for parent, child in zip(manifests, manifests[1:]):
        check_parent(child, parent, run_dir, RERUN[child["stage"]])
    return {m["stage"]: m for m in manifests}


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
    final, old = os.path.join(run_dir, stage), os.path.join(run_dir, f".{stage}.old{os.getpid()}")
    shutil.rmtree(old, ignore_errors=True)
    if os.path.exists(final):
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    return final
