"""Types of the optional C extension (sandboxsec/audit/_native.c)."""

from typing_extensions import Buffer

def leaves(
    data: bytes, lo: int, hi: int, prefix: bytes, seq: int, prev: bytes, /
) -> tuple[bytes, bool]: ...
def roots(hashes: Buffer, height: int, /) -> bytes: ...
