"""``covenant data``: prepare and inspect the pre-tokenized corpus (mounted by ``cli/main.py``).

Bad input (a missing source, a damaged shard, a tokenizer hash that differs from the manifest)
prints one red line naming the file and what differs, and exits with status 2.
"""

from __future__ import annotations

import functools
import json
import logging
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from covenant.engine.data.config import DataConfig
from covenant.engine.data.prepare import PrepareProgress, default_data_dir, prepare
from covenant.engine.data.shards import Manifest, ShardDataset, verify_data_dir
from covenant.engine.data.tokenizer import load_tokenizer
from covenant.engine.errors import CovenantError

__all__ = ["app"]

logger = logging.getLogger(__name__)

app = typer.Typer(
    name="data",
    help="Prepare and inspect the pre-tokenized training corpus.",
    no_args_is_help=True,
    add_completion=False,
)

_DEFAULTS = DataConfig()
_STAGES = {
    "cached": "cached: nothing to do",
    "tokenizer": "training the tokenizer",
    "encode": "encoding documents",
    "commit": "writing the manifest",
    "done": "done",
}


def _fail(err: Exception) -> typer.Exit:
    """One plain error line, exit 2 (pydantic's multi-line messages folded, as every command)."""
    from covenant.engine.cli.options import fail

    if isinstance(err, ValidationError):
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "value"
        err = CovenantError(f"{where}: {first['msg']}")
    return fail(err if isinstance(err, CovenantError) else CovenantError(str(err)))


def _table(manifest: Manifest, data_dir: Path) -> Table:
    table = Table(title=f"covenant data: {data_dir}", show_header=True)
    table.add_column("split")
    table.add_column("shards", justify="right")
    table.add_column("tokens", justify="right")
    table.add_column("samples", justify="right")
    for split in ("train", "val"):
        shards = manifest.train if split == "train" else manifest.val
        table.add_row(
            split,
            str(len(shards)),
            f"{sum(s.num_tokens for s in shards):,}",
            f"{sum(s.num_samples for s in shards):,}",
        )
    table.caption = (
        f"seq_len {manifest.seq_len} · vocab {manifest.tokenizer.vocab_size} · "
        f"tokenizer {manifest.tokenizer.sha256[:16]}… · "
        f"{manifest.split.num_documents} documents ({manifest.split.num_val_documents} held out)"
    )
    return table


