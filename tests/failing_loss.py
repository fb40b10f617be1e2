"""A custom loss that raises (for tests: a broken loss fails its own request only)."""

from losses import register_custom_loss


def broken(logprobs, inputs, config):
    raise ZeroDivisionError("this loss is broken")


register_custom_loss("broken_loss", broken, description="test: always raises")
