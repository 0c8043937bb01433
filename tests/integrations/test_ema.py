"""ema_update_ against a per-tensor loop (parameters and buffers), cosine_momentum, make_ema."""
import copy

import pytest
import torch
from torch import nn

from aclip_kernels import cosine_momentum, ema_update_, make_ema


def _model(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Flatten(), nn.LazyLinear(4),
                         nn.LayerNorm(4)).eval()


def _init(model):
    model(torch.randn(2, 3, 6, 6))
    model.train()(torch.randn(4, 3, 6, 6))      # moves the BatchNorm running stats and step count
    return model.eval()


def test_ema_update_matches_per_tensor_loop():
    online, ema = _init(_model(0)), _init(_model(1))
    online(torch.randn(2, 3, 6, 6))
    for _ in range(3):
        online.train()(torch.randn(4, 3, 6, 6))
    expected = copy.deepcopy(ema)
    m = 0.9
    with torch.no_grad():
        for e, p in zip(expected.parameters(), online.parameters()):
            e.lerp_(p, 1 - m)
        for e, p in zip(expected.buffers(), online.buffers()):
            e.lerp_(p, 1 - m) if e.is_floating_point() else e.copy_(p)
    ema_update_(ema, online, m)
    for (name, a), b in zip(ema.state_dict().items(), expected.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    bn_e, bn_o = ema[1], online[1]
    assert bn_e.num_batches_tracked.item() == bn_o.num_batches_tracked.item() == 4


def test_ema_update_formula_and_edges():
    online, ema = _init(_model(0)), _init(_model(1))
    before = copy.deepcopy(ema)
    ema_update_(ema, online, 0.99)
    for a, e0, p in zip(ema.parameters(), before.parameters(), online.parameters()):
        torch.testing.assert_close(a, 0.99 * e0 + 0.01 * p, rtol=1e-6, atol=1e-7)
    ema_update_(ema, online, 0.0)                  # momentum 0 copies the model
    for a, p in zip(ema.state_dict().values(), online.state_dict().values()):
        torch.testing.assert_close(a, p, rtol=0, atol=0)
    with pytest.raises(ValueError, match="momentum"):
        ema_update_(ema, online, 1.5)
    with pytest.raises(ValueError, match="differ"):
        ema_update_(nn.Linear(2, 2), online, 0.9)


def test_cosine_momentum_endpoints():
    assert cosine_momentum(0, 100) == pytest.approx(0.996)
    assert cosine_momentum(100, 100) == 1.0
    assert cosine_momentum(50, 100) == pytest.approx(0.998)
    assert cosine_momentum(200, 100) == 1.0 and cosine_momentum(-5, 100) == pytest.approx(0.996)
    assert cosine_momentum(0, 10, base=0.99) == pytest.approx(0.99)
    values = [cosine_momentum(s, 10) for s in range(11)]
    assert all(a <= b for a, b in zip(values, values[1:]))


def test_make_ema():
    model = nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.5)).train()
    ema = make_ema(model)
    assert not ema.training and model.training
    assert all(not p.requires_grad for p in ema.parameters())
    assert all(p.requires_grad for p in model.parameters())
    assert ema[0].weight is not model[0].weight and torch.equal(ema[0].weight, model[0].weight)
    x = torch.randn(4, 3)
    assert torch.equal(ema(x), ema(x))             # dropout off
