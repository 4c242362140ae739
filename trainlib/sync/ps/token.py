"""Where the shared parameter-server token comes from.

Order: an explicit value, env TRAINLIB_PS_TOKEN, a file (argument, or env TRAINLIB_PS_TOKEN_FILE —
on Kubernetes a mounted Secret). In colocated mode with none of these, rank 0 generates one
(`new_token`) and the group shares it over torch.distributed, so nothing secret is typed anywhere.
"""
from __future__ import annotations

import ipaddress
import os
import secrets
import socket

TOKEN_ENV = "TRAINLIB_PS_TOKEN"
TOKEN_FILE_ENV = "TRAINLIB_PS_TOKEN_FILE"
MIN_TOKEN_CHARS = 16


class TokenError(ValueError):
    """A missing, empty or too short token, or insecure mode where it is not allowed."""


def new_token() -> str:
    return secrets.token_hex(32)


def read_token(token_file: str | None = None, token: str | None = None,
               env: dict[str, str] | None = None) -> str | None:
    """The token from the first source that has one, or None when no source is configured."""
    env = os.environ if env is None else env
    source, value = "argument", token
    if value is None and env.get(TOKEN_ENV):
        source, value = f"${TOKEN_ENV}", env[TOKEN_ENV]
    if value is None:
        path = token_file or env.get(TOKEN_FILE_ENV)
        if path:
            try:
                with open(path, encoding="utf-8") as f:
                    value = f.read().strip()
            except OSError as e:
                raise TokenError(f"cannot read the token file {path!r} ({e.strerror}); check the Secret mount "
                                 f"or {TOKEN_FILE_ENV}") from None
            source = f"file {path}"
    if value is None:
        return None
    value = value.strip()
    if len(value) < MIN_TOKEN_CHARS:
        raise TokenError(f"the token from {source} has {len(value)} characters; use at least {MIN_TOKEN_CHARS} "
                         "(e.g. `python -c 'import secrets; print(secrets.token_hex(32))'`)")
    return value


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        try:
            return ipaddress.ip_address(socket.gethostbyname(host)).is_loopback
        except OSError:
            return False
