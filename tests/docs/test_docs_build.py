"""The documentation: the mkdocs site builds with --strict (no broken link, anchor or API
reference), the README stays a short front page whose links resolve, and what the
benchmarks pages copy from benchmarks/results (plots, the loss-kernel table) is what the
results files hold."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
RESULTS = ROOT / "benchmarks" / "results"
DOCS = ROOT / "docs"

# docs/benchmarks/img/<name> -> the results file it is a copy of
IMAGES = {
    "seat_step.png": "amd-epyc-1-threads/seat_step.png",
    "sparse_adamw.png": "amd-epyc-2-threads/sparse_adamw.png",
    "bench_kl_div.png": "amd-epyc-2-threads/bench_kl_div.png",
    "demo_results.png": "amd-epyc-1-threads/demo/demo_results.png",
}

# [text](target) or ![alt](target), target up to the first space or closing parenthesis
_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)[^)]*\)")


def relative_links(markdown: str) -> list[str]:
    """The link targets of `markdown` that are paths in this repository (no scheme, no
    pure #anchor, no mailto), without their #anchor; fenced code blocks are skipped."""
    text = re.sub(r"```.*?```", "", markdown, flags=re.S)
    out = []
    for target in _LINK.findall(text):
        if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target) or target.startswith("#"):
            continue
        out.append(target.split("#", 1)[0])
    return out


def markdown_table(text: str) -> list[list[str]]:
    """The rows (cells stripped) of the first markdown table in `text`, header included,
    separator row left out."""
    rows = []
    for line in text.splitlines():
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if not all(set(c) <= set("-: ") for c in cells):
                rows.append(cells)
        elif rows:
            break
    return rows


def test_mkdocs_build_strict(tmp_path):
    for module, extra in (("mkdocs", "mkdocs"), ("material", "mkdocs-material"),
                          ("mkdocstrings_handlers.python", "mkdocstrings[python]")):
        pytest.importorskip(module, reason=f"{extra} is not installed: pip install -e '.[docs]'")
    site = tmp_path / "site"
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{proc.stdout}\n{proc.stderr}"
    # the API pages hold the rendered objects (griffe found them), not just their headings
    api = (site / "reference" / "patch" / "index.html").read_text(encoding="utf-8")
    for anchor in ("seat.patching.patch", "seat.patching.SeatHandle.loss", "seat.config.SeatConfig"):
        assert f'id="{anchor}"' in api, f"{anchor} is missing from the rendered API reference"
    ops = (site / "reference" / "ops" / "index.html").read_text(encoding="utf-8")
    for op in ("masked_gather_", "masked_swap_", "sparse_adamw_", "implicit_block_offsets_", "kl_div",
               "paired_loss", "fused_linear_paired_loss"):
        assert re.search(rf'id="seat\.ops\.\w+\.{op}"', ops), f"seat.ops.{op} is missing from the API reference"
    for name in IMAGES:
        assert (site / "benchmarks" / "img" / name).is_file()


def test_readme_is_a_short_front_page():
    text = README.read_text(encoding="utf-8")
    n = len(text.splitlines())
    assert n < 150, f"README.md has {n} lines; keep it under 150 and move details to docs/"
    assert "make test" in text, "README.md must show the test command CI runs (make test, see .ci/run)"


def test_readme_links_resolve():
    links = relative_links(README.read_text(encoding="utf-8"))
    assert links, "README.md links to no docs page"
    broken = [link for link in links if not (ROOT / link).exists()]
    assert not broken, f"README.md links to missing files: {broken}"


def test_relative_links_finds_what_it_should():
    text = ("[a](docs/x.md#sec) ![img](img/p.png) [web](https://example.org) [top](#intro) "
            "[mail](mailto:a@b.c) [t](docs/y.md \"title\")\n```\n[code](not/a/link.md)\n```\n")
    assert relative_links(text) == ["docs/x.md", "img/p.png", "docs/y.md"]


@pytest.mark.parametrize("name", sorted(IMAGES))
def test_benchmark_images_are_the_results_files(name):
    copy, source = DOCS / "benchmarks" / "img" / name, RESULTS / IMAGES[name]
    assert copy.read_bytes() == source.read_bytes(), (
        f"docs/benchmarks/img/{name} differs from benchmarks/results/{IMAGES[name]}: copy the new plot over "
        "and update the numbers and the commit/date on its page")


def test_loss_kernel_table_is_the_results_table():
    page = markdown_table((DOCS / "benchmarks" / "loss-kernels.md").read_text(encoding="utf-8"))
    source = markdown_table((RESULTS / "amd-epyc-2-threads" / "bench_kl_div.md").read_text(encoding="utf-8"))
    assert len(page) == len(source) > 1
    for shown, measured in zip(page, source):
        assert shown == measured[:len(shown)], f"docs row {shown} is not the results row {measured}"


def test_nav_lists_only_existing_pages():
    # mkdocs --strict reports this too; checked here without mkdocs installed
    nav = re.findall(r"^\s*-\s+(?:[^:\n]+:\s+)?(\S+\.md)\s*$", (ROOT / "mkdocs.yml").read_text(encoding="utf-8"),
                     flags=re.M)
    assert nav, "mkdocs.yml has no nav"
    missing = [page for page in nav if not (DOCS / page).is_file()]
    assert not missing, f"mkdocs.yml's nav lists missing pages: {missing}"
