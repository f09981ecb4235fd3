"""Trajectory -> rounds by hand, and the exactness claim: packed == per-round == the engine's log-probs."""

import pytest
import torch
from oracles.per_round import per_round_batch

from services.rollout.engines.torch_engine import TorchEngine
from services.trainer.learner.policy import TokenLogProbs
from services.trainer.learner.trajectory import block_rounds, build_batch, rollout_trajectory, trajectory_rounds
from shared.contracts.wire import GenerationRequest, SamplingParams


def _set(mask: torch.Tensor) -> set[int]:
    return set(mask.nonzero().squeeze(1).tolist())


def test_block_rounds_by_hand():
    assert block_rounds([3, 1, 2, 2]) == [(1, {1}), (2, {2}), (3, {3})]
    assert block_rounds([3, 1, 2, 4], shrink=2) == [(1, {1, 2}), (3, {3, 4})]
    assert block_rounds([5], shrink=3) == [(5, {5})]
    with pytest.raises(ValueError, match="shrink"):
        block_rounds([1], shrink=0)


# prompt of 3 (B=4): position 3 shares block 0 with the prompt tail; block 1 = 4..7; block 2 = 8, 9.
# steps per generated position 3..9; the response is positions 3..8, position 9 is the tail.
STEPS = [1, 3, 2, 2, 4, 6, 5]


def test_rounds_by_hand():
    rounds = trajectory_rounds(3, STEPS, response_len=6, block_size=4)
    got = [(r.blocks.tolist(), _set(r.masked), _set(r.targets)) for r in rounds]
    assert got == [
        ([0, 1], {3, 4, 5, 6, 7}, {3, 5, 6}),  # block 2's first round (step 5) only unmasked the tail: absent
        ([1, 2], {4, 7, 8}, {4, 8}),  # position 9 (tail, step 5) is clean, as sampled, when 8 is decoded
        ([1], {7}, {7}),
    ]


def test_rounds_by_hand_with_shrink_two():
    rounds = trajectory_rounds(3, STEPS, response_len=6, block_size=4, shrink=2)
    got = [(r.blocks.tolist(), _set(r.masked), _set(r.targets)) for r in rounds]
    assert got == [
        ([0, 1, 2], {3, 4, 5, 6, 7, 8, 9}, {3, 4, 5, 6, 8}),  # steps {2,3} of block 1 from the state before 2
        ([1], {7}, {7}),
    ]


def test_every_response_token_is_a_target_exactly_once_and_tail_never():
    rounds = trajectory_rounds(3, STEPS, response_len=6, block_size=4)
    counts = sum(r.targets.long() for r in rounds)
    assert counts[3:9].tolist() == [1] * 6 and counts[9] == 0 and counts[:3].sum() == 0


def test_packed_batch_layout_by_hand():
    from services.trainer.learner.trajectory import Trajectory

    clean = torch.tensor([10, 11, 12, 20, 21, 22, 23, 24, 25, 26])
    traj = Trajectory(clean, 3, 6, 4, trajectory_rounds(3, STEPS, 6, 4))
    batch = build_batch([traj], mask_id=99)
    m = 99
    assert batch.input_ids[0].tolist() == [
        *clean.tolist(),  # clean: prompt + response + tail
        10, 11, 12, m, m, m, m, m,  # copy 1: blocks 0, 1 (the prompt in block 0 is given)
        m, 22, 23, m, m, 26,  # copy 2: blocks 1, 2 (position 9 = tail, clean)
        21, 22, 23, m,  # copy 3: block 1
    ]  # fmt: skip
    assert batch.position_ids[0].tolist() == [*range(10), *range(0, 8), *range(4, 10), *range(4, 8)]
    assert batch.copy_ids[0].tolist() == [0] * 10 + [1] * 8 + [2] * 6 + [3] * 4
    # targets: in copy order; labels are the clean tokens; token_index = position - prompt
    assert batch.target_index.tolist() == [13, 15, 16, 18, 22, 27]
    assert batch.labels.tolist() == [20, 22, 23, 21, 25, 24]
    assert batch.token_index.tolist() == [0, 2, 3, 1, 5, 4]
    assert batch.round_index.tolist() == [0, 0, 0, 1, 1, 2]


