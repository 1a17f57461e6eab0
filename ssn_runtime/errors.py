"""User-facing errors.

An `SSNError` says in one line what is wrong and how to fix it. The CLI prints only
that line; library callers get a short traceback because the error is raised where the
bad input is detected, not deep inside torch.
"""


class SSNError(Exception):
    """Bad input or an unsupported setup, described in one actionable line."""
