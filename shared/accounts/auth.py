"""Passwords (bcrypt) and tokens (JWT, HS256 pinned)."""

from __future__ import annotations

import time
from dataclasses import dataclass

import bcrypt
import jwt

from shared.errors import Unauthorized
from shared.validation import MAX_PASSWORD_BYTES

ALGORITHM = "HS256"
# Pods' clocks drift a little: a token minted by a pod a few seconds ahead is not refused as "issued in
# the future" by one behind it, nor one just past exp. Far less than any token's lifetime.
TOKEN_LEEWAY_SECONDS = 30


def hash_password(password: str, rounds: int) -> str:
    return bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=rounds)).decode()


def check_password(password: str, password_hash: str | None, rounds: int) -> bool:
    """True when the password matches. Every call does exactly one bcrypt check of full cost, so an
    unknown email (no hash), a password bcrypt would refuse at once (over 72 bytes) and a wrong
    password all take the same time: no 401 tells a registered email apart."""
    secret = password.encode()
    if password_hash is not None and len(secret) <= MAX_PASSWORD_BYTES:
        try:
            return bcrypt.checkpw(secret, password_hash.encode())
        except ValueError:  # a malformed stored hash: bcrypt did no work, so the check below does it
            pass
    # A bare salt is a hash that matches nothing: checking against it costs what a real check costs
    # (at the stored hash's cost when there is one), and making it costs nothing.
    cost = _cost(password_hash) or rounds
    bcrypt.checkpw(secret[:MAX_PASSWORD_BYTES], bcrypt.gensalt(rounds=cost))
    return False


def _cost(password_hash: str | None) -> int | None:
    """The cost factor of a bcrypt hash ("$2b$12$…" → 12); None when there is none to read."""
    if password_hash is None:
        return None
    parts = password_hash.split("$")
    return int(parts[2]) if len(parts) > 3 and parts[2].isdigit() and 4 <= int(parts[2]) <= 31 else None


@dataclass(frozen=True)
class TokenClaims:
    """Who a valid token speaks for, and the generation of the user's tokens it belongs to: a password
    change or a logout-all raises the user's generation, and every token of an older one is refused."""

    user_id: int
    generation: int


def issue_token(
    user_id: int, secret: str, ttl_seconds: int, now: float | None = None, generation: int = 0
) -> str:
    issued = int(time.time() if now is None else now)
    claims = {"sub": str(user_id), "iat": issued, "exp": issued + ttl_seconds, "gen": generation}
    return jwt.encode(claims, secret, algorithm=ALGORITHM)


def verify_token(token: str, secret: str) -> int:
    """The user id in a valid token; Unauthorized for anything else (alg none, forged, expired)."""
    return verify_claims(token, secret).user_id


def verify_claims(token: str, secret: str) -> TokenClaims:
    """The user id and token generation of a valid token; Unauthorized for anything else. A token from
    before generations existed has none: it is generation 0, which every user starts at."""
    try:
        claims = jwt.decode(
            token,
            secret,
            algorithms=[ALGORITHM],
            options={"require": ["exp", "iat", "sub"]},
            leeway=TOKEN_LEEWAY_SECONDS,
        )
        sub, generation = claims["sub"], claims.get("gen", 0)
        if not isinstance(sub, str) or not sub.isdigit():
            raise Unauthorized("The token's subject is invalid.")
        if not isinstance(generation, int) or isinstance(generation, bool) or generation < 0:
            raise Unauthorized("The token is invalid.")
        return TokenClaims(int(sub), generation)
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
