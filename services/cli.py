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
from shared.model.step_map import denoising_steps, tokens_per_step
from shared.prompts import encode_prompt

app = typer.Typer(
    name="gtpo",
    help="Post-training (SFT + GTPO RL) for SDAR block-diffusion language models.",
    no_args_is_help=True,
    add_completion=False,
)
console = Console()

_EXTRA = {"allow_extra_args": True, "ignore_unknown_options": True}  # commands taking key=value overrides


@app.callback()
def main() -> None:
    """Post-training (SFT + GTPO RL) for SDAR block-diffusion language models."""
    # an explicit callback keeps `init-model` a subcommand while it is the only one


def _fail(command: str, message: str) -> typer.Exit:
    """A config or input error: the message on stderr (one line per bad field, no traceback) and exit status 2."""
    typer.echo(f"gtpo {command}: {message}", err=True)
    return typer.Exit(code=2)


def _flag(key: str, value) -> str:
    """A Typer flag as a `key=value` argument of the loader (typed again there by the field it sets)."""
    if isinstance(value, (bool, int, float, list, dict)):
        return f"{key}={json.dumps(value)}"
    return f"{key}={value}"


def _show(cfg) -> typer.Exit:
    """--dry-run: the resolved settings as YAML (secrets redacted), and exit 0."""
    from shared.config.loader import dump_config

    typer.echo(dump_config(cfg))
    return typer.Exit(0)


def _command_settings(command: str, model, flags: dict, dry_run: bool = False):
    """A command's settings through the one loader: its defaults < `GTPO_<COMMAND>__*` < the flags given (None:
    not given); with --dry-run print them and exit."""
    return _experiment(command, model, None, [_flag(k, v) for k, v in flags.items() if v is not None], dry_run)


@app.command("init-model")
def init_model(
    preset: str | None = typer.Argument(None, help="model preset: tiny | tiny-sdar"),
    out: Path | None = typer.Option(None, "--out", help="checkpoint directory to write (SDAR layout)"),
    seed: int | None = typer.Option(None, "--seed", help="torch seed for the random initial weights [0]"),
    force: bool | None = typer.Option(None, "--force", help="overwrite a directory that already holds a checkpoint"),
    dry_run: bool = typer.Option(False, "--dry-run", help="print the resolved settings and exit"),
) -> None:
    """Write a randomly initialised checkpoint of PRESET to --out (config, safetensors weights, tokenizer)."""
    from services.command_settings import InitModelSettings

    given = {"preset": preset, "out": out, "seed": seed, "force": force}
    cfg = _command_settings("init-model", InitModelSettings, given)
    if (cfg.out / "config.json").exists() and not cfg.force:
        console.print(f"[red]{cfg.out} already holds a checkpoint; pass --force to overwrite it[/red]")
        raise typer.Exit(code=1)
    if dry_run:
        raise _show(cfg)
    preset, out = cfg.preset, cfg.out
    from shared.model.sdar import count_parameters, load_model
    from shared.model.tiny import init_tiny, init_tiny_sdar

    # tiny: the demo's CPU model; tiny-sdar: head size LMDeploy's GPU kernels accept (GPU checks)
    path = (init_tiny if preset == "tiny" else init_tiny_sdar)(out, seed=cfg.seed)
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
    model: Path | None = typer.Option(None, "--model", help="SDAR-layout checkpoint directory"),
    prompt: list[str] | None = typer.Option(None, "--prompt", help="prompt text (repeat for a batch)"),
    n: int | None = typer.Option(None, "--n", help="samples per prompt [1]"),
    max_new_tokens: int | None = typer.Option(None, "--max-new-tokens", help="[32]"),
    strategy: str | None = typer.Option(
        None, "--strategy", help="low_confidence_dynamic|low_confidence_static|sequential"
    ),
    threshold: float | None = typer.Option(None, "--threshold", help="dynamic strategy confidence threshold"),
    temperature: float | None = typer.Option(None, "--temperature"),
    top_k: int | None = typer.Option(None, "--top-k"),
    top_p: float | None = typer.Option(None, "--top-p"),
    seed: int | None = typer.Option(None, "--seed", help="same seed, same output"),
    chat: bool | None = typer.Option(None, "--chat/--raw", help="wrap the prompt in the tokenizer's chat template"),
    device: str | None = typer.Option(None, "--device", help="auto|cpu|cuda"),
    as_json: bool | None = typer.Option(None, "--json", help="print one rollout JSON per line instead of tables"),
    dry_run: bool = typer.Option(False, "--dry-run", help="print the resolved settings and exit"),
) -> None:
    """Decode prompts with the torch reference engine and show each token's denoising step.

    Example: gtpo generate --model runs/tiny --prompt "What is 12+7?" --n 2 --seed 0
    """
    from services.command_settings import GenerateSettings

    sampling = {"n": n, "max_new_tokens": max_new_tokens, "strategy": strategy, "confidence_threshold": threshold,
                "temperature": temperature, "top_k": top_k, "top_p": top_p, "seed": seed}  # fmt: skip
    given = {"model": model, "prompt": prompt, "chat": chat, "device": device, "json_lines": as_json,
             **{f"params.{k}": v for k, v in sampling.items()}}  # fmt: skip
    cfg = _command_settings("generate", GenerateSettings, given)
    if not (cfg.model / "config.json").exists():
        raise _fail("generate", f"model: {cfg.model} holds no config.json (make one with `gtpo init-model tiny`)")
    if dry_run:
        raise _show(cfg)
    params, prompt, chat = cfg.params, cfg.prompt, cfg.chat

    from services.rollout.engines.torch_engine import TorchEngine
    from shared.contracts.wire import GenerationRequest

    engine = TorchEngine.from_pretrained(cfg.model, device=cfg.device)
    tok = engine.tokenizer
    reqs = [GenerationRequest(prompt_ids=encode_prompt(tok, p, chat=chat), params=params) for p in prompt]
    for text, rollouts in zip(prompt, engine.generate(reqs), strict=True):
        for r in rollouts:
            if cfg.json_lines:
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


