"""lorafam: fine-tune Hugging Face models with the LoRA family."""

import logging


def _drop_kernels_hub_notice(record: logging.LogRecord) -> bool:
    # bitsandbytes on CPU tries to fetch a fused kernel from the hub at import and logs a warning
    # when the optional `kernels` package is absent; it then uses its bundled CPU library, so the
    # line is noise for our users.
    return "kernels-community" not in record.getMessage()


logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_drop_kernels_hub_notice)

__version__ = "0.1.0"
