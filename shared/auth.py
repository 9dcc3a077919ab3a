"""Passwords (bcrypt) and tokens (JWT, HS256 pinned)."""

from __future__ import annotations

import time

import bcrypt
import jwt

from shared.errors import Unauthorized

ALGORITHM = "HS256"
MAX_PASSWORD_BYTES = 72  # bcrypt ignores everything past 72 bytes; we refuse instead of truncating
MIN_PASSWORD_BYTES = 8

# A hash of a random password, checked when the email is unknown so both 401s take the same time.
_DUMMY_HASH_CACHE: dict[int, bytes] = {}


def hash_password(password: str, rounds: int) -> str:
    return bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=rounds)).decode()


def check_password(password: str, password_hash: str | None, rounds: int) -> bool:
    """True when the password matches; with no hash, burns the same time and returns False."""
    if password_hash is None:
        dummy = _DUMMY_HASH_CACHE.get(rounds)
        if dummy is None:
            dummy = _DUMMY_HASH_CACHE[rounds] = bcrypt.hashpw(b"not-a-password", bcrypt.gensalt(rounds))
        bcrypt.checkpw(password.encode()[:MAX_PASSWORD_BYTES], dummy)
        return False
    try:
        return bcrypt.checkpw(password.encode(), password_hash.encode())
    except ValueError:
        return False


def issue_token(user_id: int, secret: str, ttl_seconds: int, now: float | None = None) -> str:
    issued = int(time.time() if now is None else now)
    claims = {"sub": str(user_id), "iat": issued, "exp": issued + ttl_seconds}
    return jwt.encode(claims, secret, algorithm=ALGORITHM)


def verify_token(token: str, secret: str) -> int:
    """The user id in a valid token; Unauthorized for anything else (alg none, forged, expired)."""
    try:
        claims = jwt.decode(
            token,
            secret,
            algorithms=[ALGORITHM],
            options={"require": ["exp", "iat", "sub"]},
        )
        sub = claims["sub"]
        if not isinstance(sub, str) or not sub.isdigit():
            raise Unauthorized("The token's subject is invalid.")
        return int(sub)
    except jwt.ExpiredSignatureError:
        raise Unauthorized("The token has expired.") from None
    except jwt.PyJWTError:
        raise Unauthorized("The token is invalid.") from None


def bearer_token(header: str | None) -> str:
    """The token in an ``Authorization: Bearer …`` header; Unauthorized when absent or malformed."""
    if not header:
        raise Unauthorized("An Authorization: Bearer token is required.")
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or " " in token:
        raise Unauthorized("The Authorization header must be 'Bearer <token>'.")
    return token
