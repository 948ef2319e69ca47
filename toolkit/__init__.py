"""tk: fine-tune large language models from one Python config file."""
from . import quiet
from .version import __version__

quiet.install()

__all__ = ["__version__"]
