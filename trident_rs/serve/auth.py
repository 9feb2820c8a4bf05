"""Optional bearer-token authentication for the HTTP API (issue 8).

Keys come from `limits.api_keys` in the app config plus the comma-separated env var
`TRIDENT_API_KEYS`; with no key at all the API is open. `/healthz` is always open, and so is
`/v1/files/{id}/content` (the URLs `response_format: url` hands out): a stored file's id is 128
random bits, the credential itself, as in a presigned URL (`trident_rs.serve.files`).
Comparison is constant-time (`hmac.compare_digest`).
"""
from __future__ import annotations

import hmac
import os
import re
from collections.abc import Iterable

ENV_VAR = "TRIDENT_API_KEYS"
OPEN_PATHS = frozenset({"/healthz"})
OPEN_PATH_RE = re.compile(r"^/v1/files/file_[0-9a-f]{32}/content$")


def load_keys(configured: Iterable[str] = (), env: dict[str, str] | None = None) -> tuple[str, ...]:
    env = os.environ if env is None else env
    from_env = [k.strip() for k in env.get(ENV_VAR, "").split(",")]
    return tuple(dict.fromkeys(k for k in [*configured, *from_env] if k and k.strip()))


def bearer(header_value: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header, else None."""
    if not header_value:
        return None
    scheme, _, token = header_value.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def authorized(keys: tuple[str, ...], path: str, header_value: str | None) -> bool:
    """Whether a request to `path` with this Authorization header may pass."""
    if not keys or path in OPEN_PATHS or OPEN_PATH_RE.match(path):
        return True
    token = bearer(header_value)
    if token is None:
        return False
    tok = token.encode("utf-8", "surrogatepass")
    ok = False
    for k in keys:  # no early exit: the time does not depend on which key matched
        ok |= hmac.compare_digest(tok, k.encode("utf-8", "surrogatepass"))
    return ok
