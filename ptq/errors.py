"""The project's exception types. Their message is what the user reads; the CLI maps them to exit codes."""


class PTQError(Exception):
    """Base class of every error ptq raises on purpose. ``exit_code`` is what the CLI exits with."""

    exit_code = 1


class InputError(PTQError):
    """Bad user input: a missing or invalid file, a sample that does not fit the model, an unknown option."""

    exit_code = 2


class AccuracyGateError(PTQError):
    """The quantized model lost more accuracy than ``--max-drop`` allows. Raised by ``ptq.run.run`` after
    writing: ``result`` and ``paths`` are what was written (None where it is raised before)."""

    exit_code = 3

    def __init__(self, message: str, result=None, paths=None):
        super().__init__(message)
        self.result, self.paths = result, paths


class FidelityError(PTQError):
    """``--strict``: an output (or a slice of one) of the quantized model is under the fidelity bounds. Raised
    after writing, like AccuracyGateError."""

    exit_code = 3

    def __init__(self, message: str, result=None, paths=None):
        super().__init__(message)
        self.result, self.paths = result, paths
