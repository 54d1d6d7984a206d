"""The one exception the application reports to its user as a message, without a traceback."""


class RunError(Exception):
    """Something about the user's input stops the run: the message says what is wrong and how to fix it."""
