#!/usr/bin/env python3
"""PyTorch checkpoint fixtures for kiln's pickle-free `torch` reader.

Writes small `torch.save` files (a few KB each) into testdata/torch/, the
values every tensor must read as (testdata/torch/expected.json), and a set
of malicious or unsupported checkpoints that the reader must refuse without
running anything. Run from the repository root:

    ${KILN_CACHE:-$HOME/.cache/kiln}/venv-golden/bin/python scripts/golden/torch_fixtures.py

(the venv of scripts/golden/requirements.txt; only torch is used).

Generating the malicious files runs none of their payloads: pickling an
object only records what its `__reduce__` returns. The script checks each of
them with `torch.load(..., weights_only=True)`, torch's own restricted
unpickler, which refuses them too (it runs nothing either). Every payload
would write a marker file /tmp/kiln-torch-pwned-<name>; the Rust tests
assert that the marker never appears.

torch.save stamps each archive with a fresh `.data/serialization_id`, so
regenerated files differ byte-wise; the tensors in them do not.
"""
import collections
import json
import os
import pathlib
import pickle
import struct
import subprocess
import zipfile
import zlib

import torch

OUT = pathlib.Path("testdata/torch")
EXPECTED: dict = {}


def marker(name: str) -> str:
    return f"/tmp/kiln-torch-pwned-{name}"


def values(shape, dtype, seed):
    """Deterministic values exactly representable in `dtype`."""
    g = torch.Generator().manual_seed(seed)
    n = 1
    for s in shape:
        n *= s
    if dtype.is_floating_point:
        # multiples of 1/8 in [-4, 4): exact in f16, bf16 and f32
        v = torch.randint(-32, 32, (n,), generator=g).to(torch.float64) / 8
    elif dtype == torch.bool:
        v = torch.randint(0, 2, (n,), generator=g)
    elif dtype == torch.uint8:
        v = torch.randint(0, 256, (n,), generator=g)
    else:
        v = torch.randint(-100, 100, (n,), generator=g)
    return v.to(dtype).reshape(shape)


def record(file: str, sd) -> None:
    """Remembers what every tensor of `sd` (flattened, dotted) must read as."""
    out = {}

    def walk(prefix, d):
        for k, v in d.items():
            if isinstance(v, torch.Tensor):
                out[prefix + k] = {
                    "shape": list(v.shape),
                    "dtype": str(v.dtype).removeprefix("torch."),
                    "values": [float(x) for x in v.detach().double().flatten().tolist()],
                }
            elif isinstance(v, dict):
                walk(prefix + k + ".", v)

    walk("", sd)
    EXPECTED[file] = out


def save(file: str, sd) -> None:
    path = OUT / file
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(sd, path)
    back = torch.load(path, weights_only=True)
    assert back.keys() == sd.keys(), file
    record(file, sd)


def dtypes_fixture() -> None:
    sd = collections.OrderedDict()
    sd["f32"] = values((2, 3), torch.float32, 1)
    sd["f16"] = values((5,), torch.float16, 2)
    sd["bf16"] = values((2, 2), torch.bfloat16, 3)
    sd["f64"] = values((3,), torch.float64, 4)
    sd["position_ids"] = torch.arange(6, dtype=torch.int64).reshape(1, 6)
    sd["i32"] = values((4,), torch.int32, 5)
    sd["i16"] = values((2,), torch.int16, 6)
    sd["i8"] = values((3,), torch.int8, 7)
    sd["u8"] = values((3,), torch.uint8, 8)
    sd["mask"] = values((4,), torch.bool, 9)
    sd["scalar"] = torch.tensor(2.5)
    sd["param"] = torch.nn.Parameter(values((3,), torch.float32, 10))
    sd._metadata = collections.OrderedDict({"": {"version": 1}})
    save("dtypes.bin", sd)


def views_fixture() -> None:
    base = values((3, 4), torch.float32, 20)
    emb = values((4, 2), torch.float32, 21)
    small = values((3,), torch.float32, 22)
    half = values((2, 3), torch.float16, 23)
    sd = collections.OrderedDict()
    sd["base"] = base
    sd["transposed"] = base.t()  # strides (1, 4), same storage as base
    sd["row"] = base[1]  # storage_offset 4
    sd["slice"] = base.view(-1)[5:9]  # storage_offset 5
    sd["column"] = base[:, 2]  # stride (4,), storage_offset 2
    sd["expanded"] = small.expand(2, 3)  # strides (0, 1)
    sd["tied_a"] = emb  # the same tensor object twice: one memo entry
    sd["tied_b"] = emb
    sd["half_t"] = half.t()  # non-contiguous f16
    sd["empty"] = torch.zeros(0, 3)
    assert not sd["transposed"].is_contiguous()
    assert sd["slice"].storage_offset() == 5
    save("views.bin", sd)


