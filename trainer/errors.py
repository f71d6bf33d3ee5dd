"""The one exception type for mistakes a user can fix."""


class UserError(Exception):
  """Bad input: a config value, a path, a record. The CLI prints the message alone."""
