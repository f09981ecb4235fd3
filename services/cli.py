"""The `gtpo` console script (Typer).

Commands stay thin: they parse arguments and call into `shared` / `services`. torch and transformers are
imported inside the commands so that `gtpo --help` is instant.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from services.demo.speed_methods import DEFAULT_SPEED_METHOD, SPEED_METHODS
from services.status_view import TIMEOUT_S
from shared.contracts.wire import SamplingParams
from shared.data import ANSWER_FIELD, MAX_ROW_BYTES, QUESTION_FIELD
from shared.model.step_map import denoising_steps, tokens_per_step
from shared.prompts import MAX_PROMPT_TOKENS, PROMPT_TEMPLATE, encode_prompt

app = typer.Typer(
    name="gtpo",
    help="Post-training (SFT + GTPO RL) for SDAR block-diffusion language models.",
    no_args_is_help=True,
    add_completion=False,
)
console = Console()

MODEL_PRESETS = ("tiny", "tiny-sdar")
_EXTRA = {"allow_extra_args": True, "ignore_unknown_options": True}  # commands taking key=value overrides
_SAMPLING = {name: f.default for name, f in SamplingParams.model_fields.items()}  # the engines' defaults, once


@app.callback()
def main() -> None:
    """Post-training (SFT + GTPO RL) for SDAR block-diffusion language models."""
    # an explicit callback keeps `init-model` a subcommand while it is the only one


def _fail(command: str, message: str) -> typer.Exit:
    """A config or input error: the message on stderr (one line per bad field, no traceback) and exit status 2."""
    typer.echo(f"gtpo {command}: {message}", err=True)
    return typer.Exit(code=2)


def _dry_run(values: dict) -> typer.Exit:
    """--dry-run of a command without a config file: its resolved settings as YAML (secrets redacted), and exit 0."""
    import yaml
    from pydantic import BaseModel

    def plain(v):
        if isinstance(v, BaseModel):
            return v.model_dump(mode="json")
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return str(v) if isinstance(v, Path) else v

    typer.echo(yaml.safe_dump({k: plain(v) for k, v in values.items()}, sort_keys=False))
    return typer.Exit(0)


def _check_preset(preset: str) -> str:
    if preset not in MODEL_PRESETS:
        raise typer.BadParameter(f"unknown preset {preset!r}; allowed presets: {', '.join(MODEL_PRESETS)}")
    return preset


@app.command("init-model")
def init_model(
    preset: str = typer.Argument(..., callback=_check_preset, help=f"model preset: {', '.join(MODEL_PRESETS)}"),
    out: Path = typer.Option(..., "--out", help="checkpoint directory to write (SDAR layout)"),
    seed: int = typer.Option(0, "--seed", help="torch seed for the random initial weights"),
    force: bool = typer.Option(False, "--force", help="overwrite a directory that already holds a checkpoint"),
    dry_run: bool = typer.Option(False, "--dry-run", help="print the resolved settings and exit"),
) -> None:
    """Write a randomly initialised checkpoint of PRESET to --out (config, safetensors weights, tokenizer)."""
    if (out / "config.json").exists() and not force:
        console.print(f"[red]{out} already holds a checkpoint; pass --force to overwrite it[/red]")
        raise typer.Exit(code=1)
    if dry_run:
        raise _dry_run({"preset": preset, "out": out, "seed": seed, "force": force})

    from shared.model.sdar import count_parameters, load_model
    from shared.model.tiny import init_tiny, init_tiny_sdar

    # tiny: the demo's CPU model; tiny-sdar: head size LMDeploy's GPU kernels accept (GPU checks)
    path = (init_tiny if preset == "tiny" else init_tiny_sdar)(out, seed=seed)
    loaded = load_model(path)  # read back what was written: the summary describes the files, not the memory
    table = Table(title=f"gtpo init-model {preset}", show_header=False)
    table.add_row("path", str(path.resolve()))
    table.add_row("parameters", f"{count_parameters(loaded.model):,}")
    table.add_row("vocab size", f"{loaded.model.config.vocab_size} (tokenizer: {len(loaded.tokenizer)})")
    table.add_row("block size", str(loaded.spec.block_size))
    table.add_row("mask id", f"{loaded.spec.mask_token_id} ({loaded.tokenizer.mask_token})")
    console.print(table)


@app.command("generate")
def generate(
    model: Path = typer.Option(..., "--model", help="SDAR-layout checkpoint directory"),
    prompt: list[str] = typer.Option(..., "--prompt", help="prompt text (repeat for a batch)"),
    n: int = typer.Option(1, "--n", help="samples per prompt"),
    max_new_tokens: int = typer.Option(32, "--max-new-tokens"),
    strategy: str = typer.Option(
        _SAMPLING["strategy"].value, "--strategy", help="low_confidence_dynamic|low_confidence_static|sequential"
    ),
    threshold: float = typer.Option(
        _SAMPLING["confidence_threshold"], "--threshold", help="dynamic strategy confidence threshold"
    ),
    temperature: float = typer.Option(_SAMPLING["temperature"], "--temperature"),
    top_k: int = typer.Option(_SAMPLING["top_k"], "--top-k"),
    top_p: float = typer.Option(_SAMPLING["top_p"], "--top-p"),
    seed: int | None = typer.Option(None, "--seed", help="same seed, same output"),
    chat: bool = typer.Option(True, "--chat/--raw", help="wrap the prompt in the tokenizer's chat template"),
    device: str = typer.Option("auto", "--device", help="auto|cpu|cuda"),
    as_json: bool = typer.Option(False, "--json", help="print one rollout JSON per line instead of tables"),
    dry_run: bool = typer.Option(False, "--dry-run", help="print the resolved settings and exit"),
) -> None:
    """Decode prompts with the torch reference engine and show each token's denoising step.

    Example: gtpo generate --model runs/tiny --prompt "What is 12+7?" --n 2 --seed 0
    """
    from pydantic import ValidationError

    from shared.contracts.wire import SamplingParams, describe_validation_error

    try:
        params = SamplingParams(
            n=n,
            max_new_tokens=max_new_tokens,
            strategy=strategy,
            confidence_threshold=threshold,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            seed=seed,
            logprobs=True,
        )
    except ValidationError as e:
        raise typer.BadParameter(describe_validation_error(e)) from e
    if not (model / "config.json").exists():
        raise typer.BadParameter(f"--model: {model} holds no config.json (make one with `gtpo init-model tiny`)")
    if dry_run:
        raise _dry_run({"model": model, "prompt": prompt, "params": params, "chat": chat, "device": device,
                        "json": as_json})  # fmt: skip

    from services.rollout.engines.torch_engine import TorchEngine
    from shared.contracts.wire import GenerationRequest

    engine = TorchEngine.from_pretrained(model, device=device)
    tok = engine.tokenizer
    reqs = [GenerationRequest(prompt_ids=encode_prompt(tok, p, chat=chat), params=params) for p in prompt]
    for text, rollouts in zip(prompt, engine.generate(reqs), strict=True):
        for r in rollouts:
            if as_json:
                typer.echo(r.model_dump_json())
            else:
                _show_rollout(text, r, tok)


def _show_rollout(prompt: str, r, tokenizer) -> None:
    """A table per sample: each token with the step that unmasked it, grouped by block."""
    b = r.params.block_size
    table = Table(title=f"{prompt!r} (seed {r.seed})", show_lines=False)
    table.add_column("block", justify="right")
    table.add_column("tokens @ step")
    by_block: dict[int, list[str]] = {}
    for i, (t, s) in enumerate(zip(r.token_ids + r.tail_ids, r.step_map + r.tail_steps, strict=True)):
        tail = i >= len(r.token_ids)
        cell = f"{tokenizer.decode([t])!r}@{s}" + (" (tail)" if tail else "")
        by_block.setdefault((len(r.prompt_ids) + i) // b, []).append(cell)
    for blk, cells in by_block.items():
        table.add_row(str(blk), "  ".join(cells))
    console.print(table)
    console.print(
        f"finish={r.finish_reason}  tokens={len(r.token_ids)} (+{len(r.tail_ids)} tail)  "
        f"denoising steps={denoising_steps(r.step_map)}  tokens/step={tokens_per_step(len(r.token_ids), r.step_map):.2f}"
        f"  text={r.text!r}"
    )


def _experiment(command: str, model, config: Path | None, args: list[str], dry_run: bool, *, siblings=(), environ=None):
    """Load an experiment config (YAML < GTPO_* env < key=value); with --dry-run print it and exit.

    Args:
        siblings: the other trainer commands' configs, whose GTPO_* variables this command leaves alone.
    """
    from shared.config.loader import ConfigError, dump_config, load_config

    try:
        cfg = load_config(model, config, args, environ=environ, siblings=siblings)
    except ConfigError as e:
        raise _fail(command, str(e)) from None
    if dry_run:
        typer.echo(dump_config(cfg))
        raise typer.Exit(0)
    return cfg


@app.command("sft", context_settings=_EXTRA)
def sft(
    ctx: typer.Context,
    config: Path | None = typer.Option(None, "--config", help="YAML experiment file (SFTConfig)"),
    resume: bool = typer.Option(False, "--resume", help="continue from the latest checkpoint in output_dir"),
    fresh: bool = typer.Option(
        False, "--fresh", help="start again at step 0 where a run wrote before (its files are moved aside)"
    ),
    dry_run: bool = typer.Option(False, "--dry-run", help="print the resolved config and exit"),
) -> None:
    """Supervised fine-tuning: SDAR random masking ({prompt, response} / {messages} rows) or trace-SFT (rollouts).

    Extra arguments are `key=value` overrides. Example:
    gtpo sft --config sft.yaml model=runs/tiny data=train.jsonl output_dir=runs/sft steps=200 optim.lr=2e-3
    Multi-GPU: accelerate launch --config_file deploy/accelerate/ddp.yaml -m services sft --config sft.yaml
    """
    from services.trainer.config import RLConfig, SFTConfig

    cfg = _experiment("sft", SFTConfig, config, list(ctx.args), dry_run, siblings=(RLConfig,))
    from services.trainer.learner.checkpoint import CheckpointError
    from services.trainer.learner.sft import DataError, run_sft

    if resume and fresh:
        raise _fail("sft", "--resume and --fresh: choose one (continue the run, or start it again at step 0)")
    try:
        history = run_sft(cfg, resume=resume, fresh=fresh)
    except (DataError, CheckpointError) as e:  # a missing or corrupt checkpoint is named, not a traceback
        raise _fail("sft", str(e)) from None
    if history:
        console.print(
            f"sft done: {len(history)} steps, last loss {history[-1]['loss']:.4f}, checkpoints in {cfg.output_dir}"
        )


@app.command("serve", context_settings=_EXTRA)
def serve_cmd(
    ctx: typer.Context,
    service: str = typer.Argument(..., help="rollout | reward"),
    config: Path | None = typer.Option(None, "--config", help="YAML settings file"),
    worker: bool = typer.Option(False, "--worker", help="also consume the Redis stream of this service"),
    dry_run: bool = typer.Option(False, "--dry-run", help="print the resolved settings and exit"),
) -> None:
    """Run a service over HTTP (and as a queue worker with --worker). Extra arguments are key=value settings.

    Example: gtpo serve rollout model=runs/tiny port=8001 --worker
    """
    from shared.config.loader import ConfigError, load_config

    overrides = list(ctx.args) + (["worker=true"] if worker else [])
    if service == "rollout":
        from services.rollout.settings import RolloutSettings as cls
    elif service == "reward":
        from services.reward.settings import RewardSettings as cls
    else:
        raise _fail("serve", f"service: unknown {service!r}; allowed: rollout, reward")
    try:
        settings = load_config(cls, config, overrides)
    except ConfigError as e:
        raise _fail(f"serve {service}", str(e)) from None
    if dry_run:
        typer.echo(settings.model_dump_json(indent=2))
        return
    import logging

    from shared.http import serve

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if service == "rollout":
        from services.rollout.app import create_app
    else:
        from services.reward.app import create_app
    serve(create_app(settings), settings.host, settings.port)


@app.command("train", context_settings=_EXTRA)
def train_cmd(
    ctx: typer.Context,
    config: Path | None = typer.Option(None, "--config", help="YAML experiment file (RLConfig)"),
    resume: bool = typer.Option(False, "--resume", help="continue from the latest checkpoint in output_dir"),
    fresh: bool = typer.Option(
        False, "--fresh", help="start again at step 0 where a run wrote before (its files are moved aside)"
    ),
    dry_run: bool = typer.Option(False, "--dry-run", help="print the resolved config and exit"),
) -> None:
    """GTPO RL rounds through the rollout and reward services over Redis. Extra arguments: key=value overrides.

    Example: gtpo train --config run.yaml steps=20 rollout.group_size=8
    """
    from services.trainer.config import RLConfig, SFTConfig

    cfg = _experiment("train", RLConfig, config, list(ctx.args), dry_run, siblings=(SFTConfig,))
    import logging

    from services.trainer.orchestrator.driver import run_rl

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from services.trainer.orchestrator.lease import LeaseHeld, LeaseLost
    from shared.queues.queue import RedisUnavailable

    try:
        history = run_rl(cfg, resume=resume, fresh=fresh)
    except (ValueError, LeaseHeld) as e:
        raise _fail("train", str(e)) from None
    except LeaseLost as e:  # replaced by another trainer: not a config error, and nothing was written
        typer.echo(f"gtpo train: {e}", err=True)
        raise typer.Exit(code=3) from None
    except RedisUnavailable as e:  # past redis.reconnect_s: the last checkpoint stands, --resume continues
        typer.echo(f"gtpo train: {e}", err=True)
        raise typer.Exit(code=1) from None
    console.print(f"train done: {len(history)} steps this run; checkpoints in {cfg.output_dir / 'checkpoints'}")


@app.command("up", context_settings=_EXTRA)
def up_cmd(
    ctx: typer.Context,
    config: Path | None = typer.Option(None, "--config", help="YAML experiment file (RLConfig)"),
    rollout_workers: int = typer.Option(1, "--rollout-workers", min=1),
    reward_workers: int = typer.Option(1, "--reward-workers", min=1),
    resume: bool = typer.Option(False, "--resume"),
    fresh: bool = typer.Option(
        False, "--fresh", help="start again at step 0 where a run wrote before (its files are moved aside)"
    ),
    dry_run: bool = typer.Option(False, "--dry-run", help="print the resolved config and exit"),
) -> None:
    """All in one machine: embedded Redis (unless REDIS_URL is set), rollout and reward workers, the trainer, each
    its own process with its log under output_dir/logs.

    Example: gtpo up --config run.yaml steps=2
    """
    from services.trainer.config import RLConfig, SFTConfig

    cfg = _experiment("up", RLConfig, config, list(ctx.args), dry_run, siblings=(SFTConfig,))
    from services.stack import run_stack
    from shared.contracts.agreement import AgreementError

    if resume and fresh:
        raise _fail("up", "--resume and --fresh: choose one (continue the run, or start it again at step 0)")
    try:
        code = run_stack(cfg, rollout_workers=rollout_workers, reward_workers=reward_workers, resume=resume,
                         fresh=fresh)  # fmt: skip
    except AgreementError as e:  # every process is stopped by then
        raise _fail("up", str(e)) from None
    raise typer.Exit(code)


@app.command("status")
def status_cmd(
    redis_url: str | None = typer.Option(None, "--redis-url", envvar="REDIS_URL", help="default: $REDIS_URL"),
    namespace: str | None = typer.Option(None, "--namespace", help="the run's redis.namespace (default: gtpo)"),
    watch: bool = typer.Option(False, "--watch", "-w", help="keep the view live, redrawn every --interval seconds"),
    interval: float = typer.Option(1.0, "--interval", min=0.1, help="seconds between redraws with --watch"),
    timeout: float = typer.Option(
        TIMEOUT_S, "--timeout", min=0.1, help="seconds to wait for Redis to connect or reply (then exit 1)"
    ),
    dry_run: bool = typer.Option(False, "--dry-run", help="print the resolved settings and exit"),
) -> None:
    """Queue depths, each live worker (kind, busy / idle, weights version, last heartbeat), the trainer's step,
    policy version and last step's timings, and the weight versions; --watch keeps it live (Ctrl-C ends it)."""
    from shared.config.settings import RedisConfig, redact_url

    if not redis_url:
        raise _fail("status", "--redis-url: not set and REDIS_URL is empty (gtpo up prints the URL it uses)")
    if dry_run:
        raise _dry_run({"redis_url": redact_url(redis_url), "namespace": namespace or RedisConfig().namespace,
                        "watch": watch, "interval": interval, "timeout": timeout})  # fmt: skip
    from services.status_view import StatusError, show

    try:
        show(redis_url, namespace or RedisConfig().namespace, console, watch=watch, interval_s=interval,
             timeout_s=timeout)  # fmt: skip
    except StatusError as e:  # Redis down or not Redis: not a config error (exit 1, not 2)
        typer.echo(f"gtpo status: {e}", err=True)
        raise typer.Exit(code=1) from None


