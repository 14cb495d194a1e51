"""Errors a user can cause. The CLI prints these as one line and exits 1 (the traceback only with --debug)."""


class CkaqadError(Exception):
    """A known, user-facing error: bad input, a locked run, a missing file."""


class RunLockedError(CkaqadError):
    """Another live process holds the run directory's lock."""


class StageDoneError(CkaqadError):
    """The stage already finished in this run; re-running it needs --force."""

