"""The one exception type that means "the user gave us something wrong".

The CLI turns it into a single line on stderr and exit code 2 (a subclass may set another
``exit_code``: a failed merge check exits 1); anything else is a bug and keeps its traceback.
"""


class LorafamError(Exception):
    """Bad input: a recipe key, a data file, a run folder. The message says what and how to fix it."""
