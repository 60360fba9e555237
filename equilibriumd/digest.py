"""SHA-256 without OpenSSL.

`hashlib` loads OpenSSL's libcrypto when it is imported (~3.5 MB of the agent's
RSS) for the two short digests the agent takes: its pin directory's tag (lock,
admin socket, state file) and the BPF sources' hash. CPython's own SHA-256 gives
the same digests."""

from __future__ import annotations

from typing import Any


def sha256(data: bytes = b"") -> Any:
    """A new SHA-256 hash object (update/digest/hexdigest, as hashlib's)."""
    try:
        from _sha2 import sha256 as impl  # type: ignore[import-not-found]  # CPython >= 3.12
    except ImportError:
        try:
            from _sha256 import sha256 as impl  # type: ignore[import-not-found]  # CPython 3.11
        except ImportError:   # another interpreter: the standard way
            from hashlib import sha256 as impl
    return impl(data)
