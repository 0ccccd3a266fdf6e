"""The base class of the errors loopus raises for input it refuses.

`loopus` commands print these as one line naming the problem (`loopus.cli.main`); any other
exception is a bug and keeps its traceback.
"""


class LoopUSError(Exception):
    """Input loopus refuses, with a message that says what is wrong and what to do instead."""


class MissingDependencyError(LoopUSError, ImportError):
    """An optional package a requested feature needs is not installed; the message says what to install."""
