import pytest
import torch

from headinfer_vllm.core.plan import build_step_plan
from headinfer_vllm.core.staging import stage_pages


def example_plan():
    return build_step_plan(
        query_start_loc=torch.tensor([0, 3, 4]),
        seq_lens=torch.tensor([6, 9]),  # 2 and 3 pages of 4 tokens
        block_table=torch.tensor([[7, 8, 99, 50], [2, 3, 4, 51]]),  # column 3 is past every sequence
        slot_mapping=torch.tensor([8 * 4 + 1, 8 * 4 + 2, 8 * 4 + 3, 4 * 4 + 0, -1]),
        block_size=4,
        device="cpu",
    )


def test_plan_keeps_the_columns_in_use_and_places_new_tokens():
    plan = example_plan()
    assert plan.num_tokens == 4
    assert (plan.max_query_len, plan.max_seq_len, plan.num_page_refs) == (3, 9, 5)
    assert plan.home.block_table.tolist() == [[7, 8, 99], [2, 3, 4]]
    assert plan.page_in_use.tolist() == [[True, True, False], [True, True, True]]
    assert plan.new_slots.tolist() == [33, 34, 35, 16]
    # Token rows of block b, offset o: K at b * 8 + o, V 4 rows later.
    assert plan.home.new_rows.tolist() == [65, 69, 66, 70, 67, 71, 32, 36]


def test_staging_packs_the_pages_in_use_in_id_order():
    plan = example_plan()
    staging = stage_pages(plan, num_blocks=100)
    assert staging.load_pages.tolist() == [2, 3, 4, 7, 8]  # 99 is past request 0's pages
    in_use = plan.page_in_use
    assert staging.table.block_table[in_use].tolist() == [3, 4, 0, 1, 2]
    # Block 8 sits at position 4, block 4 at position 2.
    assert staging.table.new_rows.tolist() == [33, 37, 34, 38, 35, 39, 16, 20]


def test_shared_pages_load_once():
    plan = build_step_plan(
        query_start_loc=torch.tensor([0, 1, 2]), seq_lens=torch.tensor([8, 8]),
        block_table=torch.tensor([[5, 6], [5, 9]]), slot_mapping=torch.tensor([27, 39]),
        block_size=4, device="cpu",
    )
    staging = stage_pages(plan, num_blocks=12)
    # Four page references, three distinct pages: the loads stop at the count; the spare entry is padding.
    assert staging.load_pages.tolist() == [5, 6, 9, 0]
    assert staging.num_pages.tolist() == [3]
    assert staging.table.block_table.tolist() == [[0, 1], [0, 2]]


def test_the_null_block_is_never_loaded():
    plan = build_step_plan(
        query_start_loc=torch.tensor([0, 1, 2]), seq_lens=torch.tensor([8, 8]),
        block_table=torch.tensor([[0, 6], [0, 0]]), slot_mapping=torch.tensor([27, 3]),
        block_size=4, device="cpu",
    )
    staging = stage_pages(plan, num_blocks=12, null_block=0)
    assert staging.num_pages.tolist() == [1] and staging.load_pages[:1].tolist() == [6]
    assert stage_pages(plan, num_blocks=12).num_pages.tolist() == [2]


def test_plan_refuses_inconsistent_lengths():
    with pytest.raises(ValueError, match="query_len"):
        build_step_plan(
            query_start_loc=torch.tensor([0, 5]), seq_lens=torch.tensor([4]),
            block_table=torch.tensor([[0]]), slot_mapping=torch.zeros(5, dtype=torch.int64),
            block_size=4, device="cpu",
        )
    with pytest.raises(ValueError, match="fewer pages"):
        build_step_plan(
            query_start_loc=torch.tensor([0, 1]), seq_lens=torch.tensor([5]),
            block_table=torch.tensor([[0]]), slot_mapping=torch.zeros(1, dtype=torch.int64),
            block_size=4, device="cpu",
        )
