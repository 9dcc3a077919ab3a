"""Secrets at rest: SMTP passwords are stored as Fernet tokens, never in clear.

The first key in MAILQ_ENCRYPTION_KEYS encrypts; every key decrypts, so a new key can be put in
front, old rows re-encrypted with ``rotate`` at leisure, and the old key removed afterwards.
"""

from __future__ import annotations

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

from shared.errors import ConfigError


class SecretBox:
    """Encrypts and decrypts small secrets with the configured Fernet keys."""

    def __init__(self, keys: tuple[str, ...]):
        if not keys:
            raise ConfigError("MAILQ_ENCRYPTION_KEYS is missing (a Fernet key is required)")
        try:
            self._primary = Fernet(keys[0].encode())
            self._fernet = MultiFernet([Fernet(k.encode()) for k in keys])
        except (ValueError, TypeError):
            raise ConfigError("MAILQ_ENCRYPTION_KEYS holds a key that is not a valid Fernet key") from None

    def encrypt(self, clear: str) -> str:
        return self._fernet.encrypt(clear.encode()).decode()

    def decrypt(self, token: str) -> str:
        try:
            return self._fernet.decrypt(token.encode()).decode()
        except InvalidToken:
            raise ConfigError("a stored secret cannot be decrypted with the configured keys") from None

    def rotate(self, token: str) -> str:
        """The same secret re-encrypted under the first (newest) key."""
        try:
            return self._fernet.rotate(token.encode()).decode()
        except InvalidToken:
            raise ConfigError("a stored secret cannot be decrypted with the configured keys") from None

    def is_current(self, token: str) -> bool:
        """True when the first key alone decrypts it (nothing to rotate)."""
        try:
            self._primary.decrypt(token.encode())
            return True
        except InvalidToken:
            return False


def generate_key() -> str:
    return Fernet.generate_key().decode()
