"""The project's exception types. Their message is what the user reads; the CLI maps them to exit codes."""


class PTQError(Exception):
    """Base class of every error ptq raises on purpose. ``exit_code`` is what the CLI exits with."""

    exit_code = 1


class InputError(PTQError):
    """Bad user input: a missing or invalid file, a sample that does not fit the model, an unknown option."""

    exit_code = 2


def first_line(e: Exception, width: int = 200) -> str:
    """The first line of an exception's message (its type name where it has none), cut to ``width``."""
    text = str(e).strip().splitlines()
    return text[0][:width] if text else type(e).__name__


class QualityError(PTQError):
    """The quantized model is written but fails a quality check: exit 3. Raised by ``ptq.run.run`` after writing;
    ``result`` and ``paths`` are what was written (None where it is raised before)."""

    exit_code = 3

    def __init__(self, message: str, result=None, paths=None):
        super().__init__(message)
        self.result, self.paths = result, paths


class AccuracyGateError(QualityError):
    """The quantized model lost more accuracy than ``--max-drop`` allows."""


class FidelityError(QualityError):
    """``--strict``: an output (or a slice of one) of the quantized model is under the fidelity bounds."""
