"""benchmarks/run_all.py runs the benchmarks, writes every file and a summary with the
ratio columns, reports a failing benchmark without hiding the others, and exits non-zero
for it; benchmarks/gpu.sh parses and names stages, make targets and scripts that exist
(dry run: no GPU here). Tiny shapes: the numbers themselves are not asserted."""
from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
import run_all  # noqa: E402
from run_all import Bar, Benchmark  # noqa: E402


def _env():
    # tiny shapes: threads only add synchronization; the worktree's seat first
    path = os.pathsep.join([str(ROOT / "python"), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}


def test_tiny_run_writes_results_summary_and_ratio_columns(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run_all.py"), "--size", "tiny", "--only",
                           "sparse_adamw", "kl_div", "--out", str(tmp_path)],
                          capture_output=True, text=True, env=_env(), timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for stem in ("sparse_adamw_scale64", "bench_kl_div_tiny"):
        for ext in ("csv", "json", "md", "png"):
            assert (tmp_path / f"{stem}.{ext}").stat().st_size > 0, f"{stem}.{ext}"
    for name in ("summary.md", "summary.json", "summary.csv", "sparse_adamw.log", "kl_div.log"):
        assert (tmp_path / name).is_file(), name

    summary = (tmp_path / "summary.md").read_text()
    assert summary in proc.stdout  # the table is printed
    header_lines = [line for line in summary.splitlines() if line.startswith("| method") or line.startswith("| op")]
    assert len(header_lines) == 2
    assert "speed vs naive SEAT" in header_lines[0] and "memory vs naive SEAT" in header_lines[0]
    assert "speed vs eager" in header_lines[1] and "speed vs compiled" in header_lines[1]
    assert re.search(r"\| sparse_adamw \| ok \|", summary) and re.search(r"\| kl_div \| ok \|", summary)

    data = json.loads((tmp_path / "summary.json").read_text())
    env = data["environment"]
    for key in ("torch", "triton", "device_name", "git_commit", "load_avg", "torch_threads", "date"):
        assert key in env, key
    assert env["size"] == "tiny" and env["device"] == "cpu"
    assert [b["status"] for b in data["benchmarks"]] == ["ok", "ok"]
    rows = json.loads((tmp_path / "sparse_adamw_scale64.json").read_text())["rows"]
    naive = next(r for r in rows if r["method"] == "naive-seat d=0.05")
    assert naive["speedup_vs_naive"] == 1.0  # the baseline of the ratios is in the same run
    # stdout is not a terminal here: one plain progress line per case
    assert re.search(r"\[1/2\] sparse_adamw: seat d=0.05 \(\d+/\d+ cases\)", proc.stdout)


def _fake_module(tmp_path, monkeypatch, body: str) -> str:
    """A benchmark script whose main runs `body` (lines indented by 4)."""
    name = f"bench_fake_{abs(hash(body)) % 10**8}"
    (tmp_path / f"{name}.py").write_text(f"def main(argv=None, progress=None):\n{body}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return name


# writes its results like the real scripts (through _common), with a ratio column
_SUCCEEDING = """    import argparse
    from pathlib import Path
    from _common import environment, write_results
    parser = argparse.ArgumentParser()
    parser.add_argument("--device")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    progress.expect(1)
    rows = [{"method": "baseline", "ms": 2.0, "speed_vs_baseline": 1.0}]
    write_results("fake", rows, environment(args.device), title="Fake", out_dir=args.out, notes=[],
                  columns=[("method", "method"), ("ms", "ms"), ("speed_vs_baseline", "speed vs baseline")])
    progress.done("baseline")
    return 0"""


def test_a_failing_benchmark_is_reported_the_others_run_and_the_exit_status_is_1(tmp_path, monkeypatch, capsys):
    raising = _fake_module(tmp_path, monkeypatch, "    raise RuntimeError('boom in the benchmark')")
    returning = _fake_module(tmp_path, monkeypatch, "    return 3")
    succeeding = _fake_module(tmp_path, monkeypatch, _SUCCEEDING)
    out = tmp_path / "results"
    monkeypatch.setattr(run_all, "BENCHMARKS", [
        Benchmark("raises", raising, {"tiny": ()}),
        Benchmark("bad_arguments", "bench_sparse_adamw", {"tiny": ("--scale", "zero")}),  # argparse exits 2
        Benchmark("succeeds", succeeding, {"tiny": ()}),
        Benchmark("returns_3", returning, {"tiny": ()}),
    ])
    assert run_all.main(["--size", "tiny", "--out", str(out)]) == 1
    printed = capsys.readouterr()
    assert "FAILED: raises, bad_arguments, returns_3" in printed.err

    status = {b["name"]: b for b in json.loads((out / "summary.json").read_text())["benchmarks"]}
    assert {n: b["status"] for n, b in status.items()} == {
        "raises": "failed", "bad_arguments": "failed", "succeeds": "ok", "returns_3": "failed"}
    assert "RuntimeError: boom in the benchmark" in status["raises"]["error"]
    assert "exited with status 2" in status["bad_arguments"]["error"]
    assert "main returned 3" in status["returns_3"]["error"]
    assert "Traceback" in (out / "raises.log").read_text()
    assert "invalid int value" in (out / "bad_arguments.log").read_text()  # argparse's message, in its log
    # the benchmark between the failures still ran, and its table is in the summary
    assert status["succeeds"]["files"] == ["fake.csv", "fake.json", "fake.md"]
    summary = (out / "summary.md").read_text()
    assert "**FAILED**" in summary and "boom in the benchmark" in summary
    assert "| method | ms | speed vs baseline |" in summary and "| baseline | 2 | 1 |" in summary


def test_selection_errors_name_the_argument(capsys):
    with pytest.raises(SystemExit):
        run_all.main(["--only", "no_such_benchmark"])
    assert "--only: unknown benchmark(s) no_such_benchmark" in capsys.readouterr().err
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            run_all.main(["--only", "seat_step_llama3_8b_24gib", "--device", "cpu"])
        assert "runs on cuda only" in capsys.readouterr().err
        with pytest.raises(SystemExit):
            run_all.main(["--device", "cuda"])
        assert "--device cuda: no CUDA device" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run_all.main(["--quick", "--size", "full"])
    assert "contradict" in capsys.readouterr().err


def test_every_benchmark_has_every_size_it_claims_and_its_arguments_parse(capsys):
    """Each entry's arguments are accepted by its script: the GPU-only ones are checked on
    a CPU machine by running them up to the last check (no CUDA device)."""
    import importlib

    assert {b.name for b in run_all.BENCHMARKS} >= {"sparse_adamw", "kl_div", "seat_step",
                                                    "seat_step_llama3_8b_24gib", "seat_step_llama3_8b_seq512"}
    for b in run_all.BENCHMARKS:
        if "cpu" in b.devices:
            assert set(b.args) == set(run_all.SIZES), b.name
        if torch.cuda.is_available() or "cpu" in b.devices:
            continue
        module = importlib.import_module(b.module)
        for size in b.args:
            with pytest.raises(SystemExit):
                module.main(b.argv(size, "cuda", Path("unused")))
            err = capsys.readouterr().err
            assert "--device cuda: no CUDA device is visible" in err, (b.name, err[-500:])


def test_the_llama3_8b_preset_has_llama3_8b_shapes():
    import bench_seat_step
    from transformers import LlamaForCausalLM

    config = bench_seat_step.make_config("llama3-8b", 1024)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    n = sum(p.numel() for p in model.parameters())
    assert 8.0e9 < n < 8.1e9  # Llama-3-8B: 8.03B parameters
    assert config.num_key_value_heads == 8 and config.vocab_size == 128256


class _Tty(io.StringIO):
    def isatty(self):
        return True


def test_progress_bar_on_a_terminal_and_plain_lines_otherwise():
    tty = _Tty()
    bar = Bar(tty, 2)
    bar.benchmark(1, "first")
    bar.expect(3)
    for label in ("a", "b", "c"):
        bar.done(label)
    bar.close()
    assert bar.bar is not None and "3/3" in tty.getvalue() and "[1/2] first" in tty.getvalue()

    plain = io.StringIO()
    bar = Bar(plain, 1)
    bar.benchmark(1, "only")
    bar.expect(2)
    bar.done("x")
    bar.close()
    assert bar.bar is None
    assert "[1/1] only: started" in plain.getvalue() and "[1/1] only: x (1/2 cases)" in plain.getvalue()


def _make_targets() -> set[str]:
    return set(re.findall(r"^([A-Za-z][\w-]*):", (ROOT / "Makefile").read_text(), flags=re.M))


def test_gpu_sh_dry_run_names_existing_targets_and_scripts():
    script = ROOT / "benchmarks" / "gpu.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    proc = subprocess.run(["bash", str(script)], capture_output=True, text=True, cwd=ROOT, timeout=60,
                          env={**os.environ, "SEAT_GPU_SH_DRY_RUN": "1"})
    assert proc.returncode == 0, proc.stderr
    stages = re.findall(r"^=== \S+ \[\+\d+ s\] stage (\S+): (.*)$", proc.stdout, flags=re.M)
    assert [name for name, _ in stages] == ["build", "build-check", "tests-cuda", "tests-ops", "bench"]
    commands = dict(stages)
    assert "SEAT_FORCE_CUDA=1" in commands["build"]
    targets = _make_targets()
    for name, command in stages:
        for target in re.findall(r"\bmake (\S+)", command):
            assert target in targets, (name, target)
        for path in re.findall(r"\b(benchmarks/\S+\.py|tests/\S+)", command):
            assert (ROOT / path).exists(), (name, path)
    assert "benchmarks/run_all.py --device cuda" in commands["bench"]
    assert "-m cuda" in commands["tests-cuda"]


def test_gpu_sh_refuses_a_bad_setting_and_a_machine_without_a_gpu():
    script = str(ROOT / "benchmarks" / "gpu.sh")
    proc = subprocess.run(["bash", script], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "SEAT_GPU_TESTS": "some", "SEAT_GPU_SH_DRY_RUN": "1"})
    assert proc.returncode == 2 and "SEAT_GPU_TESTS must be 'cuda' or 'all'" in proc.stderr
    if torch.cuda.is_available() or shutil.which("nvidia-smi"):
        return  # a GPU machine (or a driver): the real run would start building
    # no GPU: it stops before building anything
    env = {k: v for k, v in os.environ.items() if k != "SEAT_GPU_SH_DRY_RUN"}
    proc = subprocess.run(["bash", script], capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 1 and "gpu.sh needs a CUDA GPU" in proc.stderr


def test_make_bench_runs_run_all():
    recipe = (ROOT / "Makefile").read_text().split("\nbench:", 1)[1].split("\n\n", 1)[0]
    assert "benchmarks/run_all.py" in recipe
