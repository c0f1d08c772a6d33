import pytest
import torch

from headinfer_vllm.core.plan import build_step_plan, coalesce


def test_coalesce_merges_consecutive_ids_and_drops_duplicates():
    ids = torch.tensor([9, 3, 4, 5, 5, 11, 10, 0])
    assert coalesce(ids) == ((0, 1), (3, 3), (9, 3))
    assert coalesce(torch.tensor([], dtype=torch.int64)) == ()


def test_plan_loads_needed_pages_and_stores_touched_pages():
    plan = build_step_plan(
        query_start_loc=torch.tensor([0, 3, 4]),
        seq_lens=torch.tensor([6, 9]),  # 2 and 3 pages of 4 tokens
        block_table=torch.tensor([[7, 8, 99], [2, 3, 4]]),
        slot_mapping=torch.tensor([8 * 4 + 1, 8 * 4 + 2, 8 * 4 + 3, 4 * 4 + 0, -1]),
        block_size=4,
        device="cpu",
    )
    assert plan.load_runs == ((2, 3), (7, 2))  # 99 is past request 0's pages
    assert plan.store_runs == ((4, 1), (8, 1))
    assert plan.num_tokens == 4
    assert plan.new_token_index.tolist() == [0, 1, 2, 3]
    assert plan.new_block.tolist() == [8, 8, 8, 4]
    assert plan.new_offset.tolist() == [1, 2, 3, 0]
    assert plan.pages(1).tolist() == [2, 3, 4]
    assert (plan.max_query_len, plan.max_seq_len) == (3, 9)


def test_plan_refuses_inconsistent_lengths():
    with pytest.raises(ValueError, match="query_len"):
        build_step_plan(
            query_start_loc=torch.tensor([0, 5]), seq_lens=torch.tensor([4]),
            block_table=torch.tensor([[0]]), slot_mapping=torch.zeros(5, dtype=torch.int64),
            block_size=4, device="cpu",
        )
