"""Compiled blocks under DeepSpeed ZeRO-3 on one GPU: each block fetched whole and compiled as one graph with its
checkpoint inside (tk's default, toolkit/model/zero3_blocks.py) trains the eager ZeRO-3 losses, and so does the
per-linear fetch it replaced (TK_ZERO3_FETCH=module). A small random llama in fp32 (Inductor's fused arithmetic
is the only difference: within 1e-3 relative), gradient checkpointing on, 8 steps, one process."""
import pytest

from gpu_helpers import losses, make_llama, needs_cuda, report, tk_config, train

pytestmark = needs_cuda
STEPS, RTOL = 8, 1e-3


def config(model, **options):
    return tk_config(model, "full", seq=256, bs=1, steps=STEPS, warmup=2, vocab=1024, lr=1e-3, precision="fp32",
                     clip=None, samples=16, distinct=4, log_interval=1, save_every=STEPS, **options)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_llama(tmp_path_factory.mktemp("llama_zero3"))


@pytest.fixture(scope="module")
def eager(model, tmp_path_factory):
    work = tmp_path_factory.mktemp("zero3_eager")
    train(work, config(model), "--deepspeed", "zero3")
    return losses(work)


@pytest.mark.parametrize("fetch", ["block", "module"])
def test_zero3_compiled_blocks_train_like_eager_on_one_gpu(fetch, model, eager, tmp_path, monkeypatch):
    monkeypatch.setenv("TK_ZERO3_FETCH", fetch)
    result = train(tmp_path, config(model, compile=True), "--deepspeed", "zero3")
    log = result.stdout + result.stderr
    got = losses(tmp_path)
    worst = max(abs(a - b) / abs(a) for a, b in zip(eager, got))
    report(f"zero3_1gpu/compiled_{fetch}", ref_losses=[round(x, 5) for x in eager],
           losses=[round(x, 5) for x in got], worst_rel_diff=worst)
    assert "transformer blocks compiled" in log
    assert ("fetch their weights once a block" in log) == (fetch == "block"), log[-3000:]
    assert "recompile_limit" not in log and "recompile limit" not in log, log[-3000:]
    assert len(got) == len(eager) == STEPS and eager[-1] < eager[0]
    assert worst < RTOL, (eager, got)
