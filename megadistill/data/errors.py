"""The error every data problem raises."""


class DataError(ValueError):
    """Bad input text, a damaged or mismatched ``.bin/.idx/.model``, or a preprocessing setting the
    data cannot satisfy. The message is one line naming the file (and line, where there is one);
    the command line prints it and exits with status 2."""
