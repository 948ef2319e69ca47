"""Compiled blocks under DeepSpeed ZeRO-3 on one GPU: each block fetched whole and compiled as one graph with its
checkpoint inside (tk's default, toolkit/model/zero3_blocks.py) trains the eager ZeRO-3 losses, and so does the
per-linear fetch it replaced (TK_ZERO3_FETCH=module), full fine-tuning and LoRA (dropout 0: compiled and eager
draw other masks). A small random llama in fp32 (Inductor's fused arithmetic is the only difference: within
1e-3 relative), gradient checkpointing on, 8 steps, one process."""
import pytest

from gpu_helpers import fp32_steps_config, losses, make_llama, needs_cuda, report, train

pytestmark = needs_cuda
STEPS, RTOL = 8, 1e-3


def config(model, method, **options):
    return fp32_steps_config(model, method, steps=STEPS, dropout=0.0, **options)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_llama(tmp_path_factory.mktemp("llama_zero3"))


@pytest.fixture(scope="module")
def eager_losses(model, tmp_path_factory):
    """Eager ZeRO-3 losses per method, trained once."""
    done = {}

    def get(method):
        if method not in done:
            work = tmp_path_factory.mktemp(f"zero3_eager_{method}")
            train(work, config(model, method), "--deepspeed", "zero3")
            done[method] = losses(work)
        return done[method]
    return get


@pytest.mark.parametrize("method, fetch", [("full", "block"), ("full", "module"), ("lora", "block")])
def test_zero3_compiled_blocks_train_like_eager_on_one_gpu(method, fetch, model, eager_losses, tmp_path,
                                                          monkeypatch):
    eager = eager_losses(method)
    monkeypatch.setenv("TK_ZERO3_FETCH", fetch)
    result = train(tmp_path, config(model, method, compile=True), "--deepspeed", "zero3")
    log = result.stdout + result.stderr
    got = losses(tmp_path)
    worst = max(abs(a - b) / abs(a) for a, b in zip(eager, got))
    report(f"zero3_1gpu/{method}_compiled_{fetch}", ref_losses=[round(x, 5) for x in eager],
           losses=[round(x, 5) for x in got], worst_rel_diff=worst)
    assert "transformer blocks compiled" in log
    assert ("fetch their weights once a block" in log) == (fetch == "block"), log[-3000:]
    assert "recompile_limit" not in log and "recompile limit" not in log, log[-3000:]
    assert len(got) == len(eager) == STEPS and eager[-1] < eager[0]
    assert worst < RTOL, (eager, got)
