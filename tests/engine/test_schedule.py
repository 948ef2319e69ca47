"""WarmupDecayLR matches transformers' schedules step for step; bad settings are one clear line."""
import pytest
import torch

from toolkit.engine.schedule import WarmupDecayLR, lr_factor
from toolkit.errors import UserError


@pytest.mark.parametrize("decay, name", [("cosine", "get_cosine_schedule_with_warmup"),
                                         ("linear", "get_linear_schedule_with_warmup"),
                                         ("constant", "get_constant_schedule_with_warmup")])
def test_matches_transformers_schedules(decay, name):
    import transformers
    total, warmup = 50, 7
    param = torch.nn.Parameter(torch.zeros(1))
    reference = torch.optim.SGD([param], lr=2.0)
    kwargs = {"num_warmup_steps": warmup} | ({} if decay == "constant" else {"num_training_steps": total})
    hf = getattr(transformers, name)(reference, **kwargs)
    ours = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    scheduler = WarmupDecayLR(ours, decay=decay, warmup_steps=warmup, end=total)
    for _ in range(total):
        assert ours.param_groups[0]["lr"] == pytest.approx(reference.param_groups[0]["lr"], abs=1e-12)
        reference.step(), hf.step(), ours.step(), scheduler.step()


def test_warmup_ratio_and_floor():
    assert [lr_factor(s, 10, 2, "cosine", 0.1) for s in (0, 1, 2, 10)] == pytest.approx([0, 0.5, 1.0, 0.1])
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    assert WarmupDecayLR(optimizer, warmup_ratio=0.1, end=95).warmup == 10  # ceil(9.5)


@pytest.mark.parametrize("kwargs, message", [
    (dict(decay="exp"), "use one of cosine, linear, constant"),
    (dict(by_epoch=True), "set by_epoch=False"),
    (dict(warmup_ratio=1.5), "warmup_ratio=1.5"),
    (dict(warmup_steps=100), "does not fit in a run of 100"),
])
def test_bad_settings_are_user_errors(kwargs, message):
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(UserError, match=message):
        WarmupDecayLR(optimizer, **{"end": 100, **kwargs})
