"""The one exception type the CLI turns into a one-line message and exit code 2."""


class CvaeError(Exception):
    """A usage or data problem the user can fix; str(e) is the whole message."""

    exit_code = 2
