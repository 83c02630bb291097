"""The artifacts on disk: their schema and their I/O (docs/METHODS.md §5). Schema: one pydantic model per
artifact and input file, each JSON field's type and range (strict: "3" is not 3, true is not 1, NaN and inf
are refused; keys a model does not name are informational), the rules between fields as model validators,
and for every tensor the shape, dtype and value range that follow from the fields. I/O: every stage writes
into a temporary folder of its own process and swaps it in with a manifest that lists its files with their
size and content hash (SHA-256); every later stage reads through these functions, which check the hash, the
schema, every tensor and every index and scale, so a missing, truncated, edited or corrupt artifact, or one
made from another model or other settings, is one line naming the file, the field, the problem and the command
that remakes it. JSON is written to a temporary file and renamed. The run dir's lock is cli.run_dir_lock.
"""
import contextlib
import hashlib
import json
import math
import os
import reprlib
import shutil
import sys
from typing import Annotated, Any, Literal, TypeVar

import pydantic
import torch
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from plumbing.loading import find_linears, layer_shapes
from plumbing.cli import FORMAT_VERSION, TEMPORARY, UserError, check_run_dir


# ----------------------------------------------------------------------------- the schema: one pydantic model per artifact

class Bad(ValueError):
    """A rule between fields or files broken, the message naming the field (a ValueError: pydantic's own kind)."""


def same_keys(a, b, what_a, what_b):
    """Two name sets that must be equal: one line naming a name in one and not the other."""
    extra, missing = sorted(set(a) - set(b)), sorted(set(b) - set(a))
    if extra:
        raise Bad(f"{what_a} names {extra[0]!r}, which {what_b} does not have")
    if missing:
        raise Bad(f"{what_a} has no {missing[0]!r}, which {what_b} has")


def rank(v):
    if v != "dense" and (type(v) is not int or v < 1):  # type(): a bool is no rank
        raise ValueError('not "dense" or an integer rank >= 1')
    return v


T = TypeVar("T")
Named = Annotated[dict[str, T], Field(min_length=1)]  # a non-empty object {name: T}
Text = Annotated[str, Field(min_length=1)]
Count = Annotated[int, Field(ge=0)]
Positive = Annotated[int, Field(ge=1)]
Fraction = Annotated[float, Field(gt=0, le=1)]
Hash = Annotated[str, Field(pattern="^[0-9a-f]{16}$")]


class Model(BaseModel):
    model_config = ConfigDict(strict=True, allow_inf_nan=False)


# ----------------------------------------------------------------------------- the artifacts

class Entry(Model):
    bytes: Count
    sha256: Hash


class Header(Model):
    stage: Text
    format_version: int


class Manifest(Header):
    inputs: dict[str, Hash]
    files: Named[Entry]


class Sharded(Manifest):
    """A stage folder of safetensors shards, each a file its manifest lists (read_manifest checks that every
    listed name is a file in the stage's folder)."""
    shards: Named[Text]

    @model_validator(mode="after")
    def shards_listed(self):
        for name, f in self.shards.items():
            if f not in self.files:
                raise Bad(f"'shards'[{name!r}] is {f!r}, a file the manifest does not list")
        return self


class Whiten(Sharded):
    model: Text
    config_hash: Hash
    weights_hash: Hash
    dtype: Literal["float32", "bfloat16", "float16", "float64"]
    nsamples: Positive
    seqlen: Annotated[int, Field(ge=2)]
    whitening: Literal["cholesky", "eigh"]
    groups: Named[Text]
    shapes: Named[Annotated[list[Positive], Field(min_length=2, max_length=2)]]
    split: Literal["calib"]
    data_sha256: Hash  # the calibration text's content, so evaluate.py knows whether it scores the same text
    documents: list[Count] | Text  # the calibration documents' indices (a hub set: its split's name)

    @model_validator(mode="after")
    def groups_led_by_their_width(self):
        """Every group led by a layer of the same input width (they share one whitening), one shard per group."""
        same_keys(self.groups, self.shapes, "'groups'", "'shapes'")
        for name, leader in self.groups.items():
            if self.groups.get(leader) != leader:
                raise Bad(f"'groups'[{name!r}] is {leader!r}, not a layer that leads its own group")
            if self.shapes[leader][1] != self.shapes[name][1]:
                raise Bad(f"'groups'[{name!r}]: {leader!r} has another input width, so no shared whitening")
        same_keys(self.shards, set(self.groups.values()), "'shards'", "the group leaders of 'groups'")
        if "calib_ids.safetensors" not in self.files:
            raise Bad("'files' has no 'calib_ids.safetensors'")
        return self


