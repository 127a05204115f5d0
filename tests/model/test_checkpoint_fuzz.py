"""Fuzzing the checkpoint loader: a damaged manifest or state file gives a clean one-line error or
loads to exactly the same numbers as the intact checkpoint — never a traceback, never other numbers.

Mutations (seeded): a manifest value replaced by one of another type or deleted, a state tensor
cast to another dtype, reshaped, renamed or given a NaN/Inf, and either file truncated.
"""
from __future__ import annotations

import json
import random
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from diffquant.config import QuantConfig
from diffquant.errors import DiffquantError
from diffquant.methods.naive import run_naive
from diffquant.model import load, quantize, save
from diffquant.model.checkpoint import MANIFEST_FILE, STATE_FILE

TIMESTEPS = [999, 500, 1]
TRIALS = {"manifest": 160, "state": 60, "truncate": 20}


@pytest.fixture(scope="module")
def intact(make_unet, unet_inputs, tmp_path_factory):
    qmodel = quantize(make_unet(), QuantConfig(weight_bits=4, act_bits=8, split=True), timesteps=TIMESTEPS)

    def loop(model):
        for t in TIMESTEPS:
            (x, ts), kw = unet_inputs(batch=2, t=t, seed=t)
            model(x * (1 + t / 250), ts, **kw)

    run_naive(qmodel, loop)
    path = save(qmodel, tmp_path_factory.mktemp("fuzz") / "intact")
    reference = outputs(load(make_unet(), path), unet_inputs)
    return path, reference


def outputs(qmodel, unet_inputs) -> list[torch.Tensor]:
    with torch.no_grad():
        results = []
        for t in TIMESTEPS:
            (x, ts), kw = unet_inputs(batch=2, t=t, seed=7)
            results.append(qmodel(x, ts, **kw).sample)
        return results


def leaves(obj, prefix=()):
    """Every (path, value) in a JSON tree, containers included."""
    yield prefix, obj
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from leaves(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from leaves(v, prefix + (i,))


def wrong_values(value):
    """Values of another JSON type than ``value``."""
    pool = [None, "x", 3.5, -1, True, [], {}, [1, "a"], float("nan")]
    return [v for v in pool if type(v) is not type(value)]


def set_path(tree, path, value, delete=False):
    node = tree
    for key in path[:-1]:
        node = node[key]
    if delete and isinstance(node, dict):
        del node[path[-1]]
    else:
        node[path[-1]] = value


def check_load(make_unet, unet_inputs, path, reference, what):
    try:
        qmodel = load(make_unet(), path)
    except DiffquantError as exc:
        message = str(exc)
        assert message and "\n" not in message, (what, message)
        return "refused"
    got = outputs(qmodel, unet_inputs)
    assert all(torch.equal(a, b) for a, b in zip(got, reference)), f"{what}: loaded with different numbers"
    return "identical"


def fresh_copy(intact_path, tmp_path, i):
    target = tmp_path / f"m{i}"
    shutil.copytree(intact_path, target)
    return target


def test_manifest_mutations_are_refused_or_harmless(intact, make_unet, unet_inputs, tmp_path):
    path, reference = intact
    manifest = json.loads((path / MANIFEST_FILE).read_text())
    candidates = [p for p, _ in leaves(manifest) if p and p[0] not in ("format", "format_version")]
    rng = random.Random(0)
    outcomes = []
    for i in range(TRIALS["manifest"]):
        mutated = json.loads(json.dumps(manifest))
        where = rng.choice(candidates)
        node = mutated
        for key in where:
            node = node[key]
        delete = rng.random() < 0.15
        value = rng.choice(wrong_values(node))
        set_path(mutated, where, value, delete=delete)
        target = fresh_copy(path, tmp_path, i)
        (target / MANIFEST_FILE).write_text(json.dumps(mutated))
        what = f"manifest {'/'.join(map(str, where))} {'deleted' if delete else f'= {value!r}'}"
        outcomes.append(check_load(make_unet, unet_inputs, target, reference, what))
        shutil.rmtree(target)
    assert outcomes.count("refused") > TRIALS["manifest"] // 2  # the fuzzer really hits checked fields


def test_state_file_mutations_are_refused(intact, make_unet, unet_inputs, tmp_path):
    path, reference = intact
    tensors = load_file(path / STATE_FILE)
    floating = [k for k, v in tensors.items() if v.is_floating_point()]
    rng = random.Random(1)
    for i in range(TRIALS["state"]):
        mutated = dict(tensors)
        key = rng.choice(floating)
        kind = rng.choice(["dtype", "shape", "nan", "inf", "rename"])
        value = mutated[key].clone()
        if kind == "dtype":
            mutated[key] = value.to(rng.choice([torch.float16, torch.float64, torch.bfloat16, torch.int32]))
        elif kind == "shape":
            mutated[key] = torch.cat([value.reshape(-1), value.reshape(-1)[:1]])
        elif kind in ("nan", "inf"):
            flat = value.reshape(-1)
            flat[rng.randrange(flat.numel())] = float(kind)
            mutated[key] = flat.reshape(value.shape)
        else:
            mutated[key + "_renamed"] = mutated.pop(key)
        target = fresh_copy(path, tmp_path, i)
        save_file(mutated, str(target / STATE_FILE))
        assert check_load(make_unet, unet_inputs, target, reference, f"{kind} of {key}") == "refused", (kind, key)
        shutil.rmtree(target)


def test_truncated_files_are_refused(intact, make_unet, unet_inputs, tmp_path):
    path, reference = intact
    rng = random.Random(2)
    for i in range(TRIALS["truncate"]):
        name = rng.choice([MANIFEST_FILE, STATE_FILE])
        target = fresh_copy(path, tmp_path, i)
        data = (target / name).read_bytes()
        (target / name).write_bytes(data[: rng.randrange(len(data))])
        assert check_load(make_unet, unet_inputs, target, reference, f"truncated {name}") == "refused"
        shutil.rmtree(target)
