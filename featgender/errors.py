"""The one exception type featgender raises for bad input; the CLI turns it into a one-line error."""


class FeatgenderError(ValueError):
    """Bad input (a file, an option, a cache) described in one line that names it."""
