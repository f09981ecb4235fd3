"""The trainer: updates, loss values against hand computation, accumulation, resume after SIGKILL, 2 processes."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from services.trainer.config import OptimConfig, SFTConfig, TrainerConfig
from services.trainer.learner.objective import LossConfig, group_advantages
from services.trainer.learner.sft import random_mask_item
from services.trainer.learner.trainer import Learner, step_generator
from shared.contracts.wire import StepBatch
from shared.model.masks import to_additive

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "scripts"))
from oracles.per_round import per_round_layout  # noqa: E402
from rl_step import fixed_groups  # noqa: E402


@pytest.fixture(scope="module")
def groups(tiny_dir):
    return fixed_groups(str(tiny_dir))


def _trainer(tiny_dir, tmp_path, **kw) -> Learner:
    kw.setdefault("optim", OptimConfig(lr=1e-3))
    return Learner(TrainerConfig(model=tiny_dir, output_dir=tmp_path / "run", **kw))


def _params(trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.unwrapped.lm.named_parameters()}


def test_rl_step_changes_every_parameter(tiny_dir, tmp_path, groups):
    trainer = _trainer(tiny_dir, tmp_path)
    before = _params(trainer)
    m = trainer.rl_step(StepBatch.of(*groups))
    after = _params(trainer)
    unchanged = [k for k in before if torch.equal(before[k], after[k])]
    assert unchanged == [] and m["updates"] == 1 and m["groups_kept"] == 3


def test_rl_step_makes_exactly_the_configured_updates(tiny_dir, tmp_path, groups):
    trainer = _trainer(tiny_dir, tmp_path, updates_per_step=3, passes=2, micro_batch_size=1)
    m = trainer.rl_step(StepBatch.of(*groups))
    assert m["updates"] == 6
    assert trainer.scheduler.scheduler.last_epoch == 6
    steps = {float(s["step"]) for s in trainer.optimizer.optimizer.state.values()}
    assert steps == {6.0}


def test_fewer_responses_than_updates_make_one_update_each(tiny_dir, tmp_path, groups):
    m = _trainer(tiny_dir, tmp_path, updates_per_step=20).rl_step(StepBatch.of(*groups))  # 12 responses
    assert m["updates"] == 12 and m["tokens"] > 0


def test_on_policy_token_loss_is_minus_mean_token_advantage(tiny_dir, tmp_path, groups):
    rollouts, rewards = groups
    rewards = [[r + 0.1 * i for i, r in enumerate(g)] for g in rewards]
    rollouts = [[r.model_copy(update={"token_ids": r.token_ids[:k], "step_map": r.step_map[:k],
                                      "tail_ids": [], "tail_steps": [], "logprobs": r.logprobs[:k]})
                 for r, k in zip(g, (7, 5, 6, 7), strict=True)] for g in rollouts]  # fmt: skip
    trainer = _trainer(tiny_dir, tmp_path)
    m = trainer.rl_step(StepBatch.of(rollouts, rewards))
    # ratio 1 on the first pass: loss = -sum_t A_t / T with A of each response on each of its tokens
    adv = group_advantages(torch.tensor(rewards, dtype=torch.float64))
    lengths = torch.tensor([[len(r.token_ids) for r in g] for g in rollouts], dtype=torch.float64)
    expected = -float((adv * lengths).sum() / lengths.sum())
    assert abs(expected) > 1e-3 and m["loss"] == pytest.approx(expected, abs=1e-6)


def test_floor_correct_zeroes_only_the_negative_advantages_of_correct_responses(tiny_dir, tmp_path, groups):
    rollouts, rewards = groups
    rewards = [[r + 0.1 * i for i, r in enumerate(g)] for g in rewards]
    correct = [[True, True, False, True], [False, True, True, True], [True, False, False, True]]
    trainer = _trainer(tiny_dir, tmp_path, loss=LossConfig(floor_correct=True))
    with pytest.raises(ValueError, match="floor_correct"):
        trainer.rl_step(StepBatch.of(rollouts, rewards))
    m = trainer.rl_step(StepBatch.of(rollouts, rewards, correct=correct))
    adv = group_advantages(torch.tensor(rewards, dtype=torch.float64))
    ok = torch.tensor(correct)
    floored = torch.where(ok & (adv < 0), torch.zeros_like(adv), adv)
    assert bool((ok & (adv < 0)).any()) and bool((~ok & (adv < 0)).any())  # both cases occur
    lengths = torch.tensor([[len(r.token_ids) for r in g] for g in rollouts], dtype=torch.float64)
    expected = -float((floored * lengths).sum() / lengths.sum())
    unfloored = -float((adv * lengths).sum() / lengths.sum())
    assert abs(expected - unfloored) > 1e-3 and m["loss"] == pytest.approx(expected, abs=1e-6)


def test_micro_batching_gives_the_same_update(tiny_dir, tmp_path, groups):
    results = []
    for micro in (1, 16):
        trainer = _trainer(tiny_dir, tmp_path / str(micro), micro_batch_size=micro, optim=OptimConfig(lr=1e-4))
        trainer.rl_step(StepBatch.of(*groups))
        results.append(_params(trainer))
    # Adam's first step is lr * g / (|g| + eps): where a gradient is near 0, summation-order rounding (which differs
    # with the thread count) moves it by a few percent of lr; a wrong normalisation moves it by about lr (1e-4)
    assert max((results[0][k] - results[1][k]).abs().max() for k in results[0]) <= 5e-6


def test_zero_variance_groups_get_no_gradient(tiny_dir, tmp_path, groups):
    # the driver's collector drops such groups (dynamic sampling); given one anyway, its advantages are all 0
    trainer = _trainer(tiny_dir, tmp_path)
    before = _params(trainer)
    m = trainer.rl_step(StepBatch.of(groups[0], [[1.0] * len(g) for g in groups[0]]))
    assert m["groups_kept"] == 0 and m["groups_dropped"] == 3 and m["grad_norm"] == 0.0
    assert all(torch.equal(before[k], v) for k, v in _params(trainer).items())


def test_kl_to_an_identical_reference_is_zero_and_rewards_must_match(tiny_dir, tmp_path, groups):
    trainer = _trainer(tiny_dir, tmp_path, loss=LossConfig(beta=0.1))
    m = trainer.rl_step(StepBatch.of(*groups))
    assert m["kl"] == pytest.approx(0.0, abs=1e-7)
    with pytest.raises(ValueError, match="rewards"):
        trainer.rl_step(StepBatch.of(groups[0], [[1.0]]))


def test_sft_loss_matches_hand_computation(tiny_dir, tmp_path, tiny):
    cfg = SFTConfig(model=tiny_dir, output_dir=tmp_path / "sft", data=tmp_path / "unused.jsonl")
    trainer = Learner(cfg)
    examples = [([5, 6, 7], [40, 41, 42, 43, 256]), ([9] * 6, [50, 51, 256, 256])]
    items = [random_mask_item(p, r, 4, step_generator(0, 0, 0)) for p, r in examples]
    # by hand: sum over masked response tokens of -log p / t, over all response tokens of the batch
    total, n_resp = 0.0, 0
    with torch.no_grad():
        for it in items:
            tr = it.trajectory
            rnd = tr.rounds[0]
            noisy = torch.where(rnd.masked, torch.full_like(tr.clean_ids, tiny.spec.mask_token_id), tr.clean_ids)
            lay = per_round_layout(tr.clean_ids, noisy, tr.prompt_len, 4)
            hidden = tiny.model.model(input_ids=lay.input_ids[None], position_ids=lay.position_ids[None],
                                      attention_mask=to_additive(lay.bool_mask(4)[None])).last_hidden_state[0]  # fmt: skip
            logp = torch.log_softmax(tiny.model.lm_head(hidden), -1)
            for idx in ((lay.copy_ids == 1) & rnd.targets[lay.position_ids]).nonzero().squeeze(1).tolist():
                total -= float(logp[idx, lay.input_ids[int(lay.position_ids[idx])]]) * it.token_scale
            n_resp += tr.response_len
    m = trainer.sft_step(items)
    assert m["loss"] == pytest.approx(total / n_resp, rel=1e-5)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_give_the_same_update_as_one(tiny_dir, tmp_path):
    script = REPO / "tests" / "scripts" / "rl_step.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one, two = tmp_path / "one.safetensors", tmp_path / "two.safetensors"
    subprocess.run([sys.executable, str(script), str(tiny_dir), str(one)], check=True, env=env, timeout=300)
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "--main_process_port", str(_free_port())]  # fmt: skip
    out = subprocess.run([*launch, str(script), str(tiny_dir), str(two)], env=env, timeout=300,
                         capture_output=True, text=True)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert "rank 1/2" in out.stdout  # really two processes (gloo)
    a, b = load_file(one), load_file(two)
    init = load_file(tiny_dir / "model.safetensors")
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-5
    assert all(not torch.equal(a[k], init[k]) for k in a if k in init)


def _sft_cmd(cfg_path: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "services", "sft", "--config", str(cfg_path), *extra]


def _losses(run: Path) -> dict[int, float]:
    out = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        m = json.loads(line)
        out[int(m["step"])] = m["loss"]  # a resumed run rewrites the steps after its checkpoint
    return out


def test_sigkill_then_resume_continues_exactly(tiny_dir, tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{a}+{a}=", "response": str(2 * a)}) + "\n" for a in range(40)))
    base = {"model": str(tiny_dir), "data": str(data), "steps": 8, "batch_size": 8, "save_every": 1,
            "micro_batch_size": 4, "optim": {"lr": 3e-3}}  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    runs = {}
    for name in ("straight", "killed"):
        cfg = tmp_path / f"{name}.yaml"
        cfg.write_text(json.dumps({**base, "output_dir": str(tmp_path / name)}))
        runs[name] = cfg
    subprocess.run(_sft_cmd(runs["straight"]), check=True, env=env, timeout=300, capture_output=True)
    proc = subprocess.Popen(_sft_cmd(runs["killed"]), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    marker = tmp_path / "killed" / "checkpoints" / "step-00000003" / "trainer_state.json"
    deadline = time.time() + 240
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert marker.exists(), "the run never reached step 3"
    assert not (tmp_path / "killed" / "checkpoints" / "step-00000008").exists(), "killed too late to test resume"
    subprocess.run(_sft_cmd(runs["killed"], "--resume"), check=True, env=env, timeout=300, capture_output=True)
    straight, resumed = _losses(tmp_path / "straight"), _losses(tmp_path / "killed")
    assert sorted(resumed) == list(range(1, 9))
    assert resumed == straight  # exact: same floats, steps 1..8
    a = load_file(tmp_path / "straight" / "checkpoints" / "step-00000008" / "model" / "model.safetensors")
    b = load_file(tmp_path / "killed" / "checkpoints" / "step-00000008" / "model" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_gtpo_learns_a_reward_the_model_can_reach(tiny_dir, tmp_path):
    """The whole loop learns: engine rollouts -> rewards -> GTPO steps raise the share of even token ids."""
    from services.rollout.engines.torch_engine import TorchEngine
    from shared.contracts.wire import GenerationRequest, SamplingParams

    trainer = _trainer(tiny_dir, tmp_path, micro_batch_size=64)
    engine = TorchEngine(trainer.loaded)  # the live policy: each step samples from the updated weights
    means = []
    for step in range(10):
        reqs = [GenerationRequest(prompt_ids=list(range(30 + i, 40 + i)),
                                  params=SamplingParams(seed=100 * step + i, n=8, max_new_tokens=8, stop_token_ids=[]))
                for i in range(8)]  # fmt: skip
        trainer.policy.eval()
        groups = engine.generate(reqs)
        rewards = [[sum(t % 2 == 0 for t in r.token_ids) / len(r.token_ids) for r in g] for g in groups]
        means.append(sum(map(sum, rewards)) / 64)
        trainer.policy.train()
        trainer.rl_step(StepBatch.of(groups, rewards))
    assert sum(means[-3:]) / 3 > means[0] + 0.2, means
