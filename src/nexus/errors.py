"""The one exception type for mistakes a user can make; the CLI prints it as one line."""


class NexusError(Exception):
    """A problem the user can fix. The message says what is wrong and what to do."""


class TrainingInterrupted(NexusError):
    """Training stopped on a signal after saving a checkpoint; the message says how to resume."""
