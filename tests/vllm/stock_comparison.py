"""The end-to-end exactness check shared by the vLLM tests: headinfer's generations against the stock backend's."""

LOGPROB_TOLERANCE = 1e-4
"""Largest difference of a top logprob (float32 runs): a wrong head or page is off by far more."""


def assert_same_generations(stock: list[dict], ours: list[dict], count: int,
                            tolerance: float = LOGPROB_TOLERANCE) -> None:
    """Identical greedy tokens and the same top-logprob tokens, their logprobs within the tolerance.

    ``stock``, ``ours``: ``offline_check`` outputs, one per prompt, in the same order.
    """
    assert len(stock) == len(ours) == count
    for index, (want, got) in enumerate(zip(stock, ours, strict=True)):
        assert got["tokens"] == want["tokens"], f"prompt {index}"
        for step, (want_top, got_top) in enumerate(zip(want["logprobs"], got["logprobs"], strict=True)):
            assert want_top.keys() == got_top.keys(), f"prompt {index} step {step}"
            for token, logprob in want_top.items():
                assert abs(got_top[token] - logprob) <= tolerance, f"prompt {index} step {step}"
