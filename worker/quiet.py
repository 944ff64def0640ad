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
    """Drop the notices at each library's own log handler, and keep the libraries' records there.

    A logger's filters see only the records logged on it, not its children's, so the filter sits on the
    handlers. transformers lets its records propagate to the root logger (to our handlers, unfiltered)
    whenever the environment says ``CI=1``; each library root is set not to propagate, as both libraries
    do by default elsewhere, so no environment variable decides what an operator sees.
    """
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    roots = (diffusers_logging.get_logger("diffusers"), transformers_logging.get_logger("transformers"))
    for root in roots:
        root.propagate = False
        for handler in root.handlers:
            if not any(isinstance(f, _DropFlaxDeprecation) for f in handler.filters):
                handler.addFilter(_DropFlaxDeprecation())
