"""The schedule-free AdamW update in torch._foreach_* form against the per-parameter form (util/sfadamw.py)."""
import pytest
import torch
import torch.nn as nn

from util.sfadamw import AlgoPerfAdamWScheduleFree


def small_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(8, 5))


@pytest.mark.parametrize("moment_dtype", ["bfloat16", "float32"])
def test_foreach_update_is_bit_identical_to_the_per_parameter_update(moment_dtype):
    models = [small_model(), small_model()]
    optimizers = [AlgoPerfAdamWScheduleFree(m.parameters(), lr=0.01, weight_decay=0.08, warmup_steps=5,
                                            moment_dtype=moment_dtype, foreach=foreach)
                  for m, foreach in zip(models, (False, True))]
    for opt in optimizers:
        opt.train()
    models[0][0].bias.requires_grad_(False)  # a parameter without a gradient is skipped by both forms
    models[1][0].bias.requires_grad_(False)
    generator = torch.Generator().manual_seed(1)
    for _ in range(60):
        images, labels = torch.randn(6, 3, 8, 8, generator=generator), torch.randint(0, 5, (6,), generator=generator)
        for model, opt in zip(models, optimizers):
            nn.functional.cross_entropy(model(images), labels).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    (a, b), (oa, ob) = models, optimizers
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name
    for pa, pb in zip(a.parameters(), b.parameters()):
        for key in ("x", "z", "exp_avg_sq"):
            if key in oa.state[pa]:
                assert torch.equal(oa.state[pa][key], ob.state[pb][key]), key
                assert oa.state[pa][key].dtype == ob.state[pb][key].dtype
    assert [g["weight_sum"] for g in oa.param_groups] == [g["weight_sum"] for g in ob.param_groups]
    for opt in optimizers:
        opt.eval()
    assert all(torch.equal(pa, pb) for pa, pb in zip(a.parameters(), b.parameters()))
