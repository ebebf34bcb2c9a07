"""The one exception type raised by `shared.data` for bad names, files and arguments."""

from __future__ import annotations

from shared.errors import UserError


class DatasetError(UserError, ValueError):
    """A dataset cannot be loaded or partitioned; the message is one line saying how to fix it."""
