"""User-facing errors: each renders as one line naming the file, field or value at fault."""


class DebiaslabError(Exception):
    """Base class for errors that the CLI prints as a single line (no traceback)."""


class ConfigError(DebiaslabError):
    """A config key or value is unknown or invalid."""


class DataError(DebiaslabError):
    """An input dataset file is missing, malformed or inconsistent."""


class CheckpointError(DebiaslabError):
    """A checkpoint is missing, corrupt or incompatible."""


class TrainingDiverged(DebiaslabError):
    """The training loss became NaN or infinite."""
