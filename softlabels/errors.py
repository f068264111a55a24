"""The exception type that the CLI turns into a one-line ``error: ...`` message, its one kind that
a caller handles apart (data a spec names that is not there), and that message."""

import re


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


def user_message(exc: Exception) -> str:
    """What the CLI prints for ``exc``: a :class:`SoftlabelsError`'s message, or another exception's
    type and message with a pointer to ``--debug``. An exception in a DataLoader worker or its
    pinned-memory thread is re-raised by PyTorch as ``Type("Caught Type in DataLoader worker process
    0. Original Traceback ...")`` (a ``RuntimeError`` where ``Type`` cannot be rebuilt from a
    message), whose last line is the original ``module.Type: message``: that line is what counts.

    Example::

        user_message(SoftlabelsError("cannot decode cat/1.jpg"))   # 'cannot decode cat/1.jpg'
    """
    text = str(exc)
    if re.match(r"Caught \w+ in (DataLoader worker process|pin memory thread)", text):
        last = text.strip().splitlines()[-1].strip()
        own = re.match(r"softlabels(\.\w+)*\.\w+: ", last)  # one of this package's errors, all meant for the user
        if own:
            return last[own.end():]
        return f"{last} (in a DataLoader worker; rerun with --num-workers 0 --debug for the traceback)"
    if isinstance(exc, SoftlabelsError):
        return text
    return f"{type(exc).__name__}: {text} (rerun with --debug for the traceback)"
