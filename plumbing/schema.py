"""One schema per artifact and input file (docs/METHODS.md §5): for every JSON field its type and range,
for every tensor the shape, dtype and value range that follow from the OTHER fields (a packed triangle or
a full matrix by `whitening`, k_max from the factors, the vocabulary for the ids), and the cross-field
rules (k* from m and n, every shard a listed file, every group led by a layer of the same input width).
artifacts.py's readers are the only callers: a violation is one line naming the file, the field and the
command that remakes it, never a KeyError or a reshape traceback further on.

A spec is a function check(value, where) that raises Bad(where + what is wrong) or returns the value.
"""
import math
import os

import torch


class Bad(ValueError):
    """A value that breaks its schema: the message names the field (its path inside the file)."""


def _at(where, key):
    return f"{where}[{key!r}]" if where else repr(key)


def integer(lo=None, hi=None):
    def check(v, where):
        if not isinstance(v, int) or isinstance(v, bool):
            raise Bad(f"{where} is {v!r}, not an integer")
        if lo is not None and v < lo or hi is not None and v > hi:
            raise Bad(f"{where} is {v}, outside {lo if lo is not None else '-inf'}..{hi if hi is not None else 'inf'}")
        return v
    return check


def number(lo=None, hi=None, lo_open=False):
    """A finite int or float in [lo, hi] ((lo, hi] with lo_open); JSON's NaN and Infinity are refused."""
    def check(v, where):
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
            raise Bad(f"{where} is {v!r}, not a finite number")
        if lo is not None and (v < lo or lo_open and v == lo) or hi is not None and v > hi:
            raise Bad(f"{where} is {v}, outside {'(' if lo_open else '['}{lo}, {hi}]")
        return v
    return check


def string(choices=None, nonempty=True, filename=False, hexdigits=None):
    def check(v, where):
        if not isinstance(v, str):
            raise Bad(f"{where} is {v!r}, not a string")
        if choices is not None and v not in choices:
            raise Bad(f"{where} is {v!r}, not one of {', '.join(map(repr, choices))}")
        if nonempty and not v:
            raise Bad(f"{where} is empty")
        if filename and (os.path.basename(v) != v or v in (".", "..")):
            raise Bad(f"{where} is {v!r}, not a file name in the stage's folder")
        if hexdigits and (len(v) != hexdigits or any(c not in "0123456789abcdef" for c in v)):
            raise Bad(f"{where} is {v!r}, not {hexdigits} hex digits")
        return v
    return check


def boolean():
    def check(v, where):
        if not isinstance(v, bool):
            raise Bad(f"{where} is {v!r}, not true/false")
        return v
    return check


def either(*specs, what):
    def check(v, where):
        for spec in specs:
            try:
                return spec(v, where)
            except Bad:
                pass
        raise Bad(f"{where} is {v!r}, not {what}")
    return check


def pair(spec):
    """A list of two values, each checked by spec (a layer's [m, n])."""
    def check(v, where):
        if not isinstance(v, list) or len(v) != 2:
            raise Bad(f"{where} is {v!r}, not a list of two")
        return [spec(x, f"{where}[{i}]") for i, x in enumerate(v)]
    return check


def mapping(value, nonempty=True):
    """An object {name: value}, every value checked by `value`."""
    def check(v, where):
        if not isinstance(v, dict):
            raise Bad(f"{where} is {type(v).__name__}, not an object")
        if nonempty and not v:
            raise Bad(f"{where} is empty")
        for k, x in v.items():
            value(x, _at(where, k))
        return v
    return check


def fields(**spec):
    """An object holding at least these keys, each checked (keys not named are free: informational)."""
    def check(v, where):
        if not isinstance(v, dict):
            raise Bad(f"{where or 'the file'} is {type(v).__name__}, not a JSON object")
        for k, s in spec.items():
            if k not in v:
                raise Bad(f"{where or 'the file'} has no {k!r}")
            s(v[k], _at(where, k))
        return v
    return check


def same_keys(a, b, what_a, what_b):
    """Two name sets that must be equal: one line naming a name in one and not the other."""
    extra, missing = sorted(set(a) - set(b)), sorted(set(b) - set(a))
    if extra:
        raise Bad(f"{what_a} names {extra[0]!r}, which {what_b} does not have")
    if missing:
        raise Bad(f"{what_a} has no {missing[0]!r}, which {what_b} has")


# ----------------------------------------------------------------------------- the artifacts

FILES = mapping(fields(bytes=integer(0), sha256=string(hexdigits=16)))
COMMON = dict(format_version=integer(), inputs=mapping(string(hexdigits=16), nonempty=False), files=FILES)
DTYPES = ("float32", "bfloat16", "float16", "float64")

