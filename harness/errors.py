"""The harness's own exceptions: user mistakes (one line, exit code 2, no result) and an output
folder that cannot take results (one line, the sweep stops with exit code 1)."""

import errno


class ConfigError(ValueError):
    """A bad value in the configuration or on the command line; the message names it."""


def one_line(error: BaseException, limit: int = 400) -> str:
    """A library's (often multi-line) error message as one line of at most `limit` characters."""
    return " ".join(line.strip() for line in str(error).splitlines() if line.strip())[:limit]


# errors of a write that no later write of the sweep would escape
UNWRITABLE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG)


class OutputUnwritable(BaseException):
    """A result (or another output file) could not be written: the disk is full, over quota
    or read-only. The message names the file and why. A BaseException, like KeyboardInterrupt,
    so that Hydra does not record it as one job's failure and go on to the next job: the
    sweep stops; the results already written are whole, and a rerun resumes."""


def unwritable(error: BaseException) -> OutputUnwritable | None:
    """`error` as an OutputUnwritable if it is a write that the disk refused, else None."""
    if isinstance(error, OSError) and error.errno in UNWRITABLE_ERRNOS:
        where = f"cannot write {error.filename}" if error.filename else "cannot write the output"
        return OutputUnwritable(f"{where}: {error.strerror or error}; the sweep stops (the results written so "
                                "far are whole): free space, then rerun the same command to resume")
    return None
