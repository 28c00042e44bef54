"""The one error type the simulator raises for bad input."""


class SimError(ValueError):
    """A scenario, catalog entry or number is invalid; the message is one line for the user."""
