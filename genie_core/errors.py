"""Errors a user can act on. The CLI prints them on one line and exits with status 2."""


class GenieError(Exception):
    """Bad input from the user: a recipe, a plugin, a file. The message names the thing and the valid choices."""


class RecipeError(GenieError):
    """One or more problems in a recipe; `problems` holds every one of them, each a full sentence."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


class PluginError(GenieError):
    """A plugin failed to load or to register its components."""


class TrainingDiverged(GenieError):
    """The loss became NaN or infinite; the message names the stage, the step and the loss term."""


def first_line(error: BaseException) -> str:
    """The first line of an error's message (its type's name when it has none): what a one-line error quotes."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