@app.command("eval")
def eval_cmd(
    dataset: str | None = typer.Argument(
        None, help="a JSON/JSONL file, a datasets save_to_disk folder, hf:org/name[:config][:split], or a preset"
    ),
    model: Path | None = typer.Option(
        None, "--model", help="checkpoint directory (also the tokenizer for --rollout-url)"
    ),
    protocol: str | None = typer.Option(
        None, "--protocol", help="dirl | sdar-greedy | trado | lightningrl: every setting as that paper evaluated"
    ),
    k: int | None = typer.Option(None, "--k", min=1, help="samples per question [4, or the protocol's]"),
    max_new_tokens: int | None = typer.Option(None, "--max-new-tokens", min=1, help="[512, or the protocol's]"),
    temperature: float | None = typer.Option(None, "--temperature", help="sampling temperature (0 = greedy) [1.0]"),
    top_k: int | None = typer.Option(None, "--top-k", help="keep the k most likely tokens (0 = off) [0]"),
    top_p: float | None = typer.Option(None, "--top-p", help="nucleus mass (1 = off) [1.0]"),
    threshold: float | None = typer.Option(
        None, "--threshold", help="low_confidence_dynamic: unmask when p >= this [0.9]"
    ),
    block_size: int | None = typer.Option(None, "--block-size", help="tokens per block [the model's]"),
    denoising_steps: int | None = typer.Option(None, "--denoising-steps", help="static: steps per block"),
    strategy: str | None = typer.Option(
        None, "--strategy", help="low_confidence_dynamic | low_confidence_static | sequential"
    ),
    template: str = typer.Option(PROMPT_TEMPLATE, "--template", help="user message; {question} is replaced"),
    chat: bool = typer.Option(True, "--chat/--raw"),
    rollout_url: str | None = typer.Option(None, "--rollout-url", help="generate through a running rollout service"),
    engines: str = typer.Option(
        "torch", "--engines", help="in-process engines, comma-separated: torch, reference (the naive decoder), lmdeploy"
    ),
    limit: int | None = typer.Option(None, "--limit", min=1, help="first N questions only"),
    out: Path | None = typer.Option(
        None, "--out", help="the eval card (JSON); several cards get .ENGINE.DECODING before the suffix [evals/...]"
    ),
    seed: int = typer.Option(0, "--seed"),
    question_field: str = typer.Option(QUESTION_FIELD, "--question-field", help="the column of the question"),
    answer_field: str = typer.Option(ANSWER_FIELD, "--answer-field", help="the column of the answer"),
    answer_extract: str = typer.Option(
        "none", "--answer-extract", help="none | boxed (a solution's last \\boxed{}) | gsm8k (after its last ####)"
    ),
    max_row_bytes: int = typer.Option(
        MAX_ROW_BYTES, "--max-row-bytes", min=1, help="refuse a longer row (a JSONL line, a column's text)"
    ),
    max_prompt_tokens: int = typer.Option(
        MAX_PROMPT_TOKENS, "--max-prompt-tokens", min=1, help="refuse a longer prompt (template included)"
    ),
    compare: tuple[Path, Path] | None = typer.Option(
        None, "--compare", help="two eval cards A B: B - A per metric with its paired 95% interval"
    ),
    force: bool = typer.Option(False, "--force", help="--compare cards whose settings differ (loudly warned)"),
    aup_thresholds: str | None = typer.Option(
        None, "--aup-thresholds", help="e.g. 0.9,0.7,0.5: decode once per dynamic threshold and report AUP over them"
    ),
    dry_run: bool = typer.Option(False, "--dry-run", help="print the resolved settings and exit"),
) -> None:
    """Evaluate a checkpoint: avg@k and pass@k with 95% bootstrap intervals, boxed rate, length, tokens per step and
    per forward, AUP, tokens/s, truncation; writes an eval card (every setting, hashes, per-question results).

    Protocols (docs/evaluation.md): gtpo eval MATH500 --model DIR --protocol dirl; explicit flags override one setting.
    Presets (hub, needs network and `datasets`): MATH500, GSM8K, AIME2024, AIME2025, OlympiadBench.
    Example: gtpo eval runs/demo/data/test.json --model runs/demo/rl/checkpoints/step-00000040/model --k 8 --raw
    Compare: gtpo eval --compare before.json after.json (refuses cards that differ in more than the model).
    Parity: gtpo eval data.json --model DIR --engines torch,reference --temperature 0
    """
    if compare is not None:
        return _compare_cards(*compare, force=force)
    if dataset is None:
        raise _fail("eval", "DATASET: missing (or give --compare A.json B.json)")
    from pydantic import ValidationError

    from services.eval.evaluate import evaluate_cards, load_rows
    from shared.config.loader import describe_error

    try:
        template.format(question="")
    except (KeyError, IndexError, ValueError) as e:
        hint = "only {question} is replaced; write literal braces as {{ }}"
        raise _fail(
            "eval", f"--template: not a format string with {{question}} ({type(e).__name__}: {e}); {hint}"
        ) from None
    given = {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_k": top_k, "top_p": top_p,
             "confidence_threshold": threshold, "block_size": block_size, "denoising_steps": denoising_steps,
             "strategy": strategy}  # fmt: skip
    try:
        proto = _resolve_protocol(protocol, k, given, aup_thresholds)
    except ValidationError as e:
        raise _fail("eval", describe_error(e, SamplingParams)) from None
    except ValueError as e:
        raise _fail("eval", str(e)) from None
    if answer_extract not in ("none", "boxed", "gsm8k"):
        raise _fail("eval", f"--answer-extract: one of none, boxed, gsm8k, got {answer_extract!r}")
    engine_list = tuple(e.strip() for e in engines.split(",") if e.strip())
    if dry_run:
        raise _dry_run({"dataset": dataset, "model": model, "protocol": proto.name, "k": proto.k,
                        "params": proto.decodings[0].params,
                        "decodings": {d.name: d.params.model_dump(mode="json") for d in proto.decodings}, "template": template,
                        "chat": chat, "rollout_url": rollout_url, "engines": list(engine_list), "limit": limit,
                        "out": out, "seed": seed, "question_field": question_field, "answer_field": answer_field,
                        "answer_extract": answer_extract, "max_row_bytes": max_row_bytes,
                        "max_prompt_tokens": max_prompt_tokens})  # fmt: skip
    extra = {"limit": limit, "question_field": question_field, "answer_field": answer_field,
             "answer_extract": answer_extract}  # fmt: skip
    try:
        rows = load_rows(dataset, question_field=question_field, answer_field=answer_field,
                         answer_extract=answer_extract, max_row_bytes=max_row_bytes)[:limit]  # fmt: skip
        runs = evaluate_cards(model, rows, proto, template=template, chat=chat, rollout_url=rollout_url, seed=seed,
                              engines=engine_list, dataset=dataset, extra_settings=extra,
                              max_prompt_tokens=max_prompt_tokens, question_field=question_field)  # fmt: skip
    except (OSError, ValueError, ImportError) as e:  # ImportError: --engines lmdeploy without the extra
        raise _fail("eval", str(e)) from None
    parities = _print_eval(dataset, proto, runs)
    if aup_thresholds is not None:
        _print_aup(runs)
    paths = _card_paths(out, proto.name, runs)
    for path, run in zip(paths, runs, strict=True):
        run.card.write(path)
        console.print(f"eval card: {path}")
    if parities:
        path = paths[0].with_name(f"{(out or paths[0]).stem}.parity.json")
        path.write_text(json.dumps(parities, indent=1))
        console.print(f"engine parity: {path}")


