#!/usr/bin/env python3
"""Splits GGUF files written by stable-diffusion.cpp from fixtures/supir-tiny/weights.safetensors
into what the fixture does not already hold (see README.md):

  make_parts.py WEIGHTS.safetensors OUT_DIR SD-FILE.gguf...

For each FILE.gguf it writes OUT_DIR/FILE.gguf.part: the file's header (everything before the
tensor data) followed by the data of every tensor that is not F16, in file order, each with the
padding after it. Every F16 tensor must be a byte copy of one fixture tensor (checked): it is
left out. OUT_DIR/names.tsv gets the tensors stored under a name the fixture does not use, as
`gguf name<TAB>fixture key` (found by their bytes, so independent of any name mapping), and
OUT_DIR/SHA1SUMS the files' SHA-1s. Each part is rebuilt here and compared with its file.
Standard library only."""
import hashlib
import json
import math
import os
import struct
import sys

F16 = 1


def safetensors(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        head = json.loads(f.read(n))
        data = f.read()
    head.pop("__metadata__", None)
    out = {}
    for k, v in head.items():
        a, b = v["data_offsets"]
        out[k] = (v["dtype"], v["shape"], data[a:b])
    return out


def gguf_tensors(b):
    """(data_start, [(name, dims outermost first, ggml type, offset)]) of a GGUF v3 file
    without key-values (stable-diffusion.cpp writes none)."""
    assert b[:4] == b"GGUF", "not a GGUF file"
    version, n_tensors, n_kv = struct.unpack_from("<IQQ", b, 4)
    assert version == 3 and n_kv == 0, (version, n_kv)
    pos = 24
    tensors = []
    for _ in range(n_tensors):
        (n,) = struct.unpack_from("<Q", b, pos)
        name = b[pos + 8 : pos + 8 + n].decode()
        pos += 8 + n
        (nd,) = struct.unpack_from("<I", b, pos)
        dims = struct.unpack_from("<%dQ" % nd, b, pos + 4)
        pos += 4 + 8 * nd
        ty, off = struct.unpack_from("<IQ", b, pos)
        pos += 12
        tensors.append((name, list(dims[::-1]), ty, off))
    return (pos + 31) // 32 * 32, tensors


def regions(b):
    start, tensors = gguf_tensors(b)
    tensors.sort(key=lambda t: t[3])
    ends = [start + t[3] for t in tensors[1:]] + [len(b)]
    return start, [(t, start + t[3], e) for t, e in zip(tensors, ends)]


def main():
    weights, out_dir, files = sys.argv[1], sys.argv[2], sys.argv[3:]
    fixture = safetensors(weights)
    by_bytes = {hashlib.sha1(raw).digest(): k for k, (dt, _, raw) in fixture.items() if dt == "F16"}
    renames = {}
    sums = []
    for path in files:
        b = open(path, "rb").read()
        start, regs = regions(b)
        part = bytearray(b[:start])
        for (name, dims, ty, _), s, e in regs:
            if ty != F16:
                part += b[s:e]
                continue
            key = name
            if key not in fixture or fixture[key][2] != b[s : s + len(fixture[key][2])]:
                n = 2 * math.prod(dims)
                key = by_bytes.get(hashlib.sha1(b[s : s + n]).digest())
                assert key is not None, f"{path}: F16 tensor {name} is not a fixture tensor"
                renames[name] = key
            raw = fixture[key][2]
            assert fixture[key][1] == dims and b[s : s + len(raw)] == raw, name
            assert b[s + len(raw) : e] == bytes(e - s - len(raw)), f"{name}: padding not zeros"
        base = os.path.basename(path)
        with open(os.path.join(out_dir, base + ".part"), "wb") as f:
            f.write(part)
        sums.append(f"{hashlib.sha1(b).hexdigest()}  {base}\n")
        assert rebuild(bytes(part), fixture, renames) == b, f"{path}: rebuild differs"
        print(f"{base}: {len(b)} bytes, part {len(part)}")
    with open(os.path.join(out_dir, "names.tsv"), "w") as f:
        for name in sorted(renames):
            f.write(f"{name}\t{renames[name]}\n")
    with open(os.path.join(out_dir, "SHA1SUMS"), "w") as f:
        f.writelines(sorted(sums))


def rebuild(part, fixture, renames):
    """The inverse (what tests/sdcpp_files.rs does)."""
    start, tensors = gguf_tensors(part)
    tensors.sort(key=lambda t: t[3])
    out = bytearray(part[:start])
    pos = start
    for i, (name, dims, ty, off) in enumerate(tensors):
        if ty == F16:
            raw = fixture[renames.get(name, name)][2]
            out += raw
            # Zeros up to the next tensor (the last one: to the alignment, 32).
            end = tensors[i + 1][3] if i + 1 < len(tensors) else (off + len(raw) + 31) // 32 * 32
            out += bytes(start + end - len(out))
            continue
        end = pos + (tensors[i + 1][3] - off if i + 1 < len(tensors) else len(part) - pos)
        out += part[pos:end]
        pos = end
    return bytes(out)


if __name__ == "__main__":
    main()
