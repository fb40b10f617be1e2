"""Checkpoint files encrypted with age (https://age-encryption.org), through pyrage.

- Recipients are native X25519 keys (`age1...`) or SSH public keys (`ssh-ed25519 ...`,
  `ssh-rsa ...`), at most `MAX_RECIPIENTS`; anything else is a user error naming it.
- Every file is encrypted to all recipients and stored as `<file>.age`: the cookbook's download
  refuses any file that is not.
"""

from __future__ import annotations

from configs.errors import UserError

MAX_RECIPIENTS = 10


def parse_recipients(values: list[str]) -> list:
    import pyrage

    if len(values) > MAX_RECIPIENTS:
        raise UserError(f"age_encryption_recipients: {len(values)} given, at most {MAX_RECIPIENTS}")
    parsed = []
    for value in values:
        text = value.strip() if isinstance(value, str) else ""
        try:
            if text.startswith("age1"):
                parsed.append(pyrage.x25519.Recipient.from_str(text))
            elif text.startswith("ssh-"):
                parsed.append(pyrage.ssh.Recipient.from_str(text))
            else:
                raise ValueError("not an age1... key nor an ssh public key")
        except (ValueError, pyrage.RecipientError) as exc:
            raise UserError(f"age_encryption_recipients: {text[:80]!r} is not an age recipient ({exc})") from None
    return parsed


def encrypt_files(files: dict[str, bytes], recipients: list) -> dict[str, bytes]:
    import pyrage

    return {f"{name}.age": pyrage.encrypt(data, recipients) for name, data in files.items()}
