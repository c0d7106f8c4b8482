"""What cannot work on offloaded experts by design fails loudly with `UnsupportedFeatureError`, never silently.

* `set_experts_implementation` to anything but hf_moe_offload's: transformers' in-memory implementations would
  compute with expert weights that are not in memory. The model stays usable and unchanged after the refusal.
* backward through offloaded experts: their weights live in cache slots that are reused, so no gradient exists.
  A forward with grad enabled still computes the normal loss, and a backward that stops before the experts (only
  the output head trainable, a linear probe) works and gives the normal model's gradients.
"""

from __future__ import annotations

import copy

import pytest
import torch

from hf_moe_offload.errors import UnsupportedFeatureError

from ._cases import CASES, TOL, assert_same, token_ids

pytestmark = pytest.mark.parametrize(("model_type", "layout"), [pytest.param(*c, id="-".join(c)) for c in CASES])


@pytest.mark.parametrize("impl", ["eager", "grouped_mm", "dict"])
def test_set_experts_implementation_is_refused(cases, model_type, layout, impl):
    case = cases.get(model_type, layout)
    value = {"": "eager"} if impl == "dict" else impl
    with pytest.raises(UnsupportedFeatureError, match="offloaded"):
        case.off.set_experts_implementation(value)
    case.off.set_experts_implementation("hf_moe_offload")  # its own implementation is accepted
    ids = token_ids(1, 8)
    with torch.no_grad():
        assert_same(case.normal(ids).logits, case.off(ids).logits)


def test_backward_through_offloaded_experts_is_refused(cases, model_type, layout):
    case = cases.get(model_type, layout)
    ids = token_ids(1, 8)
    with torch.enable_grad():
        loss = case.off(ids, labels=ids).loss
        assert loss.requires_grad
        torch.testing.assert_close(loss, case.normal(ids, labels=ids).loss.detach(), atol=TOL[torch.float32][0], rtol=0)
        try:
            with pytest.raises(UnsupportedFeatureError, match="backward"):
                loss.backward()
        finally:
            case.off.zero_grad(set_to_none=True)
            case.normal.zero_grad(set_to_none=True)


def test_backward_that_stops_before_the_experts_works(cases, model_type, layout):
    case = cases.get(model_type, layout)
    ids = token_ids(1, 8)
    normal = copy.deepcopy(case.normal)
    with case.offloaded() as off:
        grads = []
        for model in (normal, off):
            model.requires_grad_(False)
            head = model.get_output_embeddings()
            head.weight = torch.nn.Parameter(head.weight.detach().clone())  # untied: the embeddings stay frozen
            with torch.enable_grad():
                model(ids, labels=ids).loss.backward()
            grads.append(head.weight.grad)
        assert grads[0] is not None
        assert_same(grads[0], grads[1])
