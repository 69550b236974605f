"""The one exception type for mistakes a user can fix (bad path, bad spec, bad knob)."""


class UserError(ValueError):
    """A problem with the user's input; the CLI prints it as one line and exits 2."""
