class ConfigError(ValueError):
    """A config key or value a user gave is not allowed; the message names both."""


class LaunchError(RuntimeError):
    """A launcher's tool (sbatch, scontrol, ray, ssh) refused or failed; the message holds the tool's own words."""


class OutputSpaceError(OSError):
    """output.dir's file system is full (or the user's quota): the message names output.dir and what was kept."""


class IncompleteOutputError(RuntimeError):
    """The gathered outputs do not cover every prompt exactly once."""
