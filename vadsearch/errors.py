"""The exception family. The CLI turns any `VadsearchError` into one line and its exit code."""


class VadsearchError(Exception):
    """An error the user can fix; its message says what to do next."""

    exit_code = 1


class DataError(VadsearchError):
    """The corpus cannot be found, downloaded or parsed, or fails validation."""

    exit_code = 2


class ConfigError(VadsearchError):
    """A training configuration or option has an invalid value."""

    exit_code = 2


class StudyFileError(VadsearchError):
    """A study file is malformed: unknown key, wrong type, impossible range."""

    exit_code = 2


class StorageError(VadsearchError):
    """The study storage cannot be reached or does not hold what was asked for."""

    exit_code = 3


class StorageUrlError(StorageError):
    """A storage URL that is no database URL, or names a database or driver vadsearch does not use: bad
    input, as any other mistyped option."""

    exit_code = 2


class MachineFault(VadsearchError):
    """This machine cannot run trials now, whatever the configuration: a worker that meets one stops, and
    its trial is queued again without spending the configuration's retries."""


class CheckpointError(MachineFault):
    """A checkpoint cannot be written (disk full, read-only directory)."""

    exit_code = 4


class OutputError(VadsearchError):
    """A directory for results (logs, figures, an exported model) cannot be made or written."""

    exit_code = 4


class TrainingError(VadsearchError):
    """Training cannot go on: the loss diverged to NaN or infinity, or the configuration alone does not
    fit in the GPU's memory."""

    exit_code = 5


class GpuMemoryError(MachineFault):
    """The GPU ran out of memory while other processes held most of it: too many workers share it."""

    exit_code = 6
