"""The user's mistakes (a wrong argument, a missing or damaged file, a full disk) as one type, so that train.py
reports them as one line and lets everything else (our bugs, the GPU's failures) keep its traceback."""


class UsageError(ValueError):
    """A mistake of the user's, said in one line: what is wrong and what to do."""
