"""`python -m seat.info` reports what is really built and usable."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import torch


def _info(*args: str, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "seat.info", *args], check=True, capture_output=True, text=True,
                          env=env)


def test_json_report_is_accurate():
    env = {k: v for k, v in os.environ.items() if k not in ("SEAT_BACKEND", "TRITON_INTERPRET")}
    info = json.loads(_info("--json", env=env).stdout)
    from seat.ops import _native

    module = _native.load()
    assert info["torch"] == torch.__version__
    assert info["native"]["usable"] is True
    assert info["native"]["with_cuda"] == bool(module.with_cuda)
    assert info["native"]["cuda_archs"] == module.cuda_archs
    # a CUDA build of torch and an nvcc on PATH at build time give CUDA kernels
    if torch.version.cuda and shutil.which("nvcc") and not os.environ.get("SEAT_SKIP_CUDA_BUILD"):
        assert info["native"]["with_cuda"] is True
        assert "9.0" in info["native"]["cuda_archs"]
    assert info["backends"]["cpu@cpu"]["usable"] is True
    assert info["backends"]["triton@cpu"]["usable"] is False
    assert "TRITON_INTERPRET" in info["backends"]["triton@cpu"]["why"]
    assert info["ops"]["masked_gather_"]["default@cpu"] == "cpu"
    assert set(info["ops"]) == {"masked_gather_", "masked_swap_", "sparse_adamw_", "kl_div", "paired_loss",
                                "fused_linear_paired_loss", "implicit_block_offsets_", "dequant4_delta"}
    for op in ("implicit_block_offsets_", "sparse_adamw_"):  # the mask family has native kernels
        assert info["ops"][op]["default@cpu"] == "cpu", info["ops"][op]
    cuda_devices = [d for d in info["devices"] if d["device"].startswith("cuda")]
    assert len(cuda_devices) == torch.cuda.device_count()
    if not torch.cuda.is_available():
        assert info["cuda_unavailable"]


def test_text_report_mentions_every_section():
    text = _info().stdout
    for needle in ("seat ", "native:", "devices:", "backends:", "ops (implemented backends"):
        assert needle in text
