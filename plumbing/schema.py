"""One pydantic model per artifact and input file (docs/METHODS.md §5): each JSON field's type and range (strict:
"3" is not 3, true is not 1, NaN and inf are refused; keys a model does not name are informational), the rules
between fields as model validators, and for every tensor the shape, dtype and value range that follow from the
fields. artifacts.py turns the first violation into one line naming the file, the field and the command that
remakes it, never a KeyError or a reshape traceback further on.
"""
import math
from typing import Annotated, Any, Literal, TypeVar

import torch
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator


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
