"""The one exception type of `shared.attack` for bad arguments and unattackable models."""

from __future__ import annotations


class AttackError(ValueError):
    """An attack cannot run as asked; the message is one line saying what to change."""
