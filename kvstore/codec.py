"""Binary format of one KV block value stored in Redis.

Layout: a fixed little-endian header followed by the raw C-contiguous tensor bytes.

    magic "SMKV" | version u16 | dtype u8 | ndim u8 | shape 6*u32 | payload_len u64
    | payload crc32 u32 | key digest 16 bytes (blake2b-128 of the Redis key)

Decoding validates every field; nothing but raw numbers and bytes is ever interpreted.
"""

from __future__ import annotations

import hashlib
import math
import struct
import zlib

import torch

MAGIC = b"SMKV"
VERSION = 1
MAX_NDIM = 6
HEADER = struct.Struct("<4sHBB6IQI16s")

_DTYPE_TO_CODE: dict[torch.dtype, int] = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_CODE_TO_DTYPE: dict[int, torch.dtype] = {v: k for k, v in _DTYPE_TO_CODE.items()}


class BlockDecodeError(ValueError):
    """A stored block value is malformed, corrupt, or belongs to another key."""


def key_digest(key: str) -> bytes:
    """16-byte digest binding a value to its Redis key."""
    return hashlib.blake2b(key.encode(), digest_size=16).digest()


def encode_block(key: str, tensor: torch.Tensor) -> bytes:
    """Serialize a CPU tensor (fp32/bf16/fp16, 1..6 dims) into a block value for ``key``."""
    header, payload = encode_parts(key, tensor)
    return b"".join((header, payload))


def encode_parts(key: str, tensor: torch.Tensor) -> tuple[bytes, memoryview]:
    """``encode_block`` as (header, payload) without joining them: the payload is a view of the tensor's
    own bytes (of a contiguous copy if it is not contiguous), valid while the tensor is unchanged."""
    payload = block_payload(tensor)
    return block_header(key, tensor, payload, zlib.crc32(payload)), payload


def block_payload(tensor: torch.Tensor) -> memoryview:
    """The bytes a block value of ``tensor`` carries after its header (checks dtype, rank and device)."""
    if tensor.dtype not in _DTYPE_TO_CODE:
        raise TypeError(f"unsupported dtype {tensor.dtype}")
    if not 1 <= tensor.dim() <= MAX_NDIM:
        raise ValueError(f"ndim must be in 1..{MAX_NDIM}, got {tensor.dim()}")
    if tensor.device.type != "cpu":
        raise ValueError(f"tensor must be on CPU, got {tensor.device}")
    return tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy().data.cast("B")


def block_header(key: str, tensor: torch.Tensor, payload: memoryview, crc: int) -> bytes:
    """The header of ``key``'s value for ``tensor`` whose ``block_payload`` has crc32 ``crc``."""
    shape = list(tensor.shape)
    return HEADER.pack(
        MAGIC,
        VERSION,
        _DTYPE_TO_CODE[tensor.dtype],
        len(shape),
        *(shape + [0] * (MAX_NDIM - len(shape))),
        payload.nbytes,
        crc,
        key_digest(key),
    )


def decode_block(key: str, data: bytes | bytearray | memoryview, take: bool = False) -> torch.Tensor:
    """Parse and validate a block value for ``key``; returns a writable tensor owning its memory.

    ``take``: ``data`` is a ``bytearray`` the caller hands over (and no longer touches): the tensor is a
    view of its payload, not a copy (the header's 60 bytes keep every dtype's alignment)."""
    mv = memoryview(data).cast("B")
    if len(mv) < HEADER.size:
        raise BlockDecodeError(f"value too short ({len(mv)} < {HEADER.size} header bytes)")
    magic, version, code, ndim, *rest = HEADER.unpack_from(mv)
    dims, (nbytes, crc, digest) = rest[:MAX_NDIM], rest[MAX_NDIM:]
    if magic != MAGIC:
        raise BlockDecodeError(f"bad magic {magic!r}")
    if version != VERSION:
        raise BlockDecodeError(f"unknown format version {version}")
    dtype = _CODE_TO_DTYPE.get(code)
    if dtype is None:
        raise BlockDecodeError(f"unknown dtype code {code}")
    if not 1 <= ndim <= MAX_NDIM:
        raise BlockDecodeError(f"bad ndim {ndim}")
    if any(dims[ndim:]):
        raise BlockDecodeError("nonzero unused shape dims")
    shape = tuple(dims[:ndim])
    itemsize = torch.empty((), dtype=dtype).element_size()
    if nbytes != math.prod(shape) * itemsize:
        raise BlockDecodeError(f"payload length {nbytes} does not match shape {shape} x {itemsize}")
    payload = mv[HEADER.size :]
    if len(payload) != nbytes:
        raise BlockDecodeError(f"payload is {len(payload)} bytes, header says {nbytes}")
    if zlib.crc32(payload) != crc:
        raise BlockDecodeError("payload crc32 mismatch")
    if digest != key_digest(key):
        raise BlockDecodeError("key digest mismatch (value stored under another key)")
    if nbytes == 0:
        return torch.empty(shape, dtype=dtype)
    if take and isinstance(data, bytearray):
        return torch.frombuffer(data, dtype=torch.uint8, offset=HEADER.size, count=nbytes).view(dtype).reshape(shape)
    buf = bytearray(payload)
    return torch.frombuffer(buf, dtype=torch.uint8).view(dtype).reshape(shape)
