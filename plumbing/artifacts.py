"""The artifacts on disk (docs/METHODS.md §5): one pydantic model per artifact (strict: "3" is
not 3, NaN is refused; keys it does not name are informational), the shape, dtype and values of every tensor,
and the I/O: a stage writes a temporary folder of its own and swaps it in with a manifest listing every file's
size and SHA-256; a later stage reads through these functions, so a missing, truncated, edited or foreign
artifact is one line naming the file, the field and the command that remakes it.
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
from plumbing.cli import FORMAT_VERSION, TEMPORARY, UserError


# ----------------------------------------------------------------------------- the schema: one pydantic model per artifact

class Bad(ValueError):
    """A rule between fields or files broken (a ValueError: pydantic's own kind)."""


def same_keys(a, b, what_a, what_b):
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
    """A stage folder of safetensors shards, each a file its manifest lists."""
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
    def ids_listed(self):
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
        for name, v in self.layers.items():
            k_star = v.m * v.n // (v.m + v.n)  # methods/base.k_star: plumbing does not import methods
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


def same_shapes(a, b, what_a, what_b):
    same_keys(a, b, what_a, what_b)
    for name, shape in a.items():
        if list(shape) != list(b[name]):
            raise Bad(f"{what_a} gives {name} {list(shape)}, {what_b} {list(b[name])}")


# ----------------------------------------------------------------------------- the tensors

def whiten_shape(whiten):
    """{tensor: (shape, value rule, dtype)} in whiten/: a group leader's S, the packed lower triangle (n (n + 1) / 2,)
    with a positive diagonal under cholesky, (n, n) under eigh; float32."""
    width = {leader: whiten["shapes"][leader][1] for leader in set(whiten["groups"].values())}  # n of each leader
    if whiten["whitening"] == "cholesky":
        return {f"{g}.S": ((n * (n + 1) // 2,), cholesky, torch.float32) for g, n in width.items()}
    return {f"{g}.S": ((n, n), None, torch.float32) for g, n in width.items()}


def factor_shape(decomp):
    """{tensor: (shape, value rule, dtype)} in decompose/: U (m, k_max), VtSinv (k_max, n), sigma (min(m, n),)."""
    store, shapes = getattr(torch, decomp["factor_dtype"]), {}
    for name, v in decomp["layers"].items():
        shapes.update({f"{name}.U": ((v["m"], v["k_max"]), None, store), f"{name}.VtSinv": ((v["k_max"], v["n"]),
                       None, store), f"{name}.sigma": ((min(v["m"], v["n"]),), spectrum, torch.float64)})
    return shapes


def spectrum(t):
    """Why t is not a spectrum (non-negative, non-increasing: the order every allocator reads it in), or None."""
    if t.numel() and (float(t.min()) < 0 or bool((t[1:] > t[:-1]).any())):
        return "is not a spectrum (negative or increasing values)"


def cholesky(t):
    """Why t is not a packed lower triangle (n (n + 1) / 2,) with a positive diagonal, or None."""
    n = round((math.isqrt(8 * t.numel() + 1) - 1) / 2)
    diagonal = torch.arange(1, n + 1).cumsum(0) - 1  # row i's last entry: (i + 1)(i + 2) / 2 - 1
    if n and float(t[diagonal].min()) <= 0:
        return "is not a Cholesky factor (a diagonal entry <= 0)"


# ----------------------------------------------------------------------------- reading and writing

def file_hash(path):
    """SHA-256 of a file's bytes, first 16 hex digits."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def config_hash(model):
    """A model's config by content, not by the folder it was read from (`_name_or_path`)."""
    config = {k: v for k, v in model.config.to_dict().items() if k != "_name_or_path"}
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def weights_hash(model):
    """Every tensor's bytes in name order: a folder whose weights changed under the same config is caught."""
    h = hashlib.blake2b(digest_size=8)
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def check_model(model, whiten, rerun="python whiten.py"):
    """The model now on disk is the one whiten/ was made from: config, weights and the layers' shapes."""
    if config_hash(model) != whiten["config_hash"] or weights_hash(model) != whiten["weights_hash"]:
        raise UserError(f"model {whiten['model']!r} is not the one whiten/ was made from (other config or "
                        f"weights): re-run the pipeline from `{rerun}`")
    with one_line(rerun):
        same_shapes(whiten["shapes"], layer_shapes(find_linears(model)), "whiten/manifest.json 'shapes'", "the model")


def tensor_hash(t):
    return hashlib.blake2b(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes(), digest_size=8).hexdigest()


def versions():
    import transformers
    return {"python": sys.version.split()[0], "torch": torch.__version__, "transformers": transformers.__version__}


def read_json(path, rerun, spec=Model):
    """A JSON artifact that satisfies the pydantic model `spec`, returned as read (its informational keys too)."""
    if not os.path.isfile(path):
        raise UserError(f"{path} not found: run `{rerun}` first")
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except (ValueError, OSError):
        raise UserError(f"{path} is damaged or incomplete: re-run `{rerun}`") from None
    with one_line(rerun, f"{path} is damaged: "):
        spec.model_validate(obj)
    return obj


def say(e, whole="the file"):
    """A schema violation as `FIELD is VALUE: what is wrong` (FIELD e.g. 'layers'['q_proj']['m']), or a Bad's text."""
    if not isinstance(e, pydantic.ValidationError):
        return str(e)
    error = e.errors(include_url=False)[0]
    loc, kind, value = error["loc"], error["type"], error["input"]
    field = lambda loc: repr(loc[0]) + "".join(f"[{k!r}]" for k in loc[1:]) if loc else whole
    if kind == "missing":
        return f"{field(loc[:-1])} has no {loc[-1]!r}"
    if kind == "value_error":  # a validator's rule, in its words (a model validator's names its fields)
        why = str(error["ctx"]["error"])
        if not loc:
            return why
    else:  # model_type's own message names the model's class, which the user never sees
        why = "Input should be a valid dictionary" if kind == "model_type" else error["msg"]
    return f"{field(loc)} is {reprlib.repr(value)}: {why}"  # reprlib: a long value shortened


@contextlib.contextmanager
def one_line(rerun, prefix=""):
    """A schema violation inside the block becomes the stage's one error line and the command to re-run."""
    try:
        yield
    except (Bad, pydantic.ValidationError) as e:
        raise UserError(f"{prefix}{say(e)}: re-run `{rerun}`") from None


class TensorFile:
    """A safetensors artifact read one checked tensor at a time (so a stage can stream it)."""

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

    def get(self, name, shape=None, dtype=None, values=None):
        """Tensor `name` of `dtype` (None: any float) and `shape` (None entries free), finite, passing `values`."""
        try:
            t = self.f.get_tensor(name)
        except Exception:  # a tensor missing, or its bytes past the end of a truncated file
            self.damaged()
        integer = dtype is not None and not dtype.is_floating_point
        if t.is_floating_point() == integer or t.dtype == torch.bool:
            bad = f"is {t.dtype}, not {'an int' if integer else 'a float'} tensor"
        elif shape is not None and (t.dim() != len(shape) or any(s not in (None, d) for s, d in zip(shape, t.shape))):
            want = ", ".join("any" if s is None else str(s) for s in shape) + "," * (len(shape) == 1)
            bad = f"has shape {tuple(t.shape)}, not ({want})"
        elif t.is_floating_point() and not torch.isfinite(t).all():
            bad = "holds NaN or inf"
        elif dtype is not None and t.dtype != dtype:
            bad = f"is {t.dtype}, not the {dtype} its manifest implies"
        else:
            bad = values and values(t)
        if bad:
            raise UserError(f"{self.path}: {name} {bad}: re-run `{self.rerun}`")
        return t


class Shards:
    """The tensors of a sharded stage folder, one file open at a time (stages read block by block): `where`
    maps a tensor's prefix (a layer or group) to its file; shape: {tensor: (shape, value rule, dtype)} (a name
    it lacks: not in the manifest), None: no check."""

    def __init__(self, run_dir, stage, rerun, where, shape=None):
        self.folder, self.rerun, self.where = os.path.join(run_dir, stage), rerun, where
        self.shape, self.open = shape, {}

    def get(self, name):
        prefix = name.rsplit(".", 1)[0]
        rule = self.shape.get(name) if self.shape is not None else (None, None, None)
        if prefix not in self.where or rule is None:
            raise UserError(f"{self.folder} has no tensor {name} by its manifest: re-run `{self.rerun}`")
        file = self.where[prefix]
        if file not in self.open:  # a closed shard's mapped pages leave the process
            self.open = {file: TensorFile(os.path.join(self.folder, file), self.rerun)}
        shape, values, dtype = rule
        return self.open[file].get(name, shape, dtype, values)

    __getitem__ = get  # a Shards serves where a {name: tensor} dict is expected


def read_ids(run_dir, whiten, rows=None):
    """whiten/'s calibration windows (nsamples, seqlen): token ids in 0..rows - 1 (the embedding's rows, when known)."""
    def token_ids(t):  # why t is not token ids of the model, or None (a value rule, as spectrum and cholesky)
        if int(t.min()) < 0:  # never empty: its shape was checked first
            return "has negative token ids"
        if rows is not None and int(t.max()) >= rows:
            return f"has token ids outside the model's vocabulary 0..{rows - 1}"
    f = TensorFile(f"{run_dir}/whiten/calib_ids.safetensors", f"python whiten.py --run_dir {run_dir}")
    return f.get("ids", (whiten["nsamples"], whiten["seqlen"]), torch.int64, token_ids)


def read_tensors(path, rerun, keys=None, device="cpu", dtype=lambda name: None):
    """{name: tensor} of a whole safetensors artifact (or of `keys`); dtype(name) (None: any float)."""
    f = TensorFile(path, rerun, device)
    return {k: f.get(k, dtype=dtype(k)) for k in (f.names if keys is None else keys)}


def write_json(path, obj):
    """Through a temporary file and a rename: a kill or a full disk leaves the old file or the new one."""
    TEMPORARY.append(tmp := f"{path}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, allow_nan=False)  # strict JSON: a NaN is a bug, never a value
    os.replace(tmp, path)


def read_manifest(run_dir, stage, hint, reads=None):
    """DIR/stage/manifest.json, its files present and whole, those this stage `reads` (None: all) by content hash."""
    rerun = f"{hint} --run_dir {run_dir}"
    path = os.path.join(run_dir, stage, "manifest.json")
    manifest = read_json(path, rerun, Header)
    if manifest["stage"] != stage or manifest["format_version"] != FORMAT_VERSION:
        raise UserError(f"{path} is not a {stage} manifest of format {FORMAT_VERSION}: re-run `{rerun}`")
    with one_line(rerun, f"{path} is damaged: "):
        MANIFEST[stage].model_validate(manifest)
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


RERUN = {"whiten": "python whiten.py", "decompose": "python decompose.py", "allocation": "python learn_masks.py",
         "compressed": "python truncate.py"}


def read_chain(run_dir, *stages, reads=None):
    """{stage: manifest} of `stages` in pipeline order, each made from the one before it now on disk."""
    manifests = [read_manifest(run_dir, s, RERUN[s], reads=(reads or {}).get(s)) for s in stages]
    for parent, child in zip(manifests, manifests[1:]):
        rerun = f"{RERUN[child['stage']]} --run_dir {run_dir}"
        if child["inputs"].get(parent["stage"]) != parent["hash"]:
            raise UserError(f"{run_dir}/{child['stage']} was made from a different {parent['stage']}/ run "
                            f"(other model or settings): re-run `{rerun}`")
        if (child["stage"], parent["stage"]) == ("decompose", "whiten"):
            with one_line(rerun, f"{run_dir}/decompose/manifest.json is damaged: "):
                same_shapes({name: [v["m"], v["n"]] for name, v in child["layers"].items()}, parent["shapes"],
                            "decompose/manifest.json 'layers'", "whiten/manifest.json 'shapes'")
    return {m["stage"]: m for m in manifests}


def stage_dir(run_dir, stage):
    """A fresh temporary folder of this process, which commit_stage moves into place."""
    tmp = os.path.join(run_dir, f".{stage}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)  # a failed earlier call in this process (a stage's main run in-process)
    TEMPORARY.append(tmp)
    os.makedirs(tmp)
    return tmp


def commit_stage(run_dir, stage, tmp, manifest):
    """The manifest (every file's size and hash), then the swap: a kill leaves no stage folder or a complete one."""
    files = {f: {"bytes": os.path.getsize(os.path.join(tmp, f)), "sha256": file_hash(os.path.join(tmp, f))}
             for f in sorted(os.listdir(tmp))}
    manifest = {"stage": stage, "format_version": FORMAT_VERSION, "versions": versions(), **manifest, "files": files}
    write_json(os.path.join(tmp, "manifest.json"), manifest)
    final, old = os.path.join(run_dir, stage), os.path.join(run_dir, f".{stage}.old{os.getpid()}")
    shutil.rmtree(old, ignore_errors=True)
    if os.path.exists(final):
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    return final
