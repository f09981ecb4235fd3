"""The `gtpo` console script (Typer).

Commands stay thin: they parse arguments and call into `shared` / `services`. torch and transformers are
imported inside the commands so that `gtpo --help` is instant.
"""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(
    name="gtpo",
    help="Post-training (SFT + GTPO RL) for SDAR block-diffusion language models.",
    no_args_is_help=True,
    add_completion=False,
)
console = Console()

MODEL_PRESETS = ("tiny",)


@app.callback()
def main() -> None:
    """Post-training (SFT + GTPO RL) for SDAR block-diffusion language models."""
    # an explicit callback keeps `init-model` a subcommand while it is the only one


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
) -> None:
    """Write a randomly initialised checkpoint of PRESET to --out (config, safetensors weights, tokenizer)."""
    if (out / "config.json").exists() and not force:
        console.print(f"[red]{out} already holds a checkpoint; pass --force to overwrite it[/red]")
        raise typer.Exit(code=1)

    from shared.model import count_parameters, load_model
    from shared.tiny import init_tiny

    path = init_tiny(out, seed=seed)
    loaded = load_model(path)  # read back what was written: the summary describes the files, not the memory
    table = Table(title=f"gtpo init-model {preset}", show_header=False)
    table.add_row("path", str(path.resolve()))
    table.add_row("parameters", f"{count_parameters(loaded.model):,}")
    table.add_row("vocab size", f"{loaded.model.config.vocab_size} (tokenizer: {len(loaded.tokenizer)})")
    table.add_row("block size", str(loaded.spec.block_size))
    table.add_row("mask id", f"{loaded.spec.mask_token_id} ({loaded.tokenizer.mask_token})")
    console.print(table)
