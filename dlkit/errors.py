"""The error a user's configuration can cause, in a module that imports nothing of dlkit.

    from dlkit import errors
    raise errors.ConfigError("train.steps: expected a positive int, got 0")

It lives apart from `dlkit.config` so that the modules the config checks against (the model
registry) can raise it without importing the config. `dlkit.config.ConfigError` and
`dlkit.ConfigError` are this class.
"""


class ConfigError(ValueError):
    """A bad key or value in a configuration or an override."""
