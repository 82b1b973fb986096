"""Errors that rotq reports to the user instead of a traceback."""


class RotqError(Exception):
    """A user mistake (bad path, unknown name, empty text...). The CLI prints it as one line and exits 2."""
