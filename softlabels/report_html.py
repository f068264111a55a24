"""``softlabels report``: a folder of figures, their data and an ``index.html`` that shows them with
the tables ``compare`` and ``inspect`` print.

The folder is self-contained (the page refers only to files beside it) and written whole: it is
built in a hidden folder next to ``out`` and renamed into place, so a failure leaves nothing
half-written, and an existing report is replaced only with ``overwrite``. ``report.json`` lists
every figure with its PNG and JSON files.

Example::

    write_report(["runs/scratch", "runs/kd"], ["transfer.zarr"], "report", overwrite=True)
    # report/index.html, report/accuracy-vs-params.png and .json, report/transfer-mass-kept.png ...
"""

from __future__ import annotations

import datetime
import html
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from . import __version__
from .durable import make_parent
from .errors import SoftlabelsError
from .figures import (accuracy_vs_params_data, agreement_data, cache_figures_data, learning_curves_data, reliability_data,
                      save_figure)
from .report import cache_report, format_cache_report, format_comparison
from .names import distinct
from .runs import read_runs
from .store import open_cache

FORMAT = "softlabels-report"

_RUN_FIGURES = (  # file stem, figure, data, caption
    ("accuracy-vs-params", "accuracy_vs_params", accuracy_vs_params_data,
     "Evaluation accuracy against parameter count, one marker per run; the dashed line is the teacher."),
    ("learning-curves", "learning_curves", learning_curves_data, "Training loss and evaluation accuracy per epoch."),
    ("agreement", "agreement", agreement_data, "Top-1 agreement with the teacher on the evaluation data."),
    ("reliability", "reliability", reliability_data,
     "Reliability diagrams: accuracy per bin of confidence (15 bins) after the last epoch; the diagonal is perfect calibration."),
)
_CACHE_FIGURES = (  # key of cache_figures_data, caption
    ("entropy", "Entropy of the teacher's targets per item, at T=1 and at train-student's default temperature."),
    ("mass_kept", "Mean teacher mass kept by the K largest classes, with the K that keeps 90%, 95% and 99% "
                  "(what to read before choosing convert --top-k K)."),
    ("class_accuracy", "Teacher accuracy per class on the labeled items."),
    ("view_spread", "Spread of the teacher's targets across the recorded views of each sample."),
)


def write_report(runs: list[str | Path], caches: list[str | Path], out: str | Path, *, overwrite: bool = False,
                 progress: bool = False, dpi: int = 100) -> Path:
    """Write the report of ``runs`` (train-student run directories) and ``caches`` to folder ``out``;
    return the path of its ``index.html``. Every input is read and checked before anything is written."""
    out = Path(out)
    if not runs and not caches:
        raise SoftlabelsError("give at least one run directory or --cache")
    _check_out(out, overwrite)
    read = read_runs(runs)
    for path in caches:  # an incomplete cache, or a complete one with commit record damage, is refused before any work
        with open_cache(path) as cache:
            cache.check_commit_record()
    make_parent(out)
    building = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        umask = os.umask(0)
        os.umask(umask)
        building.chmod(0o777 & ~umask)  # mkdtemp's folder is private; a report is as shareable as any new folder
        sections, listed = [], []
        if read:
            figures = [_figure(building, stem, name, data(read), caption, dpi, listed) for stem, name, data, caption in _RUN_FIGURES]
            table = format_comparison([(run.name, run.summary) for run in read])
            sections.append(_section("Runs", table, [f for f in figures if f]))
        names = distinct([re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(path).name.rsplit(".", 1)[0]) or "cache" for path in caches])
        for path, name in zip(caches, names):
            with open_cache(path) as cache:
                text = format_cache_report(cache_report(cache))
                data = cache_figures_data(cache, progress=progress)
            figures = [_figure(building, f"{name}-{key.replace('_', '-')}", key, data[key], caption, dpi, listed,
                               title=str(path)) for key, caption in _CACHE_FIGURES if data[key] is not None]
            sections.append(_section(f"Cache {path}", text, figures))
        (building / "index.html").write_text(_page(sections), encoding="utf-8")
        (building / "report.json").write_text(json.dumps({"format": FORMAT, "softlabels_version": __version__,
                                                          "runs": [str(p) for p in runs], "caches": [str(p) for p in caches],
                                                          "figures": listed}, indent=2) + "\n")
        _move_into_place(building, out)
    except BaseException:
        shutil.rmtree(building, ignore_errors=True)
        raise
    return out / "index.html"


def _check_out(out: Path, overwrite: bool) -> None:
    """Refuse an existing ``out`` without ``overwrite``, and anything there but a report (or an
    empty folder) even with it: a mistyped ``--out`` must never remove someone's files."""
    if not out.exists() and not out.is_symlink():
        return
    if not overwrite:
        raise SoftlabelsError(f"{out} already exists: pass --overwrite to replace it")
    if out.is_symlink() or not out.is_dir():
        raise SoftlabelsError(f"{out} exists and is not a report folder: remove it or choose another --out")
    try:
        marker = json.loads((out / "report.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        marker = None
    if any(out.iterdir()) and not (isinstance(marker, dict) and marker.get("format") == FORMAT):
        raise SoftlabelsError(f"{out} holds files that are not a softlabels report: remove them or choose another --out")


def _move_into_place(building: Path, out: Path) -> None:
    """Rename the finished folder to ``out``; an old report is moved aside first and removed after."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.{os.getpid()}.old")
        os.replace(out, old)
    os.replace(building, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _figure(folder: Path, stem: str, name: str, data: dict[str, Any], caption: str, dpi: int, listed: list[dict[str, Any]],
            title: str = "") -> dict[str, str] | None:
    if not any(data.values()):
        return None  # nothing to draw: no student has these numbers
    save_figure(name, data, folder / stem, dpi=dpi, title=title)
    listed.append({"figure": name, "png": f"{stem}.png", "json": f"{stem}.json"})
    return {"png": f"{stem}.png", "json": f"{stem}.json", "caption": caption}


def _section(title: str, table: str, figures: list[dict[str, str]]) -> str:
    parts = [f"<h2>{html.escape(title)}</h2>", f"<pre>{html.escape(table)}</pre>"]
    for f in figures:
        parts.append(f'<figure><img src="{html.escape(f["png"])}" alt="{html.escape(f["caption"])}">'
                     f'<figcaption>{html.escape(f["caption"])} <a href="{html.escape(f["json"])}">data</a></figcaption></figure>')
    return "\n".join(parts)


def _page(sections: list[str]) -> str:
    created = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>softlabels report</title>
<style>
body {{ font-family: sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222; }}
pre {{ background: #f5f5f5; padding: 0.7em; overflow-x: auto; font-size: 13px; }}
figure {{ margin: 1.5em 0; }} img {{ max-width: 100%; }} figcaption {{ font-size: 14px; color: #555; }}
</style>
</head>
<body>
<h1>softlabels report</h1>
<p>Written {created} by softlabels {html.escape(__version__)}. Each figure's numbers are in the JSON file beside it.</p>
{chr(10).join(sections)}
</body>
</html>
"""