def _resolve_protocol(protocol: str | None, k: int | None, given: dict, aup_thresholds: str | None):
    """The named protocol with the explicit flags over it (or the flags alone), swept over --aup-thresholds.

    Raises:
        ValueError, pydantic.ValidationError: naming the flag or setting.
    """
    from services.eval.protocols import apply_overrides, custom, get_protocol, sweep

    if protocol is None:
        proto = custom(k or 4, SamplingParams(**{"max_new_tokens": 512, **{a: v for a, v in given.items() if v is not None}}))
    else:
        proto = apply_overrides(get_protocol(protocol), k, given)
    if aup_thresholds is None:
        return proto
    try:
        points = [float(t) for t in aup_thresholds.split(",") if t.strip()]
    except ValueError:
        raise ValueError(f"--aup-thresholds: comma-separated numbers, got {aup_thresholds!r}") from None
    return sweep(proto, points)


def _card_paths(out: Path | None, protocol: str, runs: list) -> list[Path]:
    import datetime

    if out is None:
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        out = Path("evals") / f"{stamp}-{protocol}.json"
    if len(runs) == 1:
        return [out]
    return [out.with_name(f"{out.stem}.{r.engine}.{r.card.decoding}{out.suffix or '.json'}") for r in runs]


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)


def _print_eval(dataset: str, proto, runs: list) -> dict:
    """One column per (engine, decoding); accuracies with their 95% interval; engine parity when two engines ran
    (returned per decoding)."""
    from services.eval.card import ACCURACIES, parity

    table = Table(title=f"gtpo eval {dataset} (protocol {proto.name}, k={proto.k})")
    table.add_column("metric")
    for r in runs:
        table.add_column(f"{r.engine}/{r.card.decoding}", justify="right")
    for m in runs[0].card.metrics:
        cells = []
        for r in runs:
            v = r.card.metrics[m]
            ci = r.card.intervals.get(m) if m in ACCURACIES else None
            cells.append(_fmt(v) + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""))
        table.add_row(m, *cells)
    table.add_row("reward_errors", *[str(r.result.reward_errors) for r in runs])
    console.print(table)
    engines = list(dict.fromkeys(r.engine for r in runs))
    parities: dict = {}
    if len(engines) == 2:
        for dec in dict.fromkeys(r.card.decoding for r in runs):
            a, b = (next(r.card for r in runs if r.engine == e and r.card.decoding == dec) for e in engines)
            p = parity(a, b)
            parities[dec] = {"engines": engines, **p.model_dump()}
            console.print(
                f"parity {engines[0]} vs {engines[1]} ({dec}): {p.identical_samples}/{p.samples} samples identical, "
                f"{p.identical_questions}/{p.questions} questions identical, correctness agrees on "
                f"{p.correctness_agrees}/{p.questions}; per question: {', '.join(f'{v:.2f}' for v in p.per_question)}"
            )
    return parities


