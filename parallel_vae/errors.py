"""Error types the nodes turn into messages on the node that raised them."""


class InputError(ValueError):
    """A node input is not acceptable. The message starts with the input's name."""

    def __init__(self, input_name: str, message: str):
        self.input_name = input_name
        super().__init__(f"{input_name}: {message}")


class DecodeError(RuntimeError):
    """Decoding could not finish (a model failed, produced the wrong shape, ...)."""
