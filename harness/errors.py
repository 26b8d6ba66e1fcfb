"""The one exception type for user mistakes: printed as one line, exit code 2, no result."""


class ConfigError(ValueError):
    """A bad value in the configuration or on the command line; the message names it."""
