"""CLI commands of the model package: ``covenant model-info`` and ``covenant export``.

Registered through ``covenant_register_commands`` (see :mod:`covenant.models.plugin`). This is
CLI code, so it prints (rich tables or ``--json``). A bad input is one red line and exit code 2.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from covenant.models.config import ModelConfig, ModelConfigError

_err = Console(stderr=True, soft_wrap=True)


def _fail(message: str) -> typer.Exit:
    _err.print(f"[red]error:[/red] {escape(message)}", highlight=False)
    return typer.Exit(code=2)


def _gib(n: float) -> str:
    return f"{n / (1 << 30):,.2f} GiB"


def model_info(
    preset: str = typer.Option("tiny", "--preset", help="model preset (see presets.toml)"),
    tp: int = typer.Option(1, "--tp", help="tensor-parallel degree"),
    pp: int = typer.Option(1, "--pp", help="pipeline-parallel degree"),
    dp: int = typer.Option(1, "--dp", help="data-parallel degree"),
    micro_batch: int = typer.Option(1, "--micro-batch", help="sequences per micro-batch"),
    seq: int | None = typer.Option(None, "--seq", help="sequence length (default: preset's)"),
    precision: str = typer.Option("bf16", "--precision", help="fp32 | bf16 | fp8"),
    distributed_optimizer: bool = typer.Option(
        False, "--distributed-optimizer", help="shard optimizer state over DP"
    ),
    recompute: bool = typer.Option(False, "--recompute", help="full activation recomputation"),
    backend: str = typer.Option(
        "te", "--backend", help="te (Transformer Engine, flash attention) | local (megatron's)"
    ),
    attention: str = typer.Option(
        "sdpa",
        "--attention",
        help="with --backend local: sdpa (torch's flash kernels) | unfused (stores the scores)",
    ),
    outer_state: bool = typer.Option(
        True, "--outer-state/--no-outer-state", help="count the outer step's GPU buffers"
    ),
    gpu_gb: float | None = typer.Option(
        None, "--gpu-gb", help="GPU memory in GiB: exit 2 if the plan does not fit"
    ),
    as_json: bool = typer.Option(False, "--json", help="print JSON"),
) -> None:
    """Parameter counts and a per-GPU memory plan for a preset under a TP x PP x DP layout."""
    from covenant.models import memory  # torch-heavy: only when the command runs

    try:
        if backend not in ("te", "local"):
            raise ValueError(f"unknown --backend {backend!r} (te | local)")
        if attention not in ("sdpa", "unfused"):
            raise ValueError(f"unknown --attention {attention!r} (sdpa | unfused)")
        shape = ModelConfig(preset=preset).resolve()
        result = memory.plan(
            shape,
            tp,
            pp,
            dp,
            micro_batch,
            seq,
            precision=precision,
            distributed_optimizer=distributed_optimizer,
            outer_state_on_gpu=outer_state,
            flash_attention=backend == "te" or attention == "sdpa",
            recompute=recompute,
        )
    except ValidationError as exc:
        raise _fail("; ".join(str(e["msg"]) for e in exc.errors())) from None
    except ValueError as exc:  # ModelConfigError, unknown precision
        raise _fail(str(exc)) from None
    fit: bool | None = None
    if gpu_gb is not None:
        fit = memory.fits(result, int(gpu_gb * memory.GIB))
        result["gpu_bytes"] = int(gpu_gb * memory.GIB)
        result["fits"] = fit
    if as_json:
        typer.echo(json.dumps(result, indent=2))
    else:
        _print_table(result)
    if fit is False:
        raise _fail(
            f"{preset} with tp={tp} pp={pp} dp={dp} needs "
            f"{_gib(result['per_rank_bytes']['total'])} per GPU, more than {gpu_gb} GiB "
            "(minus 10% headroom)"
        )


def _print_table(result: dict[str, Any]) -> None:
    console = Console()
    lay = result["layout"]
    console.print(
        f"[bold]{result['preset']}[/bold]  tp={lay['tp']} pp={lay['pp']} dp={lay['dp']} "
        f"({lay['gpus']} GPUs), micro-batch {result['micro_batch']} x {result['seq']} tokens, "
        f"{result['precision']}"
    )
    console.print(
        f"parameters: {result['params_total']:,} total, {result['params_embedding']:,} in "
        f"embeddings; per stage: {', '.join(f'{n:,}' for n in result['params_per_stage'])}"
    )
    table = Table("per GPU (largest stage)", "bytes", "")
    for key, value in result["per_rank_bytes"].items():
        table.add_row(key, f"{value:,}", _gib(value))
    console.print(table)


def export(
    source: Path = typer.Argument(..., help="full-weight directory, or a run directory"),
    out_dir: Path = typer.Argument(..., help="where to write the safetensors files + config.json"),
    fmt: str = typer.Option("hf", "--format", help="export format (only 'hf')"),
    dtype: str = typer.Option("fp32", "--dtype", help="fp32 | bf16"),
    max_shard_gb: float = typer.Option(
        5.0, "--max-shard-size", min=0.001, help="largest weights file, in GB (10^9 bytes)"
    ),
) -> None:
    """Export weights as a Hugging Face Llama checkpoint (safetensors + config.json).

    Streams one tensor at a time: the memory needed is one output file, not the model.
    """
    import torch

    from covenant.models.hf import export_hf
    from covenant.models.weights import WeightsError, find_full_weights, open_full_weights

    if fmt != "hf":
        raise _fail(f"unknown --format {fmt!r}; supported: hf")
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    if dtype not in dtypes:
        raise _fail(f"unknown --dtype {dtype!r}; supported: {', '.join(dtypes)}")
    try:
        weights = open_full_weights(find_full_weights(source))
        out = export_hf(
            weights, weights.shape, out_dir, dtypes[dtype], max_shard_bytes=int(max_shard_gb * 1e9)
        )
    except (WeightsError, ModelConfigError, OSError) as exc:
        raise _fail(str(exc)) from None
    typer.echo(f"exported {weights.shape.name} from {weights.root} to {out}")
