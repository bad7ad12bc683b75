"""Error types shared by every layer, so the CLI can print bad-input errors as one line."""


class UserError(Exception):
    """Bad input from the user (config, dataset, checkpoint, observation): printed as one line, no traceback."""


class ConfigError(UserError, ValueError):
    """A config key, value or preset is wrong; the message names it."""


class DataError(UserError, ValueError):
    """A dataset store is missing, malformed or inconsistent; the message names the path and key."""


class CheckpointError(UserError, ValueError):
    """A checkpoint is missing, corrupt or does not match the requested policy."""


class ObservationError(UserError, ValueError):
    """An observation does not match what the policy was trained on; the message names key, shape and dtype."""
