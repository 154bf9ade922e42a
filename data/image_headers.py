"""What an encoded image's header says, read without decoding it.

Decoding a 12000x12000 photo takes gigabytes before its size can be checked, and libpng
prints its own lines (without a file name) for every truncated PNG it is handed. Reading
the header first lets the caller skip such files quietly and say why. PNG and JPEG (the
formats `--data` reads) are understood; other formats give no answer and are left to the
decoder.

The input pipeline reads sizes with TF ops (`mtss_train.data.in_graph.header_size`) and
asks `png_problem` only what is wrong with a PNG that did not decode; `image_size` serves
the Python reader (`mtss_train.data.images.decode_rgb`).
"""

import struct
import zlib

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
JPEG_SOI = b"\xff\xd8"
# Start-of-frame markers carry the size: C0-CF except DHT (C4), JPG (C8) and DAC (CC).
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
# Markers without a length field: TEM, RST0-7, SOI, EOI.
_JPEG_STANDALONE = frozenset([0x01, *range(0xD0, 0xDA)])
_JPEG_SOS = 0xDA


def image_size(encoded: bytes) -> tuple[int, int] | None:
    """(height, width) from a PNG's IHDR or a JPEG's start-of-frame; None if not found."""
    if encoded.startswith(PNG_SIGNATURE) and encoded[12:16] == b"IHDR" and len(encoded) >= 24:
        width, height = struct.unpack(">II", encoded[16:24])
        return height, width
    if encoded.startswith(JPEG_SOI):
        return _jpeg_size(encoded)
    return None


def _jpeg_size(encoded: bytes) -> tuple[int, int] | None:
    """Walks the JPEG marker segments up to the first start-of-frame (or start-of-scan)."""
    i = 2
    while i + 4 <= len(encoded):
        if encoded[i] != 0xFF:
            return None  # Not at a marker: the stream is corrupt.
        marker = encoded[i + 1]
        if marker == 0xFF:  # Fill byte before a marker.
            i += 1
            continue
        if marker in _JPEG_STANDALONE:
            i += 2
            continue
        if marker in _JPEG_SOF and i + 9 <= len(encoded):
            height, width = struct.unpack(">HH", encoded[i + 5 : i + 9])
            return height, width
        if marker == _JPEG_SOS:
            return None
        (length,) = struct.unpack(">H", encoded[i + 2 : i + 4])
        i += 2 + length
    return None


def png_problem(encoded: bytes) -> str | None:
    """Why a PNG is truncated or corrupt (chunk structure, CRCs, IEND), or None if it is whole.

    Checks what libpng would otherwise complain about on stderr; the CRCs cover every
    byte of the image data, so a damaged stream is found without decompressing it.
    """
    if not encoded.startswith(PNG_SIGNATURE):
        return None
    view = memoryview(encoded)  # Checksums over slices without copying them.
    i, first = len(PNG_SIGNATURE), True
    while i + 8 <= len(encoded):
        length, kind = struct.unpack(">I4s", encoded[i : i + 8])
        if first and kind != b"IHDR":
            return "corrupt PNG (no IHDR chunk first)"
        first = False
        end = i + 8 + length + 4
        if end > len(encoded):
            return f"truncated PNG ({kind.decode('latin-1')} chunk at byte {i} ends past the file's {len(encoded)} bytes)"
        (crc,) = struct.unpack(">I", encoded[end - 4 : end])
        if zlib.crc32(view[i + 4 : end - 4]) != crc:
            return f"corrupt PNG (bad checksum in {kind.decode('latin-1')} chunk at byte {i})"
        if kind == b"IEND":
            return None
        i = end
    return f"truncated PNG (no IEND chunk in its {len(encoded)} bytes)"