def _print_aup(runs: list) -> None:
    """AUP over the threshold sweep, per engine: the (tokens per forward, avg@k %) point of each decoding."""
    from services.eval.metrics import aup

    for engine in dict.fromkeys(r.engine for r in runs):
        points = [(r.card.metrics["tokens_per_forward"], 100 * r.card.metrics["avg_at_k"]) for r in runs
                  if r.engine == engine and r.card.metrics["tokens_per_forward"]]  # fmt: skip
        shown = ", ".join(f"({tpf:.2f}, {acc:.1f})" for tpf, acc in sorted(points))
        console.print(f"AUP over the sweep ({engine}): {aup(points):.1f}  points (TPF, accuracy %): {shown}")


def _compare_cards(a_path: Path, b_path: Path, force: bool) -> None:
    """`gtpo eval --compare A B`: B - A per metric with its paired interval; refuses cards with different settings."""
    from services.eval.card import EvalCard, compare_cards, setting_differences

    try:
        a, b = EvalCard.read(a_path), EvalCard.read(b_path)
    except ValueError as e:
        raise _fail("eval", f"--compare: {e}") from None
    diffs = setting_differences(a, b)
    if diffs and not force:
        raise _fail("eval", "--compare: the cards differ in more than the model, so their difference is not the "
                    f"model's: {'; '.join(diffs)}. Pass --force to compare anyway.")  # fmt: skip
    if diffs:
        typer.echo("WARNING " * 3 + f"\ngtpo eval --compare --force: the cards differ in {'; '.join(diffs)}; the "
                   "differences below mix the model's effect with these settings'.", err=True)  # fmt: skip
    try:
        rows = compare_cards(a, b)
    except ValueError as e:
        raise _fail("eval", f"--compare: {e}") from None
    table = Table(title=f"B - A: A = {a_path} ({a.model.get('path')}), B = {b_path} ({b.model.get('path')})")
    for col in ("metric", "A", "B", "B - A", "95% paired interval"):
        table.add_column(col, justify="left" if col == "metric" else "right")
    for r in rows:
        ci = "-" if r.low is None else f"[{r.low:+.4f}, {r.high:+.4f}]"
        table.add_row(r.metric, _fmt(r.a), _fmt(r.b), "-" if r.difference is None else f"{r.difference:+.4f}", ci)
    console.print(table)


