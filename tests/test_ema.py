"""EMA: the warm-up decay schedule and the update rule, checked by hand."""

import torch
from torch import nn

from ldm.modules.ema import EMA


def test_decay_warmup_and_update_math():
    torch.manual_seed(0)
    model = nn.Linear(2, 2)
    ema = EMA(model, decay=0.5)
    start = model.weight.detach().clone()
    assert ema.current_decay() == 0.1  # (1+0)/(10+0)
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model)
    expected = 0.1 * start + 0.9 * (start + 1.0)
    torch.testing.assert_close(ema.shadow[0], expected)
    assert abs(ema.current_decay() - 2 / 11) < 1e-12
    for _ in range(20):
        ema.update(model)
    assert ema.current_decay() == 0.5  # capped at the configured decay


def test_swapped_into_restores_training_weights():
    model = nn.Linear(3, 1)
    ema = EMA(model, decay=0.9)
    trained = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.mul_(3)
    ema.update(model)
    live = model.weight.detach().clone()
    with ema.swapped_into(model):
        torch.testing.assert_close(model.weight, ema.shadow[0])
        assert not torch.equal(model.weight, live)
    torch.testing.assert_close(model.weight, live)
    assert not torch.equal(trained, live)


def test_ema_state_round_trips_through_state_dict():
    model = nn.Linear(2, 2)
    ema = EMA(model, decay=0.99)
    ema.update(model)
    other = EMA(nn.Linear(2, 2), decay=0.99)
    other.load_state_dict(ema.state_dict())
    assert int(other.num_updates) == 1
    torch.testing.assert_close(other.shadow[0], ema.shadow[0])