def _experiment(command: str, model, config: Path | None, args: list[str], dry_run: bool, *, environ=None):
    """Load a command's settings (defaults < YAML < its GTPO_<COMMAND>__* variables < key=value); with --dry-run
    print them and exit."""
    from shared.config.loader import ConfigError, dump_config, load_config

    try:
        cfg = load_config(model, config, args, environ=environ)
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
    from services.trainer.config import SFTConfig

    cfg = _experiment("sft", SFTConfig, config, list(ctx.args), dry_run)
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
        raise _show(settings)
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
    from services.trainer.config import RLConfig

    cfg = _experiment("train", RLConfig, config, list(ctx.args), dry_run)
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
    from services.trainer.config import RLConfig

    cfg = _experiment("up", RLConfig, config, list(ctx.args), dry_run)
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
    watch: bool | None = typer.Option(None, "--watch", "-w", help="keep the view live, redrawn every --interval s"),
    interval: float | None = typer.Option(None, "--interval", min=0.1, help="seconds between redraws with --watch"),
    timeout: float | None = typer.Option(
        None, "--timeout", min=0.1, help=f"seconds to wait for Redis to connect or reply (then exit 1) [{TIMEOUT_S}]"
    ),
    dry_run: bool = typer.Option(False, "--dry-run", help="print the resolved settings and exit"),
) -> None:
    """Queue depths, each live worker (kind, busy / idle, weights version, last heartbeat), the trainer's step,
    policy version and last step's timings, and the weight versions; --watch keeps it live (Ctrl-C ends it)."""
    from services.command_settings import StatusSettings

    given = {"redis_url": redis_url, "namespace": namespace, "watch": watch, "interval": interval, "timeout": timeout}
    cfg = _command_settings("status", StatusSettings, given)
    if cfg.redis_url is None:
        raise _fail("status", "redis_url: not set and REDIS_URL is empty (gtpo up prints the URL it uses)")
    if dry_run:
        raise _show(cfg)
    from services.status_view import StatusError, show

    try:
        show(cfg.redis_url.get_secret_value(), cfg.namespace, console, watch=cfg.watch, interval_s=cfg.interval,
             timeout_s=cfg.timeout)  # fmt: skip
    except StatusError as e:  # Redis down or not Redis: not a config error (exit 1, not 2)
        typer.echo(f"gtpo status: {e}", err=True)
        raise typer.Exit(code=1) from None


