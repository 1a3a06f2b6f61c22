"""SeatTrainer on several gloo processes (the environment torchrun sets): compact-gradient
data parallelism without a DDP wrapper, the global batch's normalization and draws, so
N ranks follow the one-process run (fp32: weights within 1e-6 after 4 steps, seen 2e-7),
and checkpoints that resume on another number of ranks."""
from __future__ import annotations

import shutil

import pytest

from _dist_workers import evaluate_untrained, train_trainer
from _distributed import max_diff, run_ranks

pytestmark = pytest.mark.slow

GLOBAL_ROWS = 4  # rows per micro-batch over all ranks (2 micro-batches per step)



@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("dp-trainer")
    one = train_trainer(0, 1, str(root / "one"), GLOBAL_ROWS, 4)
    two = run_ranks(train_trainer, 2, str(root / "two"), GLOBAL_ROWS, 4, timeout=300)
    return {"root": root, "one": one, "two": two}


def test_two_ranks_train_as_one_process_on_the_global_batch(runs):
    one, two = runs["one"], runs["two"]
    for rank in two:
        assert rank["wrapped"] == "LlamaForCausalLM"  # no DDP: only the compact gradients travel
        assert max_diff(rank["weights"], one["weights"]) <= 1e-6
        assert [s for s, _, _ in rank["losses"]] == [s for s, _, _ in one["losses"]]
        for (_, loss, kl), (_, loss1, kl1) in zip(rank["losses"], one["losses"]):  # the global loss is logged
            assert loss == pytest.approx(loss1, rel=1e-5) and kl == pytest.approx(kl1, rel=1e-4, abs=1e-7)
        assert rank["sent"] > 0 and rank["steps_here"] == 4
    assert two[0]["sent"] == two[1]["sent"]


@pytest.mark.parametrize("world_size", [1, 4])
def test_a_two_rank_checkpoint_resumes_on_another_number_of_ranks(runs, tmp_path, world_size):
    out = tmp_path / "resumed"
    shutil.copytree(runs["root"] / "two" / "checkpoint-2", out / "checkpoint-2")
    args = (str(out), GLOBAL_ROWS, 4, str(out / "checkpoint-2"))
    got = train_trainer(0, 1, *args) if world_size == 1 else run_ranks(train_trainer, world_size, *args,
                                                                         timeout=300)[0]
    assert max_diff(got["weights"], runs["one"]["weights"]) <= 1e-6
    assert got["steps_here"] == 2  # it continued from step 2


def test_evaluation_on_two_ranks_is_the_one_process_evaluation(tmp_path):
    # each eval batch is normalized by its own tokens (not the Trainer's count summed over
    # the ranks): the gathered eval loss does not depend on the number of ranks
    one = evaluate_untrained(0, 1, str(tmp_path / "one"))
    two = run_ranks(evaluate_untrained, 2, str(tmp_path / "two"), timeout=200)
    assert two[0] == two[1] == pytest.approx(one, rel=1e-5)
