"""Errors a user can cause and fix.

Every exception raised for bad input (a path, a flag, a file's contents) is a
`UserError` whose message names the offending thing and says how to fix it.
Launchers print the message and exit with status 2 instead of a stack trace.
"""


class UserError(Exception):
    """An error caused by the user's input, with a message saying how to fix it."""


class DataError(UserError):
    """Input data (caption files, split lists, images, records) is unusable."""


class ConfigError(UserError):
    """A configuration value or flag is invalid or inconsistent."""