@app.command("demo", context_settings=_EXTRA)
def demo_cmd(
    ctx: typer.Context,
    speed: bool = typer.Option(
        False, "--speed", help="also run the speed arms of --speed-method from the same SFT model, against GTPO"
    ),
    speed_method: str = typer.Option(
        None,
        "--speed-method",
        help=f"speed arms, comma-separated: {'|'.join(SPEED_METHODS)} (default: {DEFAULT_SPEED_METHOD})",
    ),
    reuse: bool = typer.Option(
        False, "--reuse", help="skip the stages --out already finished with the same settings (SFT, evaluated arms)"
    ),
    overlap: bool = typer.Option(
        False,
        "--overlap",
        help="also run GTPO with max_staleness=1 (rollout overlapping training) from the same SFT model, both GTPO "
        "arms on one thread per process, and report their RL wall times",
    ),
    seed: int = typer.Option(0, "--seed"),
    out: Path = typer.Option(Path("runs/demo"), "--out"),
    dry_run: bool = typer.Option(False, "--dry-run", help="print the resolved config and exit"),
) -> None:
    """The main job on the embedded default: tiny model, SFT, eval, GTPO through the services, eval, plots.

    Extra arguments are key=value overrides of DemoConfig (e.g. rl_steps=20). Example: gtpo demo --seed 1
    """
    from services.demo.pipeline import DemoConfig, ReuseError, run_demo
    from services.demo.tasks import TaskError

    overrides = [*ctx.args, f"seed={seed}", f"out={out}", f"speed={str(speed).lower()}",
                 f"overlap={str(overlap).lower()}", f"reuse={str(reuse).lower()}"]  # fmt: skip
    if speed_method is not None:
        overrides.append(f"speed_method={speed_method}")
    cfg = _experiment("demo", DemoConfig, None, overrides, dry_run=dry_run, environ={})
    try:
        run_demo(cfg)
    except (TaskError, ReuseError) as e:
        raise _fail("demo", str(e)) from None


