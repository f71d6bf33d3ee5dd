"""The one exception type for mistakes a user can fix."""


class UserError(Exception):
  """Bad input: a config value, a path, a record. The CLI prints the message alone."""


class Diverged(UserError):
  """The loss or gradient stopped being finite; the run stops with the last good checkpoint."""


class Preempted(Exception):
  """A stop signal arrived; the state was saved. The CLI exits with PREEMPTED_EXIT_CODE."""

  def __init__(self, step: int):
    super().__init__(f'preempted at step {step}: checkpoint saved; run the same command to resume')
    self.step = step


# EX_TEMPFAIL from sysexits.h: "temporary failure, try again". Launchers relaunch on it.
PREEMPTED_EXIT_CODE = 75