class Layer(Model):
    m: Positive
    n: Positive
    k_star: Count
    k_max: Count


class Decompose(Sharded):
    model: Text
    factor_dtype: Literal["float32", "bfloat16"]
    kmax_mult: Annotated[float, Field(ge=1)]
    layers: Named[Layer]

    @model_validator(mode="after")
    def ranks_follow_shapes(self):
        """k* = floor(m n / (m + n)) <= k_max <= min(m, n) in every layer, one shard per layer."""
        for name, v in self.layers.items():
            k_star = v.m * v.n // (v.m + v.n)  # methods/budget.k_star: plumbing does not import methods
            if v.k_star != k_star:
                raise Bad(f"'layers'[{name!r}]: k_star {v.k_star} is not floor(m n / (m + n)) = {k_star}")
            if not v.k_star <= v.k_max <= min(v.m, v.n):
                raise Bad(f"'layers'[{name!r}]: k_max {v.k_max} is outside k_star..min(m, n) = "
                          f"{v.k_star}..{min(v.m, v.n)}")
        same_keys(self.shards, self.layers, "'shards'", "'layers'")
        return self


class Allocation(Manifest):
    method: Text
    keep: Fraction
    seed: Count


class Compressed(Manifest):
    model: Text
    params_original: Positive
    params_compressed: Positive
    kept_fraction_linear: Fraction

    @model_validator(mode="after")
    def not_larger(self):
        if self.params_compressed > self.params_original:
            raise Bad(f"'params_compressed' {self.params_compressed} exceeds 'params_original' "
                      f"{self.params_original}")
        return self


MANIFEST = {"whiten": Whiten, "decompose": Decompose, "allocation": Allocation, "compressed": Compressed}


class RANKS(Model):
    """allocation/ranks.json: a rank per layer and the allocation's label."""
    layers: Named[Annotated[Any, AfterValidator(rank)]]
    components: bool
    method: Text
    keep: Fraction


class LowRankConfig(Model):
    """What compressed/config.json adds to the original config."""
    lowrank_ranks: dict[str, Positive]


def same_shapes(a, b, what_a, what_b):
    """Two {layer: [m, n]} maps that must name the same layers with the same shapes."""
    same_keys(a, b, what_a, what_b)
    for name, shape in a.items():
        if list(shape) != list(b[name]):
            raise Bad(f"{what_a} gives {name} {list(shape)}, {what_b} {list(b[name])}")


# ----------------------------------------------------------------------------- the tensors

