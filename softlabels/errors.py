"""The one exception type that the CLI turns into a one-line ``error: ...`` message."""


class SoftlabelsError(Exception):
    """A problem the user can fix: bad input, a refused checkpoint, an unusable cache.

    Example::

        raise SoftlabelsError("checkpoint not found: teacher.pth")   # the CLI prints: error: checkpoint not found: ...
    """
