"""tk: fine-tune LLMs from one Python config file (full, LoRA, QLoRA, quantum adapters)."""
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent


def version() -> str:
    scope: dict = {}
    exec((HERE / "toolkit" / "version.py").read_text(), scope)
    return scope["__version__"]


# torch is deliberately given as a range that the CPU wheel on disk (2.13.0) satisfies:
# `pip install torch==2.13.0` first, and nothing here pulls a CUDA build.
install_requires = [
    "torch>=2.4",
    "transformers>=5.17,<6",
    "peft>=0.21",
    "accelerate>=1.10",
    "mmengine==0.10.7",
    "datasets>=4",
    "safetensors>=0.4",
    "gguf>=0.17",            # reading the embedded SmolLM2 GGUF
    "champ-dataset==1.0.0",  # embedded real math data (MIT)
    "pillow",                # pictures of multimodal data (also a matplotlib dependency)
    "tqdm",
    "matplotlib",
    "tensorboard",
]

extras = {
    "deepspeed": ["deepspeed>=0.16"],
    "bnb": ["bitsandbytes>=0.45"],
    "web": ["gradio>=6,<7", "fastapi", "uvicorn"],
    # openai + selenium: the serve/web tests (selenium drives Debian's chromium + chromium-driver)
    # bitsandbytes: its CPU kernels check tk's torch-op 4-bit path bit for bit (tests/model/test_nf4.py)
    "dev": ["pytest>=8", "pytest-xdist", "hypothesis", "openai>=1", "selenium>=4.11", "bitsandbytes>=0.45",
            "chatterbot-corpus==1.3.3"],  # real YAML dialogs for the data-format tests (BSD)
}

setup(
    name="tk",
    version=version(),
    description=__doc__,
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["toolkit", "toolkit.*"]) + ["toolkit.configs"],
    package_dir={"toolkit.configs": "configs"},
    package_data={"toolkit.configs": ["**/*.py", "**/*.json"]},
    include_package_data=True,
    install_requires=install_requires,
    extras_require=extras,
    entry_points={"console_scripts": ["tk=toolkit.cli.main:main"]},
)
