"""Silence the import-time log lines of our dependencies that a user cannot act on.

Importing ``transformers``' model code imports ``torchao`` when it is installed, and that
logs, on every ``osd`` command: "Failed to load .../_C_mxfp8...so" (CUDA kernels a CPU
build cannot load) and two ``torch.utils._pytree`` deprecation notices about torchao's
own enums; ``bitsandbytes`` (through ``galore_torch``) logs that the optional ``kernels``
package is missing. Each filter drops exactly those messages, on the one logger that emits
them; every other warning of those loggers, and every ``warnings.warn``, still shows.
"""

from __future__ import annotations

import logging
import re

__all__ = ["NOT_ACTIONABLE", "install"]

# logger name -> messages (regular expressions, searched in the formatted message) to drop
NOT_ACTIONABLE: dict[str, tuple[str, ...]] = {
    "torchao": (r"^Failed to load .*\.so\b", r"^Skipping import of cpp extensions"),
    "torch.utils._pytree": (r"is an Enum subclass and is now natively supported by torch\.compile",),
    "bitsandbytes.backends.cpu.ops": (r"from kernels-community",),
}


class _DropMessages(logging.Filter):
    def __init__(self, patterns: tuple[str, ...]) -> None:
        super().__init__()
        self.pattern = re.compile("|".join(f"(?:{p})" for p in patterns))

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.search(record.getMessage())


def install() -> None:
    """Add the filters (once) to the loggers of :data:`NOT_ACTIONABLE`."""
    for name, patterns in NOT_ACTIONABLE.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessages) for f in logger.filters):
            logger.addFilter(_DropMessages(patterns))