EVAL_HELP = """Evaluate a checkpoint: avg@k and pass@k with 95% bootstrap intervals, boxed rate, length, tokens per step and
    per forward, AUP, tokens/s, truncation; writes an eval card (every setting, hashes, per-question results).

    Protocols (docs/evaluation.md): gtpo eval MATH500 --model DIR --protocol dirl; explicit flags override one setting.
    Presets (hub, needs network and `datasets`): MATH500, GSM8K, AIME2024, AIME2025, OlympiadBench; code (scored in the
    sandbox, docs/code_rl.md): HumanEval, MBPP, LiveCodeBench.
    Example: gtpo eval runs/demo/data/test.json --model runs/demo/rl/checkpoints/step-00000040/model --k 8 --raw
    Compare: gtpo eval --compare before.json after.json (refuses cards that differ in more than the model).
    Parity: gtpo eval data.json --model DIR --engines torch,reference --temperature 0"""


@app.command("eval", help=EVAL_HELP)
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
    template: str | None = typer.Option(None, "--template", help="user message; {question} is replaced"),
    chat: bool | None = typer.Option(None, "--chat/--raw"),
    rollout_url: str | None = typer.Option(None, "--rollout-url", help="generate through a running rollout service"),
    engines: str | None = typer.Option(
        None, "--engines", help="in-process engines, comma-separated: torch, reference (the naive decoder), lmdeploy"
    ),
    limit: int | None = typer.Option(None, "--limit", min=1, help="first N questions only"),
    out: Path | None = typer.Option(
        None, "--out", help="the eval card (JSON); several cards get .ENGINE.DECODING before the suffix [evals/...]"
    ),
    seed: int | None = typer.Option(None, "--seed"),
    question_field: str | None = typer.Option(None, "--question-field", help="the column of the question"),
    answer_field: str | None = typer.Option(None, "--answer-field", help="the column of the answer"),
    answer_extract: str | None = typer.Option(
        None, "--answer-extract", help="none | boxed (a solution's last \\boxed{}) | gsm8k (after its last ####)"
    ),
    max_row_bytes: int | None = typer.Option(
        None, "--max-row-bytes", min=1, help="refuse a longer row (a JSONL line, a column's text)"
    ),
    max_prompt_tokens: int | None = typer.Option(
        None, "--max-prompt-tokens", min=1, help="refuse a longer prompt (template included)"
    ),
    code_format: str | None = typer.Option(
        None, "--code-format", help="a code dataset: humaneval | mbpp | livecodebench | trace | primeintellect"
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
    """`gtpo eval`; its help is `EVAL_HELP`."""
    return _eval(**locals())  # exactly the options above, by name (nothing else is bound yet)


# fmt: off
def _eval(
    dataset, model, protocol, k, max_new_tokens, temperature, top_k, top_p, threshold, block_size,
    denoising_steps, strategy, template, chat, rollout_url, engines, limit, out, seed, question_field,
    answer_field, answer_extract, max_row_bytes, max_prompt_tokens, code_format, compare, force, aup_thresholds,
    dry_run,
) -> None:
    # fmt: on
    """`gtpo eval` with its options (see `eval_cmd`)."""
    if compare is not None:
        return _compare_cards(*compare, force=force)
    cfg, proto = _eval_settings(dataset, dry_run, model=model, protocol=protocol, k=k, template=template, chat=chat,
                                rollout_url=rollout_url, limit=limit, out=out, seed=seed, question_field=question_field,
                                answer_field=answer_field, answer_extract=answer_extract, max_row_bytes=max_row_bytes,
                                max_prompt_tokens=max_prompt_tokens, code_format=code_format,
                                engines=None if engines is None else [e.strip() for e in engines.split(",") if e.strip()],
                                aup_thresholds=_numbers(aup_thresholds),
                                sampling={"max_new_tokens": max_new_tokens, "temperature": temperature, "top_k": top_k,
                                          "top_p": top_p, "confidence_threshold": threshold, "block_size": block_size,
                                          "denoising_steps": denoising_steps, "strategy": strategy})  # fmt: skip
    _run_eval(cfg, proto)


def _run_eval(cfg, proto) -> None:
    """Evaluate with the resolved settings `cfg` and protocol; write the cards (and the engine parity)."""
    from services.eval.evaluate import evaluate_cards, load_rows

    dataset, model, limit, out = cfg.dataset, cfg.model, cfg.limit, cfg.out
    question_field, answer_field, answer_extract = cfg.question_field, cfg.answer_field, cfg.answer_extract
    engine_list, template, chat, seed = tuple(cfg.engines), cfg.template, cfg.chat, cfg.seed
    rollout_url, max_row_bytes, max_prompt_tokens = cfg.rollout_url, cfg.max_row_bytes, cfg.max_prompt_tokens
    extra = {"limit": limit, "question_field": question_field, "answer_field": answer_field,
             "answer_extract": answer_extract}  # fmt: skip
    try:
        code = {} if cfg.code_format is None else {"code_format": cfg.code_format}
        rows = load_rows(dataset, question_field=question_field, answer_field=answer_field,
                         answer_extract=answer_extract, max_row_bytes=max_row_bytes, **code)[:limit]  # fmt: skip
        runs = evaluate_cards(model, rows, proto, template=template, chat=chat, rollout_url=rollout_url, seed=seed,
                              engines=engine_list, dataset=dataset, extra_settings=extra,
                              max_prompt_tokens=max_prompt_tokens, question_field=question_field)  # fmt: skip
    except (OSError, ValueError, ImportError) as e:  # ImportError: --engines lmdeploy without the extra
        raise _fail("eval", str(e)) from None
    parities = _print_eval(dataset, proto, runs)
    if cfg.aup_thresholds is not None:
        _print_aup(runs)
    paths = _card_paths(out, proto.name, runs)
    for path, run in zip(paths, runs, strict=True):
        run.card.write(path)
        console.print(f"eval card: {path}")
    if parities:
        path = paths[0].with_name(f"{(out or paths[0]).stem}.parity.json")
        path.write_text(json.dumps(parities, indent=1))
        console.print(f"engine parity: {path}")


def _numbers(text: str | None) -> list[float] | str | None:
    """`"0.9,0.7"` -> `[0.9, 0.7]`; text that is not numbers stays text, for the loader to refuse naming the field."""
    if text is None:
        return None
    try:
        return [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        return text


def _eval_settings(dataset: str | None, dry_run: bool, sampling: dict, **flags):
    """`gtpo eval`'s settings through the loader and the protocol they resolve to; --dry-run prints both."""
    from pydantic import ValidationError

    from services.command_settings import EvalSettings
    from shared.config.loader import describe_error

    given = {k: v for k, v in sampling.items() if v is not None}
    cfg = _command_settings("eval", EvalSettings, {"dataset": dataset, **flags, "sampling": given or None})
    try:
        cfg.template.format(question="")
    except (KeyError, IndexError, ValueError) as e:
        hint = "only {question} is replaced; write literal braces as {{ }}"
        raise _fail("eval", f"template: not a format string with {{question}} ({type(e).__name__}: {e}); {hint}") from None
    try:
        proto = _resolve_protocol(cfg.protocol, cfg.k, cfg.sampling, cfg.aup_thresholds)
    except ValidationError as e:
        raise _fail("eval", describe_error(e, SamplingParams)) from None
    except ValueError as e:
        raise _fail("eval", str(e)) from None
    if dry_run:
        typer.echo(_yaml({**cfg.model_dump(mode="json"), "resolved": {"protocol": proto.name, "k": proto.k,
                   "decodings": {d.name: d.params.model_dump(mode="json") for d in proto.decodings}}}))  # fmt: skip
        raise typer.Exit(0)
    return cfg, proto


def _yaml(values: dict) -> str:
    import yaml

    return yaml.safe_dump(values, sort_keys=False)


def _resolve_protocol(protocol: str | None, k: int | None, given: dict, aup_thresholds: list[float] | None):
    """The named protocol with the explicit settings over it (or the settings alone), swept over aup_thresholds.

    Raises:
        ValueError, pydantic.ValidationError: naming the setting.
    """
    from services.eval.protocols import apply_overrides, custom, get_protocol, sweep

    if protocol is None:
        proto = custom(k or 4, SamplingParams(**{"max_new_tokens": 512, **given}))
    else:
        proto = apply_overrides(get_protocol(protocol), k, given)
    return proto if aup_thresholds is None else sweep(proto, aup_thresholds)


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
    in_flight: bool = typer.Option(
        False,
        "--in-flight",
        help="with --overlap: also GTPO k=1 with in-flight weight updates (rollout.swap_at_block), against both",
    ),
    task: str = typer.Option(
        "math",
        "--task",
        help="math (word problems) | reasoning (math with the format learned before RL: every SFT answer boxed, SFT "
        "stopped early, 100 RL steps of 32 prompts) | code (one-line functions, the sandboxed code reward)",
    ),
    seed: int = typer.Option(0, "--seed"),
    out: Path = typer.Option(Path("runs/demo"), "--out"),
    dry_run: bool = typer.Option(False, "--dry-run", help="print the resolved config and exit"),
) -> None:
    """The main job on the embedded default: tiny model, SFT, eval, GTPO through the services, eval, plots.

    Extra arguments are key=value overrides of DemoConfig (e.g. rl_steps=20). Example: gtpo demo --seed 1
    """
    from services.demo.code_task import CodeTaskError
    from services.demo.pipeline import REASONING, DemoConfig, ReuseError, run_demo
    from services.demo.tasks import TaskError

    overrides = [*ctx.args, f"seed={seed}", f"out={out}", f"speed={str(speed).lower()}",
                 f"overlap={str(overlap).lower()}", f"in_flight={str(in_flight).lower()}",
                 f"reuse={str(reuse).lower()}"]  # fmt: skip
    if speed_method is not None:
        overrides.append(f"speed_method={speed_method}")
    if task == "code" and not any(a.startswith("max_new_tokens=") for a in ctx.args):
        overrides.insert(0, "max_new_tokens=32")  # a fenced one-liner is ~26 bytes, each a token of the tiny model
    if task not in ("math", "reasoning", "code"):
        raise _fail("demo", f"--task: {task!r} is not math, reasoning or code")
    if task == "reasoning":  # a preset of the maths task; the user's own key=value still wins (it comes later)
        task = "math"
        overrides[:0] = [f"{k}={v}" for k, v in REASONING.items()]
    overrides.insert(0, f"task={task}")
    cfg = _experiment("demo", DemoConfig, None, overrides, dry_run=dry_run, environ={})
    try:
        run_demo(cfg)
    except (TaskError, CodeTaskError, ReuseError) as e:
        raise _fail("demo", str(e)) from None


@app.command("merge-lora")
def merge_lora_cmd(
    checkpoint: Path | None = typer.Argument(None, help="a trainer checkpoint (with adapter/) or a LoRA adapter folder"),
    out: Path | None = typer.Option(None, "--out", help="folder for the merged SDAR-layout checkpoint"),
    base: Path | None = typer.Option(None, "--base", help="the base model; default: the adapter's own record"),
    dry_run: bool = typer.Option(False, "--dry-run", help="print the resolved settings and exit"),
) -> None:
    """Merge a LoRA adapter into its base and write an SDAR checkpoint that transformers and LMDeploy load."""
    from services.command_settings import MergeLoraSettings

    cfg = _command_settings("merge-lora", MergeLoraSettings, {"checkpoint": checkpoint, "out": out, "base": base},
                            dry_run)  # fmt: skip
    checkpoint, out, base = cfg.checkpoint, cfg.out, cfg.base
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
    _check_planner_names(args, planner_name)
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
    _print_plan(model, s, asked, fits, budget, gpu_gib, show)


def _check_planner_names(args: list[str], planner_name) -> None:
    """Refuse a key=value that names a run-config field the planner calls otherwise."""
    for a in args:
        key = a.split("=", 1)[0]
        if planner_name(key):
            raise _fail("plan-memory", f"{key}: that is the run config's name; the planner's is "
                        f"{planner_name(key)}= (or plan the run config itself: --config run.yaml)")  # fmt: skip


def _print_plan(model, s, asked, fits, budget: int, gpu_gib: float, show: int) -> None:
    """`gtpo plan-memory`'s tables: the asked settings' memory parts and peak, then the settings that fit."""
    from services.trainer.learner.memory_plan import GIB

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
