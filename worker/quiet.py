"""The one place where the Flax deprecation notices of diffusers and transformers are silenced, on purpose.

diffusers 0.39 logs "Flax classes are deprecated..." once per Flax class instantiated (dozens of times
per model load) and transformers 4.57 logs "TensorFlow and JAX classes are deprecated...". We pin those
exact releases because they are the last with the Flax pipeline and the Flax CLIP encoders, so the
notices carry no news for us. Every other message of both libraries still gets through.
"""

from __future__ import annotations

import logging

_NOTICES = ("Flax classes are deprecated", "TensorFlow and JAX classes are deprecated")


class _DropFlaxDeprecation(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(_NOTICES)


def silence_flax_deprecation() -> None:
    """Drop the notices at each library's own log handler (their root loggers do not propagate)."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    roots = (diffusers_logging.get_logger("diffusers"), transformers_logging.get_logger("transformers"))
    for handler in (h for root in roots for h in root.handlers):
        if not any(isinstance(f, _DropFlaxDeprecation) for f in handler.filters):
            handler.addFilter(_DropFlaxDeprecation())