@app.command("merge-lora")
def merge_lora_cmd(
    checkpoint: Path = typer.Argument(..., help="a trainer checkpoint (with adapter/) or a LoRA adapter folder"),
    out: Path = typer.Option(..., "--out", help="folder for the merged SDAR-layout checkpoint"),
    base: Path | None = typer.Option(None, "--base", help="the base model; default: the adapter's own record"),
    dry_run: bool = typer.Option(False, "--dry-run", help="print the resolved settings and exit"),
) -> None:
    """Merge a LoRA adapter into its base and write an SDAR checkpoint that transformers and LMDeploy load."""
    if dry_run:
        raise _dry_run({"checkpoint": checkpoint, "out": out, "base": base})
    from services.trainer.learner.lora import AdapterError, merge_lora

    try:
        path = merge_lora(checkpoint, out, base)
    except (AdapterError, FileNotFoundError) as e:
        raise _fail("merge-lora", str(e)) from None
    console.print(f"merged checkpoint written to {path}")


def _run_memory_settings(config: Path | None, accelerate_config: Path | None, settings_from_run):
    """The planner's settings of the run `config` launches (with its accelerate config), and its model."""
    if config is None:
        if accelerate_config is not None:
            raise _fail("plan-memory", "--accelerate-config: needs --config (the run it launches)")
        return {}, None
    from services.trainer.config import RLConfig
    from shared.config.loader import ConfigError, load_config, read_yaml

    try:
        run = load_config(RLConfig, config, [], environ={})
        acc = read_yaml(accelerate_config) if accelerate_config is not None else None
    except (ConfigError, FileNotFoundError, ValueError) as e:
        raise _fail("plan-memory", str(e)) from None
    return settings_from_run(run, acc), run.model


