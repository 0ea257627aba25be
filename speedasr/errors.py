"""Errors a user can act on. The CLI prints them as one line (no traceback) and exits non-zero."""


class UserError(Exception):
    """Bad input from the user: a missing file, a malformed manifest, an unknown config key.

    The message must name the input and the problem, e.g.
    ``"cuts file 'data/train.jsonl.gz' does not exist"``.
    """