@pytest.fixture(scope="module")
def rollouts(sharp):
    """20 rollouts from the reference engine: B=4, dynamic, T=1, no top-k/top-p, mixed prompt lengths."""
    g = torch.Generator().manual_seed(0)
    reqs = []
    for i in range(20):
        plen = int(torch.randint(1, 15, (1,), generator=g))
        prompt = torch.randint(0, 250, (plen,), generator=g).tolist()
        params = SamplingParams(
            seed=i,
            max_new_tokens=int(torch.randint(5, 23, (1,), generator=g)),
            confidence_threshold=0.02,
            stop_token_ids=[257],
            logprobs=True,
        )
        reqs.append(GenerationRequest(prompt_ids=prompt, params=params))
    return [r for (r,) in TorchEngine(sharp).generate(reqs)]


def test_rollouts_cover_the_hard_cases(rollouts):
    assert sum(len(r.prompt_ids) % 4 != 0 for r in rollouts) >= 10
    assert any(r.finish_reason == "stop" for r in rollouts)
    assert sum(len(r.tail_ids) > 0 for r in rollouts) >= 10  # responses cut inside their last block
    steps = sum(max(r.step_map + r.tail_steps) for r in rollouts)
    assert sum(len(r.step_map) + len(r.tail_steps) for r in rollouts) / steps > 1.2  # multi-token steps


def _logprobs(model, trajs, mask_id, layout):
    batch = (build_batch if layout == "packed" else per_round_batch)(trajs, mask_id)
    lp = TokenLogProbs(model)(batch)
    order = batch.canonical_order()
    return lp[order], batch.response_index[order]


def test_packed_equals_per_round_equals_engine(sharp, rollouts):
    trajs = [rollout_trajectory(r) for r in rollouts]
    mask_id = sharp.spec.mask_token_id
    with torch.no_grad():
        packed, resp = _logprobs(sharp.model, trajs, mask_id, "packed")
        per_round, _ = _logprobs(sharp.model, trajs, mask_id, "per_round")
    engine = torch.tensor([x for r in rollouts for x in r.logprobs])
    assert len(packed) == len(engine) == sum(len(r.token_ids) for r in rollouts)
    assert (packed - per_round).abs().max() <= 1e-5
    assert (packed - engine).abs().max() <= 1e-5


def test_packed_and_per_round_gradients_are_equal(sharp, rollouts):
    trajs = [rollout_trajectory(r) for r in rollouts]
    adv = torch.randn(len(rollouts), generator=torch.Generator().manual_seed(1))
    grads = {}
    for layout in ("packed", "per_round"):
        sharp.model.zero_grad()
        lp, resp = _logprobs(sharp.model, trajs, sharp.spec.mask_token_id, layout)
        (-(adv[resp] * lp).mean()).backward()
        grads[layout] = torch.cat([p.grad.flatten() for p in sharp.model.parameters()])
    sharp.model.zero_grad()
    diff = (grads["packed"] - grads["per_round"]).norm() / grads["per_round"].norm()
    assert diff <= 1e-5


def test_padding_rows_changes_no_log_prob(sharp, rollouts):
    """pad_to (used before FlexAttention) re-indexes targets; padded rows are invisible to real tokens."""
    trajs = [rollout_trajectory(r) for r in rollouts]
    batch = build_batch(trajs, sharp.spec.mask_token_id)
    padded = batch.pad_to(128)
    assert padded.input_ids.shape[1] % 128 == 0 and padded.input_ids.shape[1] > batch.input_ids.shape[1]
    assert torch.equal(padded.input_ids.flatten()[padded.target_index], batch.input_ids.flatten()[batch.target_index])
    with torch.no_grad():
        a, b = TokenLogProbs(sharp.model)(batch), TokenLogProbs(sharp.model)(padded)
    assert (a - b).abs().max() <= 1e-5
    assert batch.pad_to(batch.input_ids.shape[1]) is batch
