"""Errors the engine reports as one line instead of a traceback."""


class CaseError(Exception):
    """A single input case cannot be processed; the message names the file and the problem."""


class ModelError(Exception):
    """The model folder cannot be loaded; the message names the file and the problem."""
