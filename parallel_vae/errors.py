"""Error types the nodes turn into messages on the node that raised them."""


class InputError(ValueError):
    """A node input is not acceptable. The message starts with the input's name."""

    def __init__(self, input_name: str, message: str):
        self.input_name = input_name
        super().__init__(f"{input_name}: {message}")


class DecodeError(RuntimeError):
    """Decoding could not finish (a model failed, produced the wrong shape, ...)."""


class ModelMismatch(InputError):
    """A VAE rebuilt elsewhere (a worker, another device) is not the model ComfyUI built: an error
    about the ``vae`` input, never a silent wrong decode."""

    def __init__(self, what: str):
        self.what = what
        super().__init__("vae", f"{what}. This VAE cannot be rebuilt outside ComfyUI's own copy "
                                f"(its architecture may come from file metadata this ComfyUI does not "
                                f"keep); decode it on the one device it is on (devices=cpu, or its GPU)")
