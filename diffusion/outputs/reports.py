"""Results tables: of one ``sample.py`` run, and of a Hydra sweep over samplers and steps."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from diffusion.outputs.writers import atomic_path

COLUMNS = ("sampler", "steps", "nfe", "seconds", "images_per_second", "fid", "kid", "nll_bpd", "ode_nll_bpd")
OPTIONS = ("ema_length", "guidance", "eta", "ema", "precision", "seed")  # shown when a sweep varies them


def results_table(rows: list[dict[str, Any]]) -> str:
    """A Markdown table of the results columns that any row has, and of the options that differ between rows."""
    columns = [c for c in COLUMNS if any(c in row for row in rows)]
    columns += [c for c in OPTIONS if len({str(row.get(c)) for row in rows}) > 1]

    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.4g}"
        return "" if value is None else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


class SweepSummary(Callback):
    """At the end of a ``sample.py -m`` sweep, gathers every job's ``results.json`` into ``summary.md`` and
    ``summary.json`` in the sweep folder, and prints the table: the quality-versus-speed trade-off at a glance."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        rows = [json.loads(p.read_text()) for p in sorted(sweep_dir.glob("*/results.json"))]
        if not rows:
            return
        rows.sort(key=lambda row: (str(row.get("sampler")), row.get("steps") or 0, row.get("ema_length") or 0))
        table = results_table(rows)
        with atomic_path(sweep_dir / "summary.md") as tmp:
            tmp.write_text(table + "\n")
        with atomic_path(sweep_dir / "summary.json") as tmp:
            tmp.write_text(json.dumps(rows, indent=2) + "\n")
        print(f"\nSweep summary ({len(rows)} runs), written to {sweep_dir / 'summary.md'}:\n{table}")
