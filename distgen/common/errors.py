class ConfigError(ValueError):
    """A config key or value a user gave is not allowed; the message names both."""


class IncompleteOutputError(RuntimeError):
    """The gathered outputs do not cover every prompt exactly once."""
