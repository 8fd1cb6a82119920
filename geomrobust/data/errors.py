"""The one exception type of the data layer."""


class DataError(Exception):
  """A data set cannot be found, read or trusted.

  The message is always ONE line that says what is wrong and how to fix it,
  and names the file or folder involved, so that a failed run's log tells the
  user what to do without a traceback.
  """
