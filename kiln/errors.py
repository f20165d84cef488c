"""User-facing errors: raised where user input enters, printed as one line by the CLI."""


class KilnError(Exception):
    """A mistake the user can fix (bad checkpoint, bad config, bad request).

    The message says what is wrong and, where possible, how to fix it. The CLI prints
    it without a traceback; the server turns it into a 4xx.
    """


class CheckpointError(KilnError):
    """The source checkpoint is missing, corrupt, or does not match its config."""


class BuildError(KilnError):
    """The build configuration cannot be applied to this model."""


class RequestError(KilnError):
    """One request is invalid (too long, bad sampling parameters); others go on."""


class PromptTooLongError(RequestError):
    """The prompt (with max_tokens) does not fit the engine's max_seq_len: OpenAI's
    context_length_exceeded."""
