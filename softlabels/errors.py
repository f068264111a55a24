"""The exception type that the CLI turns into a one-line ``error: ...`` message, and its one kind
that a caller handles apart: data a spec names that is not there."""


class SoftlabelsError(Exception):
    """A problem the user can fix: bad input, a refused checkpoint, an unusable cache.

    Example::

        raise SoftlabelsError("checkpoint not found: teacher.pth")   # the CLI prints: error: checkpoint not found: ...
    """


class MissingData(SoftlabelsError):
    """A data spec whose file or folder is not there (data that moved since a cache was dumped from it).

    Example::

        raise MissingData("data spec train.npz: no such file or directory")
    """


def user_message(exc: SoftlabelsError) -> str:
    """The message of ``exc``, also when a DataLoader worker raised it: PyTorch re-raises a worker's
    exception as ``SoftlabelsError("Caught SoftlabelsError in DataLoader worker process 0. Original
    Traceback ...")``, whose last line is the original ``softlabels.errors.SoftlabelsError: message``.

    Example::

        user_message(SoftlabelsError("cannot decode cat/1.jpg"))   # 'cannot decode cat/1.jpg'
    """
    text = str(exc)
    marker = f"{SoftlabelsError.__module__}.{SoftlabelsError.__name__}: "
    if text.startswith(f"Caught {SoftlabelsError.__name__} in DataLoader worker") and marker in text:
        return text.rsplit(marker, 1)[1].strip()
    return text