def whiten_shape(whiten):
    """name -> (shape, value rule, dtype) of every tensor in whiten/'s shards: S of a group leader with n
    inputs is the packed lower triangle (n (n + 1) / 2,) under cholesky, its diagonal positive (a Cholesky
    factor's is), or (n, n) under eigh; float32."""
    def rule(name):
        leader, _, what = name.rpartition(".")
        if what == "S" and whiten["groups"].get(leader) == leader:
            n = whiten["shapes"][leader][1]
            packed = whiten["whitening"] == "cholesky"
            return ((n * (n + 1) // 2,), "cholesky", torch.float32) if packed else ((n, n), None, torch.float32)
    return rule


def factor_shape(decomp):
    """name -> (shape, value rule, dtype) of decompose/'s tensors: U (m, k_max) and VtSinv (k_max, n) in its
    factor_dtype, sigma (min(m, n),) float64, non-negative and non-increasing (the order every allocator
    reads it in)."""
    store = getattr(torch, decomp["factor_dtype"])
    def rule(name):
        layer, _, what = name.rpartition(".")
        v = decomp["layers"].get(layer)
        if v is None:
            return None
        return {"U": ((v["m"], v["k_max"]), None, store), "VtSinv": ((v["k_max"], v["n"]), None, store),
                "sigma": ((min(v["m"], v["n"]),), "spectrum", torch.float64)}.get(what)
    return rule


def check_values(t, rule, what):
    """A float tensor's value rule beyond finiteness: 'spectrum' = non-negative, non-increasing; 'cholesky' =
    a packed lower triangle (row i holds i + 1 entries, the last on the diagonal) with a positive diagonal."""
    if rule == "spectrum" and t.numel() and (float(t.min()) < 0 or bool((t[1:] > t[:-1]).any())):
        raise Bad(f"{what} is not a spectrum (negative or increasing values)")
    if rule == "cholesky":
        n = round((math.isqrt(8 * t.numel() + 1) - 1) / 2)
        diagonal = torch.arange(1, n + 1).cumsum(0) - 1  # row i's last entry: (i + 1)(i + 2) / 2 - 1
        if n and float(t[diagonal].min()) <= 0:
            raise Bad(f"{what} is not a Cholesky factor (a diagonal entry <= 0)")


# ----------------------------------------------------------------------------- local input files

class TaskRow(Model):
    """A local zero-shot task's line: {"context": str, "choices": [str, str, ...], "label": int index}."""
    context: str
    choices: Annotated[list[str], Field(min_length=2)]
    label: Count

    @model_validator(mode="after")
    def label_in_choices(self):
        if self.label >= len(self.choices):
            raise Bad(f"'label' {self.label} is not an index into its {len(self.choices)} choices")
        return self


# ----------------------------------------------------------------------------- reading and writing

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
        same_shapes(whiten["shapes"], layer_shapes(find_linears(model)), "whiten/manifest.json 'shapes'",
                           "the model")


def tensor_hash(t):
    return hashlib.blake2b(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes(), digest_size=8).hexdigest()


def versions():
    import transformers
    return {"python": sys.version.split()[0], "torch": torch.__version__, "transformers": transformers.__version__}


def read_json(path, rerun, spec=Model):
    """A JSON artifact that satisfies its schema `spec` (a model of plumbing/py; by default any
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
    """What a schema violation says: a Bad's own text, or pydantic's first error as `FIELD is VALUE: what
    is wrong`, FIELD its place in the `whole` ('layers'['q_proj']['m'])."""
    if not isinstance(e, pydantic.ValidationError):
        return str(e)
    error = e.errors(include_url=False)[0]
    loc, kind, value = error["loc"], error["type"], error["input"]
    field = lambda loc: repr(loc[0]) + "".join(f"[{k!r}]" for k in loc[1:]) if loc else whole
    if kind == "missing":
        return f"{field(loc[:-1])} has no {loc[-1]!r}"
    if kind == "value_error":  # a rule of py, in its words: a model validator's (no loc) names the fields
        why = str(error["ctx"]["error"])
        if not loc:
            return why
    else:  # model_type's own message names the model's class, which the user never sees
        why = "Input should be a valid dictionary" if kind == "model_type" else error["msg"]
    return f"{field(loc)} is {reprlib.repr(value)}: {why}"  # reprlib: a long value shortened


@contextlib.contextmanager
def one_line(rerun, prefix=""):
    """A schema violation (Bad, pydantic's ValidationError) inside the block becomes the stage's one error
    line (say) and the command to re-run."""
    try:
        yield
    except (Bad, pydantic.ValidationError) as e:
        raise UserError(f"{prefix}{say(e)}: re-run `{rerun}`") from None


def check(spec, obj, path, rerun):
    """obj against a model of plumbing/py: a violation is one line naming the file and the field. Returns
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
        `values` a value rule of plumbing/py (check_values); `dtype` the one its manifest implies."""
        try:
            t = self.f.get_tensor(name)
        except Exception:  # a tensor missing, or its bytes past the end of a truncated file
            self.damaged()
        t = check_tensor(t, f"{self.path}: {name}", self.rerun, shape, kind)
        if dtype is not None and t.dtype != dtype:
            raise UserError(f"{self.path}: {name} is {t.dtype}, not the {dtype} its manifest implies: re-run `{self.rerun}`")
        with one_line(self.rerun):
            check_values(t, values, f"{self.path}: {name}")
        return t


class Shards:
    """The tensors of a sharded stage folder (one safetensors file per decoder block), one tensor at a time:
    `where` maps a tensor's prefix (a layer or group name) to its file, as the stage's manifest records
    it. One file is open at a time (stages read block by block); damage is one line, as in TensorFile."""

    def __init__(self, run_dir, stage, rerun, where, device="cpu", shape=None):
        """shape(name) -> (the tuple a tensor must have, its value rule, its dtype) (whiten_shape,
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
            json.dump(obj, f, indent=1, allow_nan=False)  # strict JSON: a NaN is a bug, never a value
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
    manifest = read_json(path, rerun, Header)
    if manifest["stage"] != stage or manifest["format_version"] != FORMAT_VERSION:
        raise UserError(f"{path} is not a {stage} manifest of format {FORMAT_VERSION}: re-run `{rerun}`")
    check(MANIFEST[stage], manifest, path, rerun)
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
            same_shapes({name: [v["m"], v["n"]] for name, v in manifest["layers"].items()}, parent["shapes"],
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
