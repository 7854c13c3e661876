#!/usr/bin/env python3
"""Extract the uncompressed kernel (vmlinux, an ELF) from a bzImage.

    extract-vmlinux.py BZIMAGE OUT

QEMU can boot such an ELF directly through its PVH entry point (Linux
built with CONFIG_PVH): no decompression and no real-mode setup in the
guest, which under TCG saves about a quarter of a second per boot. The
compressed payload is found through the boot protocol's setup header
(payload_offset/payload_length, protocol 2.08 and later) and decompressed
by its magic. Exits 2, writing nothing, when the image has no payload we
can read or the kernel has no PVH entry point (XEN_ELFNOTE_PHYS32_ENTRY).
"""
import gzip
import lzma
import os
import struct
import subprocess
import sys

PVH_NOTE = 18  # XEN_ELFNOTE_PHYS32_ENTRY


def fail(msg):
    print(f"extract-vmlinux: {msg}", file=sys.stderr)
    sys.exit(2)


def payload(image):
    if len(image) < 0x250 or image[0x202:0x206] != b"HdrS":
        fail("not a bzImage (no setup header)")
    if struct.unpack_from("<H", image, 0x206)[0] < 0x208:
        fail("boot protocol before 2.08: no payload fields")
    setup_sects = image[0x1F1] or 4
    offset, length = struct.unpack_from("<II", image, 0x248)
    start = (setup_sects + 1) * 512 + offset
    if length == 0 or start + length > len(image):
        fail("payload outside the image")
    return image[start:start + length]


def decompress(data):
    if data[:2] == b"\x1f\x8b":
        return gzip.decompress(data)
    # The kernel's build appends the uncompressed size (le32) to every
    # other format's stream.
    stream, size = data[:-4], struct.unpack_from("<I", data, len(data) - 4)[0]
    if data[:6] == b"\xfd7zXZ\x00" or data[:3] == b"\x5d\x00\x00":
        out = lzma.decompress(stream)
    else:
        tool = {b"\x02\x21\x4c\x18": "lz4", b"\x28\xb5\x2f\xfd": "zstd"}.get(data[:4])
        if tool is None:
            fail(f"unknown compression (magic {data[:4].hex()})")
        try:
            out = subprocess.run([tool, "-d", "-c"], input=stream,
                                 capture_output=True, check=True).stdout
        except (OSError, subprocess.CalledProcessError) as e:
            fail(f"{tool} failed: {e}")
    if len(out) != size:
        fail(f"decompressed {len(out)} bytes, the image says {size}")
    return out


def has_pvh_note(elf):
    if elf[:4] != b"\x7fELF" or elf[4] != 2 or elf[5] != 1:
        fail("the payload is not a 64-bit little-endian ELF")
    phoff, = struct.unpack_from("<Q", elf, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", elf, 0x36)
    for i in range(phnum):
        p_type, _, p_offset, _, _, p_filesz = struct.unpack_from(
            "<IIQQQQ", elf, phoff + i * phentsize)
        if p_type != 4:  # PT_NOTE
            continue
        pos, end = p_offset, p_offset + p_filesz
        while pos + 12 <= end:
            namesz, descsz, kind = struct.unpack_from("<III", elf, pos)
            name = elf[pos + 12:pos + 12 + namesz].rstrip(b"\0")
            if name == b"Xen" and kind == PVH_NOTE:
                return True
            pos += 12 + (namesz + 3) // 4 * 4 + (descsz + 3) // 4 * 4
    return False


def main():
    if len(sys.argv) != 3:
        print(__doc__, file=sys.stderr)
        sys.exit(1)
    src, out = sys.argv[1], sys.argv[2]
    with open(src, "rb") as f:
        elf = decompress(payload(f.read()))
    if not has_pvh_note(elf):
        fail("the kernel has no PVH entry point (CONFIG_PVH)")
    tmp = out + ".tmp"
    with open(tmp, "wb") as f:
        f.write(elf)
    os.replace(tmp, out)


if __name__ == "__main__":
    main()
