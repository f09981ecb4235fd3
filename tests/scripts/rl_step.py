"""One GTPO step on fixed rollouts; the main process writes the updated weights (and the step's metrics as JSON
next to them). Run plainly or under `accelerate launch`, DDP or FSDP2 (the 2-process tests compare them).

    python tests/scripts/rl_step.py MODEL_DIR OUT_FILE [micro_batch_size] [standard|decoupled]

`decoupled`: the off-policy case of the decoupled objective: the trainer is at v2 while the groups were sampled
at v0, v1, v2, the behaviour log-probs are shifted (see `shifted_behaviour`) and the last group is one short.
"""

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from services.rollout.engines.torch_engine import TorchEngine
from services.trainer.config import OptimConfig, TrainerConfig
from services.trainer.learner.objective import LossConfig
from services.trainer.learner.sharding import full_state_dict
from services.trainer.learner.trainer import Learner
from shared.contracts.wire import GenerationRequest, SamplingParams, StepBatch
from shared.model.sdar import load_model


def fixed_groups(model_dir: str, prompts: int = 3, n: int = 4):
    """Rollouts and rewards that are the same in every process (seeded engine, reward = share of even ids)."""
    engine = TorchEngine(load_model(model_dir))
    reqs = [
        GenerationRequest(
            prompt_ids=list(range(20 + i, 25 + 2 * i)),
            params=SamplingParams(seed=i, n=n, max_new_tokens=7, stop_token_ids=[], logprobs=True),
        )
        for i in range(prompts)
    ]
    groups = engine.generate(reqs)
    rewards = [[sum(t % 2 == 0 for t in r.token_ids) / len(r.token_ids) for r in g] for g in groups]
    return groups, rewards


SHIFT = 0.5  # nats: behaviour log-prob = engine log-prob - SHIFT at even response positions, + SHIFT at odd ones


def shifted_behaviour(groups, versions=(0, 1, 2)):
    """The groups as if sampled by another policy: group g at policy version versions[g % len(versions)], its
    behaviour log-probs moved so that log pi_prox - log pi_behav is +SHIFT (even positions) / -SHIFT (odd)."""
    return [
        [r.model_copy(update={"policy_version": versions[g % len(versions)],
                              "logprobs": [lp - SHIFT if i % 2 == 0 else lp + SHIFT for i, lp in enumerate(r.logprobs)]})
         for r in group]
        for g, group in enumerate(groups)
    ]  # fmt: skip


def main() -> None:
    model_dir, out = sys.argv[1], Path(sys.argv[2])
    micro = int(sys.argv[3]) if len(sys.argv) > 3 else 2
    objective = sys.argv[4] if len(sys.argv) > 4 else "standard"
    groups, rewards = fixed_groups(model_dir)
    loss = LossConfig(objective=objective, tis_cap=1.5) if objective == "decoupled" else LossConfig()
    cfg = TrainerConfig(
        model=model_dir, output_dir=out.parent / f"{out.stem}-run", micro_batch_size=micro, loss=loss,
        optim=OptimConfig(lr=1e-4, max_grad_norm=1.0),  # Adam's first step is lr * sign(g): keep fp noise small
    )  # fmt: skip
    trainer = Learner(cfg)
    if objective == "decoupled":
        trainer.state.policy_version = 2
        groups = shifted_behaviour(groups)
        # 11 responses: on 2 ranks one gets 6 and the other 5, so its last micro-batch (of 1) is empty
        groups[-1], rewards[-1] = groups[-1][1:], rewards[-1][1:]
    m = trainer.rl_step(StepBatch.of(groups, rewards))
    print(f"rank {trainer.rank}/{trainer.world} sharding {trainer.sharding} loss {m['loss']:.6f}"
          f" tokens {m['tokens']}", flush=True)  # fmt: skip
    state = full_state_dict(trainer.accelerator, trainer.policy, trainer.unwrapped.lm)  # collective under FSDP
    if trainer.accelerator.is_main_process:
        save_file({k: v.contiguous().clone() for k, v in state.items()}, str(out))
        out.with_suffix(".json").write_text(json.dumps(m))
    trainer.accelerator.wait_for_everyone()
    torch.distributed.destroy_process_group() if torch.distributed.is_initialized() else None


if __name__ == "__main__":
    main()
