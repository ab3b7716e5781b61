"""The converter's one error type."""


class ConversionError(ValueError):
    """The checkpoint cannot be converted as asked; the message says what is wrong and what to do."""
