"""The error every family raises for a config.json it cannot run."""


class UnsupportedModelError(ValueError):
    """The checkpoint's config.json describes something we cannot run; the message names the field."""