@app.command("plan-memory", context_settings=_EXTRA)
def plan_memory_cmd(
    ctx: typer.Context,
    model: Path | None = typer.Argument(
        None, help="an SDAR / Qwen3 checkpoint folder or its config.json (only the sizes); default: --config's model"
    ),
    config: Path | None = typer.Option(None, "--config", help="plan this RL run config (RLConfig YAML)"),
    accelerate_config: Path | None = typer.Option(
        None, "--accelerate-config", help="with --config: its accelerate config (GPUs, ZeRO stage / FSDP)"
    ),
    gpu_gib: float = typer.Option(80.0, "--gpu-gib", min=1, help="memory of one GPU, GiB: which settings fit it"),
    show: int = typer.Option(10, "--show", min=0, help="how many fitting settings to list"),
    as_json: bool = typer.Option(False, "--json", help="print the plan and the fitting settings as JSON"),
    dry_run: bool = typer.Option(False, "--dry-run", help="print the resolved settings and exit"),
) -> None:
    """Estimated peak memory per GPU of one GTPO step (weights, gradients, optimizer, activations) and the
    settings that fit --gpu-gib. key=value arguments set MemorySettings, e.g. gtpo plan-memory
    docs/models/sdar-8b-chat prompt_len=1024 gen_len=8192 gpus=8 zero=3 checkpointing=true; or plan the run a
    config launches: gtpo plan-memory docs/models/sdar-8b-chat --config recipes/dirl-dipo/rl.yaml
    --accelerate-config recipes/dirl-dipo/accelerate.yaml prompt_len=1024"""
    from services.trainer.learner.memory_plan import (
        GIB,
        MemorySettings,
        ModelShape,
        fitting,
        plan,
        planner_name,
        read_model_config,
        settings_from_run,
    )

    args = list(ctx.args)
    for a in args:
        key = a.split("=", 1)[0]
        if planner_name(key):
            raise _fail("plan-memory", f"{key}: that is the run config's name; the planner's is "
                        f"{planner_name(key)}= (or plan the run config itself: --config run.yaml)")  # fmt: skip
    from_run, run_model = _run_memory_settings(config, accelerate_config, settings_from_run)
    model = model or run_model
    if model is None:
        raise _fail("plan-memory", "model: name a checkpoint folder (or its config.json), or a --config run")
    try:
        raw = read_model_config(model)
        shape = ModelShape.from_config(raw)
    except (FileNotFoundError, ValueError) as e:
        raise _fail("plan-memory", str(e)) from None
    # the run's settings first, key=value after them (last wins)
    args = [f"{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in from_run.items() if v is not None] + args
    if "block_size" in raw and not any(a.startswith("block_size=") for a in args):
        args.append(f"block_size={raw['block_size']}")  # the checkpoint's own block size unless told otherwise
    s = _experiment("plan-memory", MemorySettings, None, args, dry_run=dry_run, environ={})
    try:
        asked = plan(shape, s)
    except ValueError as e:
        raise _fail("plan-memory", str(e)) from None
    budget = int(gpu_gib * GIB)
    fits = fitting(shape, s, budget)
    if as_json:
        typer.echo(json.dumps({"model": shape.model_dump(), "settings": s.model_dump(), "plan": asked.model_dump(),
                               "gpu_gib": gpu_gib, "fits": [{"settings": c.model_dump(), "plan": p.model_dump()}
                                                            for c, p in fits]}, indent=2))  # fmt: skip
        return
    lora = f"LoRA r={s.lora_r}" if s.lora_r else "full"
    console.print(f"{model}: P={s.prompt_len} L={s.gen_len} R={s.r} c={s.c} x{s.micro_batch_size}, {s.gpus} "
                        f"GPU(s), ZeRO {s.zero}, {lora}, checkpointing {'on' if s.checkpointing else 'off'}, "
                        f"{s.precision}, {s.attention}")  # fmt: skip
    table = Table()
    table.add_column("part")
    table.add_column("GiB per GPU", justify="right")
    for part, gib in asked.rows():
        table.add_row(part, f"{gib:.2f}")
    console.print(table)
    verdict = "fits" if asked.peak <= budget else "does NOT fit"
    console.print(f"{asked.forward_tokens} tokens per forward, {asked.forwards_per_update} forwards per update; "
                  f"peak {asked.peak / GIB:.1f} GiB {verdict} in {gpu_gib:g} GiB")  # fmt: skip
    if not fits:
        console.print(f"[red]no setting tried fits {gpu_gib:g} GiB (ZeRO 0-3, LoRA, checkpointing, c = 1..R)[/red]")
        return
    console.print(f"settings that fit {gpu_gib:g} GiB, least recompute first, full before LoRA ({len(fits)} of them):")
    ft = Table()
    for col in ("ZeRO", "LoRA", "checkpointing", "c", "forwards/update", "peak GiB"):
        ft.add_column(col, justify="right")
    for c, p in fits[:show]:
        ft.add_row(str(c.zero), f"r={c.lora_r}" if c.lora_r else "full", "on" if c.checkpointing else "off",
                   str(c.c), str(p.forwards_per_update), f"{p.peak / GIB:.1f}")  # fmt: skip
    console.print(ft)


def _register_launch() -> None:
    from services.trainer.launch import launch_command

    app.command("launch")(launch_command)


_register_launch()
