"""The one error type the simulator raises for bad input, and a parser that raises it."""

import argparse


class SimError(ValueError):
    """A scenario, catalog entry or number is invalid; the message is one line for the user."""


class OneLineArgumentParser(argparse.ArgumentParser):
    """An argument parser that raises :class:`SimError` instead of printing usage and exiting."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise SimError(message)
