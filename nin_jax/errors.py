"""Errors that reach the user as one line on stderr and a non-zero exit, never a traceback."""


class UserError(Exception):
  """Something the user can fix; the message says how."""

  exit_code = 2


class ConfigError(UserError):
  """An invalid config value or key."""


class DataError(UserError):
  """A data set is missing or unreadable."""


class WorkdirLost(UserError):
  """Another run took the workdir's lock over behind this one's back; this run saved nothing more."""


class TrainingDiverged(UserError):
  """The loss or the state became NaN or infinite; only finite checkpoints were saved."""

  exit_code = 3


class SaveFailed(UserError):
  """A checkpoint could not be written (full disk, read-only or vanished storage); the
  earlier checkpoints are intact."""

  exit_code = 4


class Interrupted(UserError):
  """SIGTERM or SIGINT arrived; a checkpoint was saved before stopping."""

  def __init__(self, message: str, signum: int):
    super().__init__(message)
    self.exit_code = 128 + signum