MANIFEST = {
    "whiten": fields(**COMMON, model=string(), config_hash=string(hexdigits=16), weights_hash=string(hexdigits=16),
                     dtype=string(DTYPES), nsamples=integer(1), seqlen=integer(2),
                     whitening=string(("cholesky", "eigh")), groups=mapping(string()),
                     shards=mapping(string(filename=True)), shapes=mapping(pair(integer(1)))),
    "decompose": fields(**COMMON, model=string(), factor_dtype=string(("float32", "bfloat16")), kmax_mult=number(1),
                        layers=mapping(fields(m=integer(1), n=integer(1), k_star=integer(0), k_max=integer(0))),
                        shards=mapping(string(filename=True))),
    "allocation": fields(**COMMON, method=string(), keep=number(0, 1, lo_open=True), seed=integer(0)),
    "compressed": fields(**COMMON, model=string(), params_original=integer(1), params_compressed=integer(1),
                         kept_fraction_linear=number(0, 1, lo_open=True)),
}

RANK = either(string(("dense",)), integer(1), what='"dense" or an integer rank >= 1')
RANKS = fields(layers=mapping(RANK), components=boolean(), method=string(), keep=number(0, 1, lo_open=True))


def cross_check(stage, m):
    """The rules between one manifest's own fields."""
    from methods.base import k_star  # at call time: the methods package imports plumbing
    files = m["files"]
    for key in ("shards",):
        for name, f in m.get(key, {}).items():
            if f not in files:
                raise Bad(f"{_at(key, name)} is {f!r}, a file the manifest does not list")
    if stage == "whiten":
        same_keys(m["groups"], m["shapes"], "'groups'", "'shapes'")
        for name, leader in m["groups"].items():
            if leader not in m["shapes"] or m["groups"][leader] != leader:
                raise Bad(f"{_at('groups', name)} is {leader!r}, not a layer that leads its own group")
            if m["shapes"][leader][1] != m["shapes"][name][1]:
                raise Bad(f"{_at('groups', name)}: {leader!r} has another input width, so no shared whitening")
        same_keys(m["shards"], set(m["groups"].values()), "'shards'", "the group leaders of 'groups'")
        if "calib_ids.safetensors" not in files:
            raise Bad("'files' has no 'calib_ids.safetensors'")
    if stage == "decompose":
        for name, v in m["layers"].items():
            if v["k_star"] != k_star(v["m"], v["n"]):
                raise Bad(f"{_at('layers', name)}: k_star {v['k_star']} is not floor(m n / (m + n)) = "
                          f"{k_star(v['m'], v['n'])}")
            if not v["k_star"] <= v["k_max"] <= min(v["m"], v["n"]):
                raise Bad(f"{_at('layers', name)}: k_max {v['k_max']} is outside k_star..min(m, n) = "
                          f"{v['k_star']}..{min(v['m'], v['n'])}")
        same_keys(m["shards"], m["layers"], "'shards'", "'layers'")
    if stage == "compressed" and m["params_compressed"] > m["params_original"]:
        raise Bad(f"'params_compressed' {m['params_compressed']} exceeds 'params_original' {m['params_original']}")


def same_shapes(a, b, what_a, what_b):
    """Two {layer: [m, n]} maps that must name the same layers with the same shapes."""
    same_keys(a, b, what_a, what_b)
    for name, shape in a.items():
        if list(shape) != list(b[name]):
            raise Bad(f"{what_a} gives {name} {list(shape)}, {what_b} {list(b[name])}")


def check_layers_match(decomp, whiten):
    """decompose/'s layers are whiten/'s, with the same (m, n)."""
    same_shapes({name: [v["m"], v["n"]] for name, v in decomp["layers"].items()}, whiten["shapes"],
                "decompose/manifest.json 'layers'", "whiten/manifest.json 'shapes'")


# ----------------------------------------------------------------------------- the tensors

def whiten_shape(whiten):
    """name -> (shape, value rule, dtype) of every tensor in whiten/'s shards: S of a group leader with n
    inputs is the packed lower triangle (n (n + 1) / 2,) under cholesky, its diagonal positive (a Cholesky
    factor's is), or (n, n) under eigh; float32."""
    def rule(name):
        leader, _, what = name.rpartition(".")
        if what != "S" or whiten["groups"].get(leader) != leader:
            return None
        n = whiten["shapes"][leader][1]
        if whiten["whitening"] == "cholesky":
            return (n * (n + 1) // 2,), "cholesky", torch.float32
        return (n, n), None, torch.float32
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

def task_row(item, i):
    """A local zero-shot task's line i: {"context": str, "choices": [str, str, ...], "label": int index}."""
    fields(context=string(nonempty=False), choices=lambda v, w: v, label=integer(0))(item, f"line {i}")
    choices = item["choices"]
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
        raise Bad(f"line {i}: 'choices' is {choices!r}, not a list of at least two strings")
    if item["label"] >= len(choices):
        raise Bad(f"line {i}: 'label' {item['label']} is not an index into its {len(choices)} choices")
    return {"context": item["context"], "choices": choices, "label": item["label"]}
