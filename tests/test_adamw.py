"""The row-wise AdamW against torch.optim.AdamW, one optimizer per row, and the schedules."""

import pytest
import torch

from cram_sweep.engine.adamw import RowAdamW, learning_rates

from .helpers import TINY_PROGRESSIVE, TwoTensors, cosine_lambda, tiny_config


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_row_adamw_is_torch_adamw_per_row(schedule):
    """Each row of each trainable tensor follows torch.optim.AdamW with its own LambdaLR, whatever the other rows'
    positions (two tensors of different ranks, as a low-dimensional parametrization has)."""
    optim = tiny_config(*TINY_PROGRESSIVE, f"optim.schedule={schedule}", "optim.warmup_steps=10").optim
    torch.manual_seed(0)
    start = TwoTensors(torch.randn(3, 2, 8), torch.randn(3, 8))
    rows = RowAdamW(optim, "cpu")
    rows.add(start)
    batched = start.map(lambda t: t.clone().requires_grad_())
    params = [[torch.nn.Parameter(t[i].clone()) for t in start.tensors()] for i in range(3)]
    opts = [torch.optim.AdamW(p, lr=optim.lr, betas=(optim.beta1, optim.beta2), weight_decay=optim.weight_decay) for p in params]
    scheds = [torch.optim.lr_scheduler.LambdaLR(o, cosine_lambda(optim) if schedule == "cosine" else lambda _: 1.0) for o in opts]
    for step in range(30):
        grads = [torch.randn_like(t) for t in batched.tensors()]
        for tensor, grad in zip(batched.tensors(), grads):
            tensor.grad = grad
        active = torch.tensor([True, step % 2 == 0, step % 3 == 0])  # rows at different schedule positions
        rows.step(batched, active)
        for i in range(3):
            if active[i]:
                for param, grad in zip(params[i], grads):
                    param.grad = grad[i].clone()
                opts[i].step()
                scheds[i].step()
    for i in range(3):
        for tensor, param in zip(batched.tensors(), params[i]):
            assert torch.equal(tensor[i], param.detach()), f"row {i}"
    assert rows.count.tolist() == [30, 15, 10]
    assert learning_rates(optim)[0] == (0.0 if schedule == "cosine" else optim.lr)
