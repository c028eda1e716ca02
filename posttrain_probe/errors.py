"""The one exception type for bad user input and broken data.

Raised at the boundary with a message that names the bad value and what was expected; the CLI
prints it without a traceback.
"""


class ProbeError(ValueError):
    """Bad input or inconsistent data, with a message meant for the user."""
