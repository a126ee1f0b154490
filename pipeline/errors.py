"""Errors a user can fix. The CLI prints them as one short line (no traceback) and exits non-zero."""


class UserError(Exception):
    """A bad config value, path or environment. The message names the key or path and what was expected."""


class ModeSkipped(Exception):
    """Raised by a stage when its mode does not apply to this model (e.g. attention on an unconditional
    pipeline). The runner marks the mode as skipped and carries on with the other modes."""
