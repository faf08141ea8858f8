"""The one error type for bad input: raised anywhere, caught once by the CLI and the server."""


class InputError(ValueError):
    """A problem with something the user supplied. The message is one line saying what to do."""
