"""The demo end to end at a tiny size: base model (trained, cached, reloaded), every
fine-tuning method, the table and its files. Measured results (which method wins) are
not asserted; the deterministic base model's sanity is."""
from __future__ import annotations

import json
import math

import pytest

pytest.importorskip("transformers")
pytest.importorskip("peft")
pytest.importorskip("rouge_score")

from seat.demo import run as demo_run  # noqa: E402
from seat.demo.base import BaseConfig, load_or_train_base  # noqa: E402
from seat.demo import methods as demo_methods  # noqa: E402
from seat.demo.methods import METHODS, FinetuneConfig  # noqa: E402
from seat.demo.world import WorldConfig  # noqa: E402

pytestmark = pytest.mark.slow

TINY_WORLD = WorldConfig(n_known=8, n_unknown_train=48, n_unknown_eval=8, n_unknown_alt=4, n_new=4)
TINY_BASE = BaseConfig(hidden_size=64, intermediate_size=128, epochs=80)
TINY_FT = FinetuneConfig(steps=12, batch_size=8, lr=3e-3)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    path = tmp_path_factory.mktemp("seat-demo-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SEAT_DEMO_CACHE", str(path))
        yield path


@pytest.fixture(scope="module")
def result(cache):
    return demo_run.run_seed(0, methods=METHODS, world_config=TINY_WORLD, base_config=TINY_BASE,
                             ft_config=TINY_FT, log=None)


def test_base_model_is_sane_and_cached(result, cache):
    base = result["base"]
    assert base["idk_unknown"] >= 0.7, base  # refuses on held-out names it never saw
    assert base["idk_new"] >= 0.7, base  # and on the new people, before fine-tuning
    assert base["retention"] >= 0.8, base  # knows the known people
    assert base["idk_known"] <= 0.1, base
    assert result["base_info"]["cached"] is False
    world, tok, model, info = load_or_train_base(0, TINY_WORLD, TINY_BASE, log=None)
    assert info["cached"] is True and info["dir"].startswith(str(cache))
    assert world.to_json()["people"] == json.loads((cache / info["dir"].split("/")[-1] / "world.json").read_text())[
        "people"]


def test_every_method_has_a_row_with_sane_values(result):
    assert list(result["methods"]) == list(METHODS)
    for name, row in result["methods"].items():
        for key in demo_run.METRIC_KEYS:
            assert 0.0 <= row[key] <= 1.0, (name, key, row[key])
        assert 0.0 < row["trainable_fraction"] <= 1.0
        assert row["optimizer_state_bytes"] > 0 and row["step_ms"] > 0
        assert math.isfinite(row["final_ce"])
    rows = result["methods"]
    assert rows["full"]["trainable_fraction"] == 1.0
    assert rows["seat-0.01"]["trainable_fraction"] < rows["seat-0.05"]["trainable_fraction"] \
        < rows["seat-0.1"]["trainable_fraction"] < rows["kl"]["trainable_fraction"]
    assert rows["seat-0.05"]["optimizer_state_bytes"] < rows["full"]["optimizer_state_bytes"] / 5
    assert math.isnan(rows["sparse"]["final_kl"])  # kl_weight=0: x~ is not run, the KL not computed
    assert all(rows[m]["final_kl"] >= 0.0 for m in ("kl", "lora-kl", "seat-0.05"))


def test_table_and_files(result, tmp_path):
    agg = demo_run.aggregate([result])
    table = demo_run.format_table(agg, result["finetune_config"], 1)
    assert table.count("\n") == 1 + 1 + len(METHODS)  # header, rule, base, methods
    assert "SEAT d=0.01" in table and "LoRA r=8" in table and "full fine-tuning" in table
    assert demo_run.plot(agg, tmp_path / "chart.png", "test") in (True, False)