def module_fixture() -> None:
    torch.manual_seed(30)
    m = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.LayerNorm(2))
    m.register_buffer("steps", torch.tensor([7], dtype=torch.int64))
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(values(tuple(p.shape), torch.float32, 31 + p.numel()))
    save("module.bin", m.state_dict())


def nested_fixture() -> None:
    sd = {
        "model": {"w": values((2, 2), torch.float32, 40), "inner": {"b": values((2,), torch.float16, 41)}},
        "step": 7,
        "name": "run-1",
        "lr": 0.5,
        "flags": [True, None, (1, 2)],
        "blob": b"\x00\x01",
    }
    save("nested.bin", sd)


def llama_state(seed: int):
    """A tiny llama-named state dict: vocab 8, hidden 4, one layer, ffn 8."""
    v, h, f = 8, 4, 8
    shapes = [
        ("model.embed_tokens.weight", (v, h)),
        ("model.layers.0.input_layernorm.weight", (h,)),
        ("model.layers.0.self_attn.q_proj.weight", (h, h)),
        ("model.layers.0.self_attn.k_proj.weight", (h, h)),
        ("model.layers.0.self_attn.v_proj.weight", (h, h)),
        ("model.layers.0.self_attn.o_proj.weight", (h, h)),
        ("model.layers.0.post_attention_layernorm.weight", (h,)),
        ("model.layers.0.mlp.gate_proj.weight", (f, h)),
        ("model.layers.0.mlp.up_proj.weight", (f, h)),
        ("model.layers.0.mlp.down_proj.weight", (h, f)),
        ("model.norm.weight", (h,)),
        ("lm_head.weight", (v, h)),
    ]
    dtypes = [torch.float32, torch.bfloat16, torch.float16]
    return collections.OrderedDict(
        (name, values(shape, dtypes[i % 3], seed + i)) for i, (name, shape) in enumerate(shapes)
    )


def sharded_fixture() -> None:
    sd = llama_state(50)
    names = list(sd)
    shards = {
        "pytorch_model-00001-of-00002.bin": names[:6],
        "pytorch_model-00002-of-00002.bin": names[6:],
    }
    weight_map = {}
    total = 0
    for file, keys in shards.items():
        part = collections.OrderedDict((k, sd[k]) for k in keys)
        save(f"sharded/{file}", part)
        for k in keys:
            weight_map[k] = file
            total += sd[k].numel() * sd[k].element_size()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (OUT / "sharded/pytorch_model.bin.index.json").write_text(json.dumps(index, indent=2) + "\n")
    save("single/pytorch_model.bin", sd)


# --- ZIP64 ----------------------------------------------------------------

def zip64_fixture() -> None:
    """views.bin's entries rewritten with ZIP64 records everywhere (as torch
    writes files over 4 GiB), data 64-byte aligned like torch's writer."""
    src = zipfile.ZipFile(OUT / "views.bin")
    body = bytearray()
    central = bytearray()
    entries = src.infolist()
    for info in entries:
        data = src.read(info)
        name = info.filename.replace("views/", "zip64/", 1).encode()
        offset = len(body)
        crc = zlib.crc32(data)
        z64 = struct.pack("<HHQQ", 1, 16, len(data), len(data))
        pad = (-(offset + 30 + len(name) + len(z64) + 4)) % 64
        extra = z64 + struct.pack("<HH", 0x4246, pad) + b"Z" * pad
        body += struct.pack(
            "<IHHHHHIIIHH", 0x04034B50, 45, 0, 0, 0, 0x21, crc,
            0xFFFFFFFF, 0xFFFFFFFF, len(name), len(extra),
        ) + name + extra
        assert len(body) % 64 == 0
        body += data
        cz64 = struct.pack("<HHQQQ", 1, 24, len(data), len(data), offset)
        central += struct.pack(
            "<IHHHHHHIIIHHHHHII", 0x02014B50, 45, 45, 0, 0, 0, 0x21, crc,
            0xFFFFFFFF, 0xFFFFFFFF, len(name), len(cz64), 0, 0, 0, 0, 0xFFFFFFFF,
        ) + name + cz64
    cd_offset = len(body)
    body += central
    eocd64 = len(body)
    body += struct.pack(
        "<IQHHIIQQQQ", 0x06064B50, 44, 45, 45, 0, 0,
        len(entries), len(entries), len(central), cd_offset,
    )
    body += struct.pack("<IIQI", 0x07064B50, 0, eocd64, 1)
    body += struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, 0xFFFF, 0xFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0)
    path = OUT / "zip64.bin"
    path.write_bytes(bytes(body))
    assert zipfile.ZipFile(path).testzip() is None
    back = torch.load(path, weights_only=True)
    orig = torch.load(OUT / "views.bin", weights_only=True)
    assert all(torch.equal(back[k], orig[k]) for k in orig)
    EXPECTED["zip64.bin"] = EXPECTED["views.bin"]


