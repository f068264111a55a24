"""``python -m softlabels`` (what torchrun starts) and the ``softlabels`` command.

The command's libraries (torch above all) take a second or more to import. A Ctrl-C meanwhile ends it
at once with one line and exit code 130, as a Ctrl-C while it works does: raised as KeyboardInterrupt,
it would print the import's traceback, or abort inside torch's C++ code.
"""

import os
import signal


def _interrupted(signum: int, frame: object) -> None:
    os.write(2, b"error: interrupted\n")
    os._exit(130)  # nothing is written yet, and nothing must run in a half-imported torch


def main() -> None:
    starting = signal.getsignal(signal.SIGINT) is signal.default_int_handler  # not where SIGINT is ignored (nohup)
    if starting:
        signal.signal(signal.SIGINT, _interrupted)
    from .cli import main as run

    if starting:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    run()


if __name__ == "__main__":
    main()
