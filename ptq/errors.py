"""The project's exception types. Their message is what the user reads; the CLI maps them to exit codes."""


class PTQError(Exception):
    """Base class of every error ptq raises on purpose. ``exit_code`` is what the CLI exits with."""

    exit_code = 1


class InputError(PTQError):
    """Bad user input: a missing or invalid file, a sample that does not fit the model, an unknown option."""

    exit_code = 2


class AccuracyGateError(PTQError):
    """The quantized model lost more accuracy than ``--max-drop`` allows."""

    exit_code = 3
