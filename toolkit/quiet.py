"""Drop third-party log lines that are noise for tk's users (kept narrow: one message each)."""
import logging

# bitsandbytes >= 0.49 tries, at import on a CPU, to fetch an optional CPU kernel from the Hugging Face hub
# and warns when the `kernels` package is absent; tk works offline and never uses that kernel.
_NOISE = {"bitsandbytes.backends.cpu.ops": "Failed to load CPU gemm_4bit_forward from kernels-community"}


class _DropMessage(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def install() -> None:
    for name, prefix in _NOISE.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessage) for f in logger.filters):
            logger.addFilter(_DropMessage(prefix))
