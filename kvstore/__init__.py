"""Redis-backed KV-cache block store: binary block codec, store client, embedded server."""

from smcserve.kvstore.codec import BlockDecodeError, decode_block, encode_block
from smcserve.kvstore.embedded import EmbeddedRedis, connect_redis, start_or_connect
from smcserve.kvstore.store import KVStore

__all__ = [
    "KVStore",
    "encode_block",
    "decode_block",
    "BlockDecodeError",
    "EmbeddedRedis",
    "connect_redis",
    "start_or_connect",
]
