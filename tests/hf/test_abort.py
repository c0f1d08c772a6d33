"""A forward pass aborted between layers leaves a cache that reset() recovers."""

import pytest
import torch

from tests.hf.models import build_pair, greedy, make_cache, prompt


def test_reset_recovers_after_an_aborted_forward():
    reference, model = build_pair("llama")
    ids = prompt(1, 40)
    cache = make_cache(model)

    def abort(*_):
        raise KeyboardInterrupt

    hook = model.model.layers[1].self_attn.q_proj.register_forward_pre_hook(abort)
    with pytest.raises(KeyboardInterrupt):
        model(input_ids=ids, past_key_values=cache, use_cache=True)
    hook.remove()
    cache.reset()
    want, _ = greedy(reference, ids)
    got, _ = greedy(model, ids, past_key_values=cache)
    assert torch.equal(got, want)
