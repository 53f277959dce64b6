"""Check that a shared library carries CUDA device code for given architectures.

Reads the ELF section `.nv_fatbin` and walks the fatbin container headers (no cuobjdump needed).
Usage: python scripts/check_fatbin.py LIBRARY sm_90 [sm_80 compute_90 ...]
Exits 1, naming what is missing, when a requested SASS (sm_XX) or PTX (compute_XX) is absent.
"""

import struct
import sys
from typing import List, Set, Tuple

FATBIN_MAGIC = 0xBA55ED50
KIND_PTX = 1
KIND_ELF = 2


def section(path: str, name: str) -> bytes:
    with open(path, "rb") as f:
        data = f.read()
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise ValueError(f"{path} is not a little-endian ELF64 file")
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    headers = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
    strtab = headers[shstrndx]
    names = data[strtab[4] : strtab[4] + strtab[5]]
    for h in headers:
        end = names.index(b"\0", h[0])
        if names[h[0] : end].decode() == name:
            return data[h[4] : h[4] + h[5]]
    raise ValueError(f"{path} has no {name} section: it was built without device code")


def fatbin_entries(blob: bytes) -> List[Tuple[str, int]]:
    """(kind, arch) of every entry of every fatbin container in the section."""
    entries = []
    offset = 0
    while offset + 16 <= len(blob):
        magic, _version, header_size, fat_size = struct.unpack_from("<IHHQ", blob, offset)
        if magic != FATBIN_MAGIC:
            # Containers are padded to 8 bytes; anything else means the format is not understood.
            if blob[offset : offset + 8].strip(b"\0") == b"":
                offset += 8
                continue
            raise ValueError(f"unexpected bytes at .nv_fatbin+{offset:#x}: not a fatbin header")
        pos = offset + header_size
        end = pos + fat_size
        while pos < end:
            kind, _unk, entry_header, payload = struct.unpack_from("<HHIQ", blob, pos)
            arch, = struct.unpack_from("<I", blob, pos + 28)
            name = {KIND_PTX: "compute", KIND_ELF: "sm"}.get(kind, f"kind{kind}")
            entries.append((name, arch))
            pos += entry_header + payload
        offset = end
    return entries


def main(argv: List[str]) -> int:
    if len(argv) < 3:
        print(__doc__, file=sys.stderr)
        return 2
    path, wanted = argv[1], argv[2:]
    try:
        found: Set[str] = {f"{kind}_{arch}" for kind, arch in fatbin_entries(section(path, ".nv_fatbin"))}
    except (OSError, ValueError, struct.error) as exc:
        print(f"check_fatbin: FAILED reading {path}: {exc}", file=sys.stderr)
        return 1
    missing = [w for w in wanted if w not in found]
    print(f"check_fatbin: {path} holds {', '.join(sorted(found)) or 'nothing'}")
    if missing:
        print(f"check_fatbin: FAILED, missing device code for {', '.join(missing)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