def test_cli_writes_markdown_json_and_png(cache, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(demo_run, "_configs", lambda quick: (TINY_WORLD, TINY_BASE, FinetuneConfig(steps=4,
                                                                                                 batch_size=8)))
    monkeypatch.setitem(demo_methods.LR_GRIDS, "sparse", (1e-3, 1e-2))  # the search runs, on a short grid
    out = tmp_path / "out"
    assert demo_run.main(["--quick", "--methods", "full", "seat-0.05", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| method |" in printed and "SEAT d=0.05" in printed
    assert (out / "demo_results.md").read_text().count("|") > 10
    data = json.loads((out / "demo_results.json").read_text())
    assert set(data["aggregate"]) == {"base", "full", "seat-0.05"}
    tried = data["runs"][0]["methods"]["seat-0.05"]["lr_tried"]
    assert [lr for lr, _ in tried] == [1e-3, 1e-2][:len(tried)]  # smallest first, stops once recall is reached
    assert data["runs"][0]["methods"]["seat-0.05"]["lr"] in (1e-3, 1e-2)
    pytest.importorskip("matplotlib")
    assert (out / "demo_results.png").stat().st_size > 1000


def test_search_lr_takes_the_smallest_rate_that_reaches_the_target(monkeypatch):
    grid = demo_methods.LR_GRIDS["sparse"]
    assert list(grid) == sorted(grid) and len(grid) >= 3
    scores = dict(zip(grid, [0.5, 0.95] + [1.0] * (len(grid) - 2)))
    calls = []

    def fake_finetune(method, base, tok, records, cfg, seed=0, lr=None):
        calls.append(lr)
        return lr, {"lr": lr}

    monkeypatch.setattr(demo_methods, "finetune", fake_finetune)
    cfg = FinetuneConfig(target_recall=0.9)
    model, stats = demo_methods.search_lr("seat-0.05", None, None, [], cfg, score=lambda m: scores[m])
    assert model == grid[1] and calls == list(grid[:2]) and stats["lr_tried"] == [(grid[0], 0.5), (grid[1], 0.95)]
    # none reaches the target: the best-scoring run, every rate tried
    calls.clear()
    model, stats = demo_methods.search_lr("seat-0.05", None, None, [], FinetuneConfig(target_recall=1.1),
                                          score=lambda m: scores[m])
    assert model == grid[2] and calls == list(grid)  # the first of the best
    # a fixed lr: that one only
    calls.clear()
    demo_methods.search_lr("full", None, None, [], FinetuneConfig(lr=5e-3), score=lambda m: 0.0)
    assert calls == [5e-3]
    # a config's own grids replace LR_GRIDS
    calls.clear()
    demo_methods.search_lr("seat-0.05", None, None, [], FinetuneConfig(lr_grids=(("sparse", (3e-2,)),)),
                           score=lambda m: 0.0)
    assert calls == [3e-2]
    with pytest.raises(ValueError, match="unknown method"):
        demo_methods.search_lr("bogus", None, None, [], cfg, score=lambda m: 0.0)


def test_quick_demo_end_to_end_and_its_base_model_meets_the_bar(tmp_path, monkeypatch, capsys):
    """`python -m seat.demo --quick` as a user runs it (the base model trained from
    scratch, every method, the lr search): the base model must refuse on people it
    never saw (IDK >= 0.95 on held-out unknown people, the issue's bar; >= 0.9 on the
    harder sets) and know the known people."""
    monkeypatch.setenv("SEAT_DEMO_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out"
    assert demo_run.main(["--quick", "--out", str(out)]) == 0
    data = json.loads((out / "demo_results.json").read_text())
    base = data["runs"][0]["base"]
    assert base["idk_unknown"] >= 0.95 and min(base["idk_alt"], base["idk_wording"]) >= 0.9, base
    assert base["retention"] >= 0.95 and base["idk_known"] <= 0.05, base
    assert set(data["aggregate"]) == {"base", *METHODS}
    assert "| method |" in capsys.readouterr().out
