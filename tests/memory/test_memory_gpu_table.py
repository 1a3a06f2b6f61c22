"""The "Many GPUs" tables of docs/guides/memory.md are what `python -m seat.memory
--multi-gpu-table` prints, and what they say follows from the estimates."""
from __future__ import annotations

import contextlib
import io
from pathlib import Path

import pytest

import seat.memory as sm
from seat.memory import _gpu_table
from seat.memory.__main__ import main as cli_main

GUIDE = Path(__file__).resolve().parents[2] / "docs" / "guides" / "memory.md"


def section_tables(markdown: str, heading: str) -> list[str]:
    """The markdown tables (lines starting with "|") of the section under `heading`, up to
    the next heading of the same level, each as one string."""
    lines = markdown.splitlines()
    start = lines.index(heading) + 1
    level = heading.split(" ", 1)[0] + " "
    tables, current = [], []
    for line in lines[start:]:
        if line.startswith(level):
            break
        if line.startswith("|"):
            current.append(line)
        elif current:
            tables.append("\n".join(current))
            current = []
    if current:
        tables.append("\n".join(current))
    return tables


def test_the_guide_holds_the_generators_tables():
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli_main(["--multi-gpu-table"]) == 0
    printed = out.getvalue().rstrip("\n")
    assert printed == _gpu_table.tables()
    assert section_tables(GUIDE.read_text(encoding="utf-8"), "## Many GPUs") == printed.split("\n\n"), \
        "docs/guides/memory.md is stale: paste the output of python -m seat.memory --multi-gpu-table"


def test_smallest_fit_is_the_fewest_gpus_that_fit():
    arch = sm.Architecture.from_config(sm.load_config("Llama-3-70B"), name="Llama-3-70B")
    kw = dict(density=0.05, **_gpu_table.SETTINGS)
    est = sm.smallest_fit(arch, "32GiB", "fsdp", **kw)
    n = est.options.gpus
    assert est.fits("32GiB", "1GiB") and n > 1
    fewer = sm.estimate_arch(arch, sm.Options(gpus=_gpu_table.GPU_COUNTS[_gpu_table.GPU_COUNTS.index(n) - 1],
                                              strategy="fsdp", **kw))
    assert not fewer.fits("32GiB", "1GiB")
    assert sm.smallest_fit(arch, "32GiB", "dp", **kw) is None  # 131 GiB of weights on every GPU


def test_the_table_flag_takes_no_other_flag(capsys):
    with pytest.raises(SystemExit) as exc:
        cli_main(["--multi-gpu-table", "--config", "Llama-3-8B"])
    assert exc.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith("takes no other flag; drop --config")
    with pytest.raises(SystemExit) as exc:
        cli_main([])  # without the table flag --config is still required
    assert exc.value.code == 2 and "required: --config" in capsys.readouterr().err
