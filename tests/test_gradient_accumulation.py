"""speedups.accumulate_gradients_at_once with a real Accelerator on CPU: each micro-batch's backward starts from no
gradients (autograd hands its tensors over, no per-parameter adds), and after three micro-batches the gradients
are bit for bit autograd's own accumulation, including a head the last micro-batch never reaches and one only the
last reaches."""
from __future__ import annotations

from types import SimpleNamespace

import torch
from accelerate import Accelerator

from grpo_gsm8k.training.speedups import accumulate_gradients_at_once


class TwoHeads(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.body = torch.nn.Linear(4, 8)
        self.first = torch.nn.Linear(8, 1)  # used by the first two micro-batches
        self.last = torch.nn.Linear(8, 1)  # used by the last micro-batch only

    def forward(self, x, head):
        return head(torch.tanh(self.body(x))).sum()


def accumulate(at_once: bool):
    torch.manual_seed(0)
    model = TwoHeads()
    accelerator = Accelerator(gradient_accumulation_steps=3)
    params = list(model.parameters())
    backward = accelerator.backward
    no_grad_on_entry = []

    def spy(loss, **kwargs):  # what autograd finds when it starts
        no_grad_on_entry.append(all(p.grad is None for p in params))
        return backward(loss, **kwargs)

    accelerator.backward = spy
    if at_once:
        assert accumulate_gradients_at_once(SimpleNamespace(accelerator=accelerator, model=model))
    for i, head in enumerate([model.first, model.first, model.last]):
        accelerator.backward(model(torch.randn(5, 4), head) * (i + 1))
    return [p.grad for p in params], no_grad_on_entry


def test_gradients_are_autograds_own_sums_with_no_gradient_left_in_place_during_backward():
    want, entries_autograd = accumulate(at_once=False)
    got, entries_at_once = accumulate(at_once=True)
    assert entries_autograd == [True, False, False]  # autograd added into what was there
    assert entries_at_once == [True, True, True]
    assert all(g is not None for g in got)
    for ours, autograd in zip(got, want):
        assert torch.equal(ours, autograd)  # fresh + earlier: the same floats as earlier + fresh
