"""One exception type for every user-facing failure.

The CLI prints its message as a single line and exits non-zero, so each message must name the
problem *and* the fix.
"""


class MeestralError(Exception):
    """A problem the user can fix (bad path, bad argument, mismatched heads...)."""
