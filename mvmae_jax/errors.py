"""The error a bad config raises, apart from config_lib so that any module can raise it
without importing the config checks (and what they import)."""


class ConfigError(ValueError):
    """The config cannot run; the message names the field and what to change."""