# --- malicious and unsupported files ---------------------------------------

class Reduce:
    """Pickles as a call of `fn(*args)`; pickling calls nothing."""

    def __init__(self, fn, args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def zip_pickle(file: str, pkl: bytes) -> None:
    """A torch-layout archive around an arbitrary data.pkl."""
    stem = pathlib.Path(file).stem
    with zipfile.ZipFile(OUT / file, "w", zipfile.ZIP_STORED) as z:
        z.writestr(f"{stem}/data.pkl", pkl)
        z.writestr(f"{stem}/byteorder", "little")
        z.writestr(f"{stem}/version", "3\n")


def refused_by_torch(file: str) -> None:
    try:
        torch.load(OUT / file, weights_only=True)
    except Exception as e:  # noqa: BLE001 - any refusal will do
        assert "weights_only" in str(e) or "Unsupported" in str(e), (file, e)
        return
    raise AssertionError(f"torch loaded {file}")


def evil_fixtures() -> None:
    def shell(name):
        return f"echo pwned > {marker(name)}"

    # os.system pickles as `posix system` on Linux (its __module__).
    zip_pickle("evil_posix_system.bin",
               pickle.dumps(Reduce(os.system, (shell("posix_system"),)), protocol=2))
    # The classic hand-written payload: GLOBAL 'os system'.
    cmd = shell("os_system").encode()
    zip_pickle("evil_os_system.bin",
               b"\x80\x02cos\nsystem\nX" + struct.pack("<I", len(cmd)) + cmd + b"\x85R.")
    src = f"__import__('os').system({shell('eval')!r})"
    zip_pickle("evil_builtins_eval.bin",
               pickle.dumps(Reduce(eval, (src,)), protocol=2, fix_imports=False))
    # Protocol 4 names its callables with STACK_GLOBAL.
    pkl = pickle.dumps(Reduce(subprocess.Popen, (["sh", "-c", shell("stack_global")],)), protocol=4)
    assert b"\x93" in pkl
    zip_pickle("evil_stack_global.bin", pkl)
    # INST: protocol 0's "call this class" opcode.
    cmd = shell("inst").encode()
    zip_pickle("evil_inst.bin",
               b"\x80\x02(X" + struct.pack("<I", len(cmd)) + cmd + b"ios\nsystem\n.")
    # A real torch.save of a state dict with a payload among the tensors.
    sd = collections.OrderedDict()
    sd["weight"] = values((2, 2), torch.float32, 60)
    sd["config"] = Reduce(os.system, (shell("in_state_dict"),))
    torch.save(sd, OUT / "evil_in_state_dict.bin")
    for f in ["evil_posix_system.bin", "evil_os_system.bin", "evil_builtins_eval.bin",
              "evil_stack_global.bin", "evil_inst.bin", "evil_in_state_dict.bin"]:
        refused_by_torch(f)

    # The pre-1.6 format: a bare pickle stream with a magic number.
    torch.save({"w": torch.ones(2)}, OUT / "legacy.bin", _use_new_zipfile_serialization=False)
    assert not zipfile.is_zipfile(OUT / "legacy.bin")


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    dtypes_fixture()
    views_fixture()
    module_fixture()
    nested_fixture()
    sharded_fixture()
    zip64_fixture()
    evil_fixtures()
    for m in pathlib.Path("/tmp").glob("kiln-torch-pwned-*"):
        raise AssertionError(f"a payload ran: {m}")
    EXPECTED["_versions"] = {"torch": torch.__version__}
    (OUT / "expected.json").write_text(json.dumps(EXPECTED, indent=1) + "\n")
    total = sum(p.stat().st_size for p in OUT.rglob("*") if p.is_file())
    print(f"wrote {len(list(OUT.rglob('*.bin')))} checkpoints, {total} bytes, to {OUT}")


if __name__ == "__main__":
    main()
