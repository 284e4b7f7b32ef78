"""Which sequence a prompt gets and how much of it is reused (no model needed)."""

from __future__ import annotations

from backends.llamacpp.seqs import COPY_MIN_GAIN, RUN_COST_TOKENS, SeqPlan, SeqTable

SYSTEM = list(range(100, 130))  # a 30-token system prompt
NOTHING: dict[int, list[int]] = {}


def take(table: SeqTable, tokens: list[int], running: dict[int, list[int]] = NOTHING) -> SeqPlan:
    """``running``: seq id -> the tokens in its cells so far."""
    return table.take(tokens, running, lambda seq: running.get(seq, table.resident(seq)))


def test_a_prompt_takes_the_free_seq_that_holds_its_longest_prefix() -> None:
    table = SeqTable(4, unified_kv=True)
    holder = -1
    for tokens in ([1, 2, 3], [*SYSTEM, 7, 8], [9, 9]):
        plan = take(table, tokens)
        table.release(plan.seq, tokens)
        holder = plan.seq if tokens[0] == SYSTEM[0] else holder
    plan = take(table, [*SYSTEM, 5, 6])
    assert plan.seq == holder
    assert table.resident(plan.seq) == []  # emptied until it is released again
    assert plan.own == len(SYSTEM) and plan.cells == len(SYSTEM) + 2 and plan.donor == -1


def test_one_prompt_token_is_always_left_to_decode() -> None:
    table = SeqTable(2, unified_kv=True)
    first = take(table, [1, 2, 3, 4])
    table.release(first.seq, [1, 2, 3, 4, 5])
    again = take(table, [1, 2, 3, 4])
    assert again.seq == first.seq and again.own == 3


def test_without_a_match_the_least_recently_released_seq_goes_first() -> None:
    table = SeqTable(3, unified_kv=True)
    plans = [take(table, [i]) for i in range(3)]
    for plan in (plans[1], plans[0], plans[2]):
        table.release(plan.seq, [50 + plan.seq])
    assert take(table, [7, 7]).seq == plans[1].seq
    assert take(table, [7, 7]).seq == plans[0].seq


def test_a_longer_prefix_held_by_a_running_seq_is_copied() -> None:
    table = SeqTable(3, unified_kv=True)
    busy = take(table, [*SYSTEM, 1, 2])
    running = {busy.seq: [*SYSTEM, 1]}  # still prefilling: only what is in its cells counts
    plan = take(table, [*SYSTEM, 3, 4], running)
    assert plan.seq != busy.seq
    assert plan.donor == busy.seq and plan.donor_len == len(SYSTEM)


def test_a_copy_must_gain_enough_tokens_over_the_seqs_own_prefix() -> None:
    table = SeqTable(2, unified_kv=True)
    short = SYSTEM[: COPY_MIN_GAIN - 1]
    plan = take(table, [*short, 1])
    running = {plan.seq: [*short, 1]}
    assert take(table, [*short, 2], running).donor == -1  # 7 tokens: prefilling beats copying


def test_separate_kv_streams_prefer_a_seq_next_to_running_ones() -> None:
    table = SeqTable(8, unified_kv=False)
    plans = [take(table, [i]) for i in range(8)]
    for plan in plans:
        table.release(plan.seq, [])
    assert take(table, [9], {3: [1], 4: [1]}).seq in (2, 5)
    # a prefix longer than the micro-batch cost still wins over adjacency
    table = SeqTable(8, unified_kv=False)
    plans = [take(table, [i]) for i in range(8)]
    for plan in plans:
        table.release(plan.seq, [*SYSTEM[: RUN_COST_TOKENS * 2 + 2]] if plan.seq == 7 else [])
    assert take(table, [*SYSTEM, 1], {3: [1], 4: [1]}).seq == 7