@app.command("prepare")
def prepare_cmd(
    out: Annotated[
        Path | None,
        typer.Option("--out", help="Output folder (default: $COVENANT_DATA_DIR or ./.cache/data)."),
    ] = None,
    vocab: Annotated[
        int | None,
        typer.Option(
            "--vocab",
            help=f"BPE vocabulary size (default {_DEFAULTS.vocab_size}, or the --tokenizer's).",
        ),
    ] = None,
    seq_len: Annotated[
        int, typer.Option("--seq-len", help="Tokens per sample (T).")
    ] = _DEFAULTS.seq_len,
    source: Annotated[
        list[str] | None,
        typer.Option(
            "--source",
            help="Text source: 'bigtxt', a .txt/.jsonl/.parquet file or folder, or 'name:arg'. Repeatable.",
        ),
    ] = None,
    val_fraction: Annotated[
        float, typer.Option("--val-fraction", help="Share of documents held out.")
    ] = _DEFAULTS.val_fraction,
    shard_tokens: Annotated[
        int, typer.Option("--shard-tokens", help="Target tokens per shard file.")
    ] = _DEFAULTS.shard_tokens,
    doc_max_chars: Annotated[
        int,
        typer.Option(
            "--doc-max-chars", help="Long texts are cut into blocks of at most this size."
        ),
    ] = _DEFAULTS.doc_max_chars,
    max_docs: Annotated[
        int | None, typer.Option("--max-docs", help="Stop after this many documents.")
    ] = None,
    tokenizer: Annotated[
        Path | None,
        typer.Option("--tokenizer", help="Reuse this tokenizer.json instead of training one."),
    ] = None,
    tokenizer_hash: Annotated[
        str | None, typer.Option("--tokenizer-hash", help="Require exactly this tokenizer sha256.")
    ] = None,
    force: Annotated[
        bool, typer.Option("--force", help="Prepare again even if the cache is valid.")
    ] = False,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the manifest summary as JSON.")
    ] = False,
) -> None:
    """Tokenize text sources into uint32 shards plus a manifest (cached)."""
    from covenant.engine.session import open_session

    open_session(None).register_text_sources()  # sources that enabled plugins contribute
    out_dir = out if out is not None else default_data_dir()
    console = Console(stderr=as_json)
    run = functools.partial(
        _run_prepare,
        out_dir,
        vocab,
        seq_len,
        source,
        val_fraction,
        shard_tokens,
        doc_max_chars,
        max_docs,
        tokenizer,
        tokenizer_hash,
        force,
    )
    try:
        if as_json:
            manifest = run(None)
        else:
            with Progress(
                SpinnerColumn(),
                TextColumn("{task.description}"),
                TextColumn("{task.fields[docs]} docs · {task.fields[tokens]} tokens"),
                TimeElapsedColumn(),
                console=console,
                transient=True,
            ) as progress:
                task = progress.add_task("starting", docs=0, tokens=0)

                def on_progress(p: PrepareProgress) -> None:
                    progress.update(
                        task,
                        description=_STAGES[p.stage],
                        docs=f"{p.documents:,}",
                        tokens=f"{p.tokens:,}",
                    )

                manifest = run(on_progress)
    except ValueError as e:  # DataError and pydantic's ValidationError are both ValueErrors
        raise _fail(e) from e
    except OSError as e:
        raise _fail(e) from e
    if as_json:
        typer.echo(json.dumps({"dir": str(out_dir), **manifest.summary()}, indent=2))
    else:
        console.print(_table(manifest, out_dir))


def _run_prepare(
    out_dir: Path,
    vocab: int | None,
    seq_len: int,
    source: list[str] | None,
    val_fraction: float,
    shard_tokens: int,
    doc_max_chars: int,
    max_docs: int | None,
    tokenizer: Path | None,
    tokenizer_hash: str | None,
    force: bool,
    on_progress: Any,
) -> Manifest:
    return prepare(
        out_dir,
        source or None,
        vocab,
        seq_len,
        val_fraction,
        shard_tokens=shard_tokens,
        doc_max_chars=doc_max_chars,
        max_documents=max_docs,
        tokenizer_path=tokenizer,
        tokenizer_hash=tokenizer_hash,
        force=force,
        on_progress=on_progress,
    )


@app.command("inspect")
def inspect_cmd(
    data_dir: Annotated[Path, typer.Argument(help="A prepared data folder.")],
    sample: Annotated[int, typer.Option("--sample", help="Which train sample to decode.")] = 0,
    no_hash: Annotated[
        bool, typer.Option("--no-hash", help="Skip the sha256 check of every shard.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
) -> None:
    """Verify a prepared folder and print its manifest summary and one decoded sample."""
    try:
        manifest = verify_data_dir(data_dir, verify_hash=not no_hash)
        tok = load_tokenizer(data_dir / manifest.tokenizer.file, manifest.tokenizer.sha256)
        ds = ShardDataset(data_dir, "train", 0, verify_hash=False, manifest=manifest)
        ids = ds.sample(sample).tolist() if ds.num_samples else []
    except (ValueError, IndexError, OSError) as e:
        raise _fail(e) from e
    text = tok.decode(ids, skip_special_tokens=False)
    if as_json:
        typer.echo(
            json.dumps(
                {
                    "dir": str(data_dir),
                    **manifest.summary(),
                    "sample": sample,
                    "sample_ids": ids,
                    "sample_text": text,
                },
                indent=2,
            )
        )
        return
    console = Console()
    console.print(_table(manifest, data_dir))
    console.print(f"[bold]train sample {sample}[/bold] ({len(ids)} tokens):")
    console.print(escape(text), soft_wrap=True)
