"""Errors written for operators. The CLI prints one line and exits 2 for InputError, 1 otherwise."""


class LbError(Exception):
    """Something went wrong; the message says what, in the operator's terms."""


class InputError(LbError):
    """The request is malformed, names something unknown, or conflicts with what exists."""


class StoreUnreachable(LbError):
    """The shared store (etcd) does not answer: nothing was read from it or changed."""


EXIT_ERROR = 1  # something went wrong
EXIT_USAGE = 2  # bad input: nothing was changed
