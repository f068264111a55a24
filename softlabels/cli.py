"""The ``softlabels`` command: option parsing and output only; the work is in the library modules."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import sys
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import click

from . import __version__, distributed
from .allocator import keep_freed_memory
from .checkpoint import load_model
from .convert import convert_cache
from .data import open_data
from .augment import Pipeline, parse_augment
from .dump import PRECISIONS, dump as run_dump
from .durable import make_parent
from .errors import SoftlabelsError, user_message
from .loader import source_for_cache
from .losses import KL_DIRECTIONS
from .kinds import KINDS, Dense, Option, TargetKind, kind_from_settings
from .report import SUMMARY_COLUMNS, cache_report, format_cache_report, format_comparison, format_table
from .figures import accuracy_vs_params_data, save_figure
from .report_html import write_report
from .runs import read_runs, read_summary, run_names
from .store import open_cache
from .tokens import TokenSource
from .kinds import STORE_DTYPES
from .kinds.topk import TAILS
from .train import StudentSpec, TrainConfig, eval_inputs, evaluate as run_evaluate, train_students
from .verify import verify_cache
from .views import Views

POSITIVE = click.IntRange(min=1)
TRUST_CODE = click.option(
    "--trust-code", is_flag=True,
    help="Run code named inside the files read (a module:callable architecture or dataset recorded in a "
         "checkpoint or cache), and load TorchScript and pickled modules. Only for files you trust.",
)


class _UsageLine(click.UsageError):
    """A usage error (an unknown option, a missing argument, a bad value) told in one ``error: ...``
    line, exit code 2, instead of click's usage, hint and message on four."""

    def __init__(self, exc: click.UsageError):
        super().__init__(" ".join(exc.format_message().split()), exc.ctx)

    def show(self, file: Any = None) -> None:
        command = self.ctx.command_path if self.ctx is not None else "softlabels"
        click.echo(f"error: {self.message} (see {command} --help)", file=file, err=True)


class _Group(click.Group):
    """Turns a user error into one ``error: ...`` line and exit code 1 (a traceback only with --debug),
    and a usage error into one line and exit code 2."""

    def make_context(self, info_name: str | None, args: list[str], parent: click.Context | None = None, **extra: Any) -> click.Context:
        try:  # the group's own options and arguments
            return super().make_context(info_name, args, parent, **extra)
        except click.exceptions.NoArgsIsHelpError:  # no command given: the help, as click prints it
            raise
        except click.UsageError as exc:
            raise _UsageLine(exc) from None

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except click.UsageError as exc:  # the command's name, options and arguments
            raise _UsageLine(exc) from None
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except KeyboardInterrupt:
            click.echo("error: interrupted", err=True)
            ctx.exit(130)
        except Exception as exc:
            if ctx.meta.get("softlabels.debug"):
                raise
            click.echo(f"error: {' '.join(user_message(exc).split())}", err=True)
            ctx.exit(1)


def _json_object(value: str | None, option: str) -> dict[str, Any]:
    if not value:
        return {}
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as exc:
        raise click.BadParameter(f"not valid JSON ({exc.msg})", param_hint=option) from None
    if not isinstance(parsed, dict):
        raise click.BadParameter("must be a JSON object such as '{\"width\": 200}'", param_hint=option)
    return parsed


def _student_spec(text: str, shared_kwargs: dict[str, Any]) -> StudentSpec:
    """``[NAME=]ARCH[?key=value&...]``; query values are parsed as JSON when they can be."""
    name, sep, rest = text.partition("=")
    if not sep or "?" in name or ":" in name:
        name, rest = None, text
    arch, _, query = rest.partition("?")
    kwargs = dict(shared_kwargs)
    for key, value in parse_qsl(query, keep_blank_values=True):
        try:
            kwargs[key] = json.loads(value)
        except json.JSONDecodeError:
            kwargs[key] = value
    if not arch:
        raise click.BadParameter(f"'{text}' names no architecture", param_hint="--student")
    return StudentSpec(arch=arch, kwargs=kwargs, name=name)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="softlabels")
@click.option("--debug", is_flag=True, help="Show the full traceback of an error.")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """Run a teacher once, cache its logits, and distill any number of students from the cache.

    \b
    Example:
      softlabels dump --teacher teacher.pth --data mnist1d://train --out train.zarr
      softlabels train-student --cache train.zarr --student mlp --student cnn1d --out runs/kd
    """
    ctx.meta["softlabels.debug"] = debug or os.environ.get("SOFTLABELS_DEBUG") == "1"
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)


def _teacher_options(f: Any) -> Any:
    for decorator in reversed(
        [
            click.option("--arch", help="Architecture of a bare state dict: a built-in name, torchvision:NAME, timm:NAME or module:callable."),
            click.option("--arch-kwargs", metavar="JSON", help="Keyword arguments for --arch, as a JSON object."),
            click.option("--num-classes", type=POSITIVE, help="Output classes of a bare state dict (default: inferred)."),
            TRUST_CODE,
        ]
    ):
        f = decorator(f)
    return f


class _Temperatures(click.ParamType):
    name = "T1,T2,..."

    def convert(self, value: Any, param: Any, ctx: Any) -> list[float]:
        if isinstance(value, (list, tuple)):
            return [float(t) for t in value]
        try:
            grid = [float(t) for t in value.split(",") if t.strip()]
        except ValueError:
            self.fail(f"'{value}' is not a comma-separated list of numbers", param, ctx)
        if not grid or not all(math.isfinite(t) and t > 0 for t in grid):
            self.fail(f"'{value}' is not a comma-separated list of positive numbers", param, ctx)
        return grid


class _Positive(click.ParamType):
    """A positive finite number (click's FloatRange lets nan and inf through)."""

    name = "float"

    def convert(self, value: Any, param: Any, ctx: Any) -> float:
        try:
            number = float(value)
        except (TypeError, ValueError):
            self.fail(f"'{value}' is not a number", param, ctx)
        if not (math.isfinite(number) and number > 0):
            self.fail(f"must be a positive number, got {value}", param, ctx)
        return number


def _given(ctx: Any, param: Any, value: Any) -> Any:
    """Refuse an empty path: it would mean the current directory."""
    if value is not None and not str(value).strip():
        raise click.BadParameter("must not be empty")
    return value


_OPTION_VALUES = {"count": POSITIVE, "temperature": _Positive(),
                  "seed": click.IntRange(0, 2**63 - 1), "temperatures": _Temperatures()}
# every kind's options, once each, in the order of KINDS; those kinds share (--temperatures) last
_KIND_OPTIONS = sorted({o.flag: o for kind in KINDS.values() for o in kind.options}.values(),
                       key=lambda o: sum(o in kind.options for kind in KINDS.values()) > 1)


def _param(option: Option) -> str:
    return option.flag.lstrip("-").replace("-", "_")


def _kind_options(f: Any) -> Any:
    """The options of every registered kind (``--top-k``, ``--sample``, ...), as :func:`_kind` reads them."""
    selecting = {kind.options[0].flag for kind in KINDS.values() if kind.options}
    for option in reversed(_KIND_OPTIONS):
        if option.value == "switch":
            f = click.option(option.flag, is_flag=True, help=option.help)(f)
        elif option.flag in selecting:
            f = click.option(option.flag, type=_OPTION_VALUES[option.value], metavar=option.metavar, help=option.help)(f)
        else:  # the setting's default, from the kind's own fields
            default = next(field.default for kind in KINDS.values() if option in kind.options
                           for field in dataclasses.fields(kind) if field.name == option.setting)
            shown = ",".join(f"{t:g}" for t in default) if isinstance(default, tuple) else default
            f = click.option(option.flag, type=_OPTION_VALUES[option.value], default=shown, show_default=True,
                             metavar=option.metavar, help=option.help)(f)
    return f


def _kind(options: dict[str, Any]) -> TargetKind | None:
    """The kind the command's kind options (``options``, by parameter name) ask for, or ``None``
    when they ask for none. An option given for another kind, which would be ignored, is an error."""
    context = click.get_current_context()
    given = {o.flag for o in _KIND_OPTIONS if context.get_parameter_source(_param(o)) != click.core.ParameterSource.DEFAULT}
    chosen = [kind for kind in KINDS.values() if kind.options and kind.options[0].flag in given]
    if len(chosen) > 1:
        raise click.UsageError(f"give {' or '.join(kind.options[0].flag for kind in chosen)}, not both")
    for flag in sorted(given):
        if not chosen or flag not in {o.flag for o in chosen[0].options}:
            owners = [kind.options[0].flag for kind in KINDS.values() if flag in {o.flag for o in kind.options}]
            raise click.UsageError(f"{flag} applies to {' or '.join(owners)}")
    if not chosen:
        return None
    kind = chosen[0]
    settings = {"kind": kind.name, **{o.setting: options[_param(o)] for o in kind.options}}
    try:  # the number of classes is checked once the teacher (or the cache) says it
        return kind_from_settings(settings, num_classes=2**62, where=kind.options[0].flag)
    except SoftlabelsError as exc:
        raise click.UsageError(str(exc)) from None


AUGMENT = click.option(
    "--augment", "augment_specs", multiple=True, metavar="SPEC",
    help="An augmentation, applied in the order given: shift?max=M, scale?max=S, noise?std=SIGMA (1-D signals); "
         "crop?size=H,W&scale=A,B&ratio=C,D, flip, cutmix?alpha=A (images [C,H,W]); mixup?alpha=A (any); module:callable?k=v.",
)
AUGMENT_SEED = click.option("--augment-seed", type=click.IntRange(0, 2**63 - 1), default=0, show_default=True,
                            help="Seed of the augmentation draws (each keyed by seed, sample and view).")


def _pipeline(specs: tuple[str, ...], seed: int) -> Pipeline | None:
    """The pipeline the --augment options ask for, or ``None`` when there are none."""
    return Pipeline(tuple(parse_augment(spec) for spec in specs), seed=seed) if specs else None


def _load(path: str, data_source: Any, arch: str | None, arch_kwargs: str | None, num_classes: int | None, trust_code: bool):
    return load_model(
        path,
        arch=arch,
        arch_kwargs=_json_object(arch_kwargs, "--arch-kwargs") if arch_kwargs else None,
        input_shape=data_source.input_shape,
        num_classes=num_classes,
        trust_code=trust_code,
    )


@cli.command(epilog="Example:\n\n\b\n  softlabels dump --teacher runs/teacher/teacher/student.pth \\\n      --data 'mnist1d://transfer?n=40000&seed=1' --out transfer.zarr\n  softlabels dump --teacher weights.safetensors --arch mymodels:make_teacher \\\n      --num-classes 10 --data images.h5 --out images.zarr --device cuda --precision bf16\n  softlabels dump --teacher teacher.pth --data mnist1d://train --out views.zarr --views 16 \\\n      --augment 'shift?max=6' --augment 'noise?std=0.15' --augment 'mixup?alpha=1'\n  softlabels dump --teacher teacher.pth --data 'imagefolder:photos/train?size=224&resize=256' \\\n      --out photos.zarr --views 8 --augment 'crop?size=224,224' --augment flip --skip-bad-files")
@click.option("--teacher", "teacher_path", required=True, metavar="CKPT", help="Teacher checkpoint (.pth, .pt, .safetensors) or a Hugging Face model folder.")
@click.option("--data", "data_spec", required=True, metavar="SPEC", help="Dataset: mnist1d://train, data.npz, data.zarr, data.h5, 'imagefolder:DIR?size=S', module:callable.")
@click.option("--out", required=True, metavar="PATH", callback=_given, help="Cache to write: PATH.zarr (Zarr v3) or PATH.h5 (HDF5).")
@_teacher_options
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--precision", type=click.Choice(list(PRECISIONS)), default="fp32", show_default=True, help="Autocast dtype for the teacher.")
@click.option("--channels-last", is_flag=True, help="Run the teacher on images in channels_last memory format (faster convolutions on GPUs).")
@click.option("--batch-size", type=POSITIVE, default=256, show_default=True)
@click.option("--num-workers", type=click.IntRange(0, 1024), help="DataLoader workers reading the inputs (default: 0; for images and module:callable datasets up to 4, or with a GPU all cores but 4, at least as many).")
@click.option("--store-dtype", type=click.Choice(STORE_DTYPES), default="float16", show_default=True)
@click.option("--chunk-rows", type=POSITIVE, help="Rows per chunk (default: about 2 MiB of logits in Zarr, 0.5 MiB in HDF5).")
@click.option("--compress-logits", is_flag=True, help="Compress the logits too (zstd in Zarr, gzip in HDF5): ~10% smaller, slower.")
@_kind_options
@click.option("--views", type=int, metavar="V", help="Store the teacher's targets for V augmented views of every sample (needs --augment).")
@AUGMENT
@AUGMENT_SEED
@click.option("--overwrite", is_flag=True, help="Replace an existing cache (and any interrupted dump) at --out; anything else there is refused.")
@click.option("--resume", is_flag=True, help="Continue an interrupted dump from its committed chunks.")
@click.option("--allow-nonfinite", is_flag=True, help="Store NaN/Inf logits instead of stopping.")
@click.option("--skip-bad-files", is_flag=True, help="Image folders: store an image that does not decode as unusable (no loss) and go on, instead of stopping.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def dump(teacher_path, data_spec, out, arch, arch_kwargs, num_classes, trust_code, device, precision, channels_last, batch_size, num_workers, store_dtype, chunk_rows, compress_logits, views, augment_specs, augment_seed, overwrite, resume, allow_nonfinite, skip_bad_files, quiet, **kind_options):
    """Run a teacher over a dataset and store its logits in a cache.

    With --views V and --augment, store V recorded augmented views of every sample: the teacher's
    targets for each view and the parameters that made it, replayed when students train.
    """
    kind = _kind(kind_options) or Dense()  # a usage error before anything is loaded
    distributed.init()
    if (views is None) != (not augment_specs):
        raise SoftlabelsError("--views V and --augment SPEC go together: a view cache records V augmented views per sample")
    recorded_views = Views(views, _pipeline(augment_specs, augment_seed)) if views is not None else None
    source = open_data(data_spec)
    teacher = _load(teacher_path, source, arch, arch_kwargs, num_classes, trust_code)
    result = run_dump(
        teacher,
        source,
        out,
        batch_size=batch_size,
        device=device,
        precision=precision,
        channels_last=channels_last,
        store_dtype=store_dtype,
        chunk_rows=chunk_rows,
        compress_logits=compress_logits,
        kind=kind,
        views=recorded_views,
        num_workers=num_workers,
        overwrite=overwrite,
        resume=resume,
        check_finite=not allow_nonfinite,
        skip_bad_files=skip_bad_files,
        progress=not quiet,
    )
    if distributed.world()[0] == 0:
        click.echo(result.summary())


@cli.command("train-student", epilog="Example:\n\n\b\n  softlabels train-student --cache transfer.zarr --student mlp --student cnn1d \\\n      --student 'wide=mlp?width=400' --eval-data mnist1d://test --eval-cache test.zarr \\\n      --epochs 30 --out runs/kd --tensorboard runs/tb/kd\n  softlabels train-student --data mnist1d://train --student mlp --hard-labels-only \\\n      --eval-data mnist1d://test --out runs/scratch\n  softlabels train-student --cache transfer.zarr --student mlp --checkpoint-every 200 \\\n      --out runs/long --resume\n  softlabels train-student --data mnist1d://train --student mlp --online-teacher teacher.pth \\\n      --augment 'shift?max=6' --augment 'mixup?alpha=1' --alpha 0 --out runs/online")
@click.option("--cache", "cache_path", metavar="PATH", help="Cache written by dump (its manifest names the data).")
@click.option("--data", "data_spec", metavar="SPEC", help="Training inputs (default: the cache's dataset; must match its fingerprint).")
@click.option("--student", "students", multiple=True, required=True, metavar="[NAME=]ARCH[?k=v]", help="Repeat to train several students from one pass over the cache.")
@click.option("--student-kwargs", metavar="JSON", help="Keyword arguments given to every student.")
@click.option("--out", required=True, metavar="DIR", callback=_given, help="Output directory.")
@click.option("--eval-data", metavar="SPEC", help="Data to evaluate on after each epoch.")
@click.option("--eval-cache", metavar="PATH", help="Teacher logits for --eval-data (for teacher agreement); without --eval-data, the data it was dumped from is evaluated.")
@click.option("--eval-teacher", metavar="CKPT", help="Teacher checkpoint to run once on --eval-data (for teacher agreement).")
@click.option("--epochs", type=POSITIVE, default=20, show_default=True)
@click.option("--batch-size", type=POSITIVE, default=128, show_default=True)
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=3e-3, show_default=True)
@click.option("--weight-decay", type=click.FloatRange(min=0), default=1e-4, show_default=True)
@click.option("--temperature", type=click.FloatRange(min=0, min_open=True), default=TrainConfig.temperature, show_default=True)
@click.option("--alpha", type=click.FloatRange(0, 1), default=0.5, show_default=True, help="Weight of the hard-label loss.")
@click.option("--kl", type=click.Choice(KL_DIRECTIONS), default="forward", show_default=True)
@click.option("--topk-tail", type=click.Choice(TAILS), default="exact", show_default=True,
              help="A top-k cache's tail: exact (matched as one bucket), renormalize (dropped, as other tools do) or gold (given to the label).")
@click.option("--seed", type=click.IntRange(0, 2**63 - 1), default=0, show_default=True)
@click.option("--hard-labels-only", is_flag=True, help="Ignore soft targets: the scratch baseline (needs no cache).")
@click.option("--online-teacher", metavar="CKPT", help="Run this teacher on every batch instead of reading a cache (with --augment: online function matching).")
@AUGMENT
@AUGMENT_SEED
@click.option("--num-classes", type=POSITIVE, help="Classes when there is no cache (default: largest label + 1).")
@click.option("--shards", type=POSITIVE, help="Train in one process on the batches N torchrun ranks train on, to resume or compare an N-rank run (the global batches are the same for any N).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--num-workers", type=click.IntRange(0, 1024), help="DataLoader worker processes reading batches (default: 0; for images and module:callable datasets up to 4, or with a GPU all cores but 4, at least as many).")
@click.option("--checkpoint-every", type=POSITIVE, metavar="STEPS", help="Also write DIR/checkpoint.pt every STEPS steps (default: after each epoch only).")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its checkpoint (the options must be the same).")
@click.option("--overwrite", is_flag=True, help="Replace a run already in --out.")
@TRUST_CODE
@click.option("--tensorboard", metavar="DIR", callback=_given, help="Also write per-epoch scalars of every student (losses, accuracy, agreement, "
              "learning rate, rows/s) to DIR/NAME for TensorBoard (needs pip install 'softlabels[tensorboard]').")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def train_student(cache_path, data_spec, students, student_kwargs, out, eval_data, eval_cache, eval_teacher, epochs, batch_size, lr, weight_decay, temperature, alpha, kl, topk_tail, seed, hard_labels_only, online_teacher, augment_specs, augment_seed, num_classes, shards, device, num_workers, checkpoint_every, resume, overwrite, trust_code, tensorboard, quiet):
    """Train one or more students from a cache of teacher logits.

    A view cache trains every sample on one of its recorded views per epoch. --augment gives every
    sample a fresh view each epoch, for the baselines: with --hard-labels-only (augmented scratch
    training) or with --online-teacher (the teacher run on every view).
    """
    distributed.init()
    config = TrainConfig(
        epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay, temperature=temperature,
        alpha=alpha, kl=kl, topk_tail=topk_tail, seed=seed, hard_labels_only=hard_labels_only, device=device, shards=shards,
        checkpoint_every=checkpoint_every, num_workers=num_workers, augment=_pipeline(augment_specs, augment_seed),
    )
    shared = _json_object(student_kwargs, "--student-kwargs")
    specs = [_student_spec(s, shared) for s in students]
    cache = open_cache(cache_path) if cache_path else None
    if cache is not None:
        source = source_for_cache(cache, data_spec, trust_code=trust_code)
    elif data_spec:
        if not (hard_labels_only or online_teacher):
            raise SoftlabelsError("without --cache, train-student needs --hard-labels-only or --online-teacher")
        source = open_data(data_spec)
    else:
        raise SoftlabelsError("give --cache (or --data with --hard-labels-only or --online-teacher)")
    teacher = load_model(online_teacher, input_shape=source.input_shape, trust_code=trust_code) if online_teacher else None
    eval_source, eval_top1 = eval_inputs(eval_data, eval_cache, eval_teacher, device=device, trust_code=trust_code)
    summary = train_students(
        specs, source=source, cache=cache, config=config, out_dir=out, eval_source=eval_source,
        eval_teacher_top1=eval_top1, num_classes=num_classes, progress=not quiet, resume=resume, overwrite=overwrite,
        teacher=teacher, trust_code=trust_code, tensorboard=tensorboard,
    )
    if distributed.world()[0] == 0:
        click.echo(format_table(summary, SUMMARY_COLUMNS))
        click.echo(f"wrote {Path(out) / 'summary.json'}")


@cli.command(epilog="Example:\n\n\b\n  softlabels evaluate --model runs/kd/mlp/student.pth --data mnist1d://test\n  softlabels evaluate --model runs/kd/mlp/student.pth --cache test.zarr --json")
@click.option("--model", "model_path", required=True, metavar="CKPT", help="Checkpoint to evaluate (a student.pth needs nothing else).")
@click.option("--data", "data_spec", metavar="SPEC", help="Evaluation data (default: the --cache's dataset).")
@click.option("--cache", "cache_path", metavar="PATH", help="Teacher logits on the same data, for teacher agreement.")
@_teacher_options
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def evaluate(model_path, data_spec, cache_path, arch, arch_kwargs, num_classes, trust_code, device, as_json):
    """Print a model's accuracy on a dataset (and its agreement with a cached teacher).
    """
    teacher_top1 = None
    if cache_path:
        with open_cache(cache_path) as cache:
            source = source_for_cache(cache, data_spec, trust_code=trust_code)
            teacher_top1 = cache.teacher_top1()
    elif data_spec:
        source = open_data(data_spec)
    else:
        raise SoftlabelsError("give --data (or --cache)")
    model = _load(model_path, source, arch, arch_kwargs, num_classes, trust_code)
    model.check_data(source)
    model.check_inputs(source)
    metrics = run_evaluate(model.model, source, teacher_top1=teacher_top1, device=device)
    if teacher_top1 is not None:  # the class each item's agreement is counted against, where not the teacher's own
        metrics["teacher_agreement_of"] = cache.kind.top_class_estimate
    result = {"model": model_path, "data": source.spec, "samples": len(source), **metrics}
    if as_json:
        click.echo(json.dumps(result))
    else:
        accuracy = "-" if metrics["accuracy"] is None else f"{metrics['accuracy']:.2%}"
        line = f"{model_path} on {source.spec}: accuracy {accuracy}"
        if metrics["nats"] is not None:
            per = "token (perplexity {:.4g})".format(math.exp(min(metrics["nats"], 700))) if isinstance(source, TokenSource) else "sample"
            line += f", {metrics['nats']:.4f} nats per {per}, ECE {metrics['ece']:.2%}"
        if metrics["teacher_agreement"] is not None:
            line += f", agreement with teacher {metrics['teacher_agreement']:.2%}"
            if metrics.get("teacher_agreement_of"):
                line += f" (the cache's {metrics['teacher_agreement_of']} taken as the teacher's)"
        click.echo(line)


@cli.command(epilog="Example:\n\n\b\n  softlabels inspect transfer.zarr\n  softlabels inspect train.h5 --json | python -m json.tool")
@click.argument("path")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def inspect(path, as_json):
    """Show a cache's manifest, size, compression, teacher accuracy and soft-target entropy.
    """
    with open_cache(path, allow_incomplete=True) as cache:
        report = cache_report(cache)
    click.echo(json.dumps(report, indent=2) if as_json else format_cache_report(report))
    if not report["complete"]:
        sys.exit(1)


@cli.command(epilog="Example:\n\n\b\n  softlabels verify train.zarr\n  softlabels verify train.zarr --recompute 256 --teacher teacher.pth")
@click.argument("path")
@click.option("--recompute", type=click.IntRange(min=0), default=0, show_default=True, metavar="N", help="Rerun the teacher on random batches of the dump holding at least N rows (whole batches, as the dump ran them; in a view cache, the views of N random samples) and compare.")
@click.option("--teacher", "teacher_path", metavar="CKPT", help="The cache's teacher checkpoint (for --recompute).")
@_teacher_options
@click.option("--data", "data_spec", metavar="SPEC", help="The cache's dataset, if not where the manifest says.")
@click.option("--seed", type=click.IntRange(0, 2**63 - 1), default=0, show_default=True, help="Seed choosing the rows to recompute.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
def verify(path, recompute, teacher_path, arch, arch_kwargs, num_classes, trust_code, data_spec, seed, device):
    """Check a cache's manifest, completeness and per-chunk checksums (exit 0 only if all is well)."""
    teacher = None
    if not recompute and (teacher_path or data_spec):
        raise click.UsageError("--teacher and --data serve --recompute N: give it too, or leave them out")
    if recompute:
        if not teacher_path:
            raise click.UsageError("--recompute needs --teacher")
        with open_cache(path, allow_incomplete=True) as cache:
            source = source_for_cache(cache, data_spec, trust_code=trust_code)
        teacher = _load(teacher_path, source, arch, arch_kwargs, num_classes, trust_code)
    report = verify_cache(path, recompute=recompute, teacher=teacher, source=source if recompute else None, seed=seed,
                          device=device)
    for problem in report.problems:
        click.echo(f"bad: {problem}")
    checked = f"{report.chunks} chunks checked"
    if report.rows_recomputed:
        checked += f", {report.rows_recomputed} rows recomputed " + (
            "(their draws rebuilt)" if report.max_abs_difference is None else f"(max |difference| {report.max_abs_difference:.3g})")
    if not report.ok:
        raise SoftlabelsError(f"{path} failed verification: {len(report.problems)} problem(s), {checked}")
    click.echo(f"ok: {path}: {checked}")


@cli.command(epilog="Example:\n\n\b\n  softlabels convert train.zarr train-top10.zarr --top-k 10\n  softlabels convert train.zarr train-s12.h5 --sample 12 --sample-seed 1\n  softlabels convert views64.zarr views16-top5.zarr --keep-views 16 --top-k 5\n  softlabels convert old-v1.zarr new.zarr --upgrade")
@click.argument("src")
@click.argument("dst", callback=_given)
@_kind_options
@click.option("--keep-views", type=POSITIVE, metavar="V", help="Keep the first V views of each sample of a view cache.")
@click.option("--upgrade", is_flag=True, help="Rewrite SRC in the current format version, same kind.")
@click.option("--overwrite", is_flag=True, help="Replace an existing cache at DST; anything else there is refused.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def convert(src, dst, keep_views, upgrade, overwrite, quiet, **kind_options):
    """Derive a top-k or sampled cache from a dense one, keep fewer views of a view cache, or upgrade
    an old cache, without running the teacher."""
    kind = _kind(kind_options)
    if upgrade and (kind is not None or keep_views):
        raise click.UsageError("--upgrade rewrites a cache as it is: give it alone")
    if not (upgrade or kind is not None or keep_views):
        raise click.UsageError("give --top-k K, --sample S, --keep-views V or --upgrade")
    size = convert_cache(src, dst, kind=kind, keep_views=keep_views, overwrite=overwrite, progress=not quiet)
    with open_cache(dst) as cache:
        click.echo(f"wrote {dst}: {cache.kind.name} cache, format v{cache.manifest['format_version']}, {size / 2**20:.2f} MiB on disk")


@cli.command(epilog="Example:\n\n\b\n  softlabels compare runs/scratch runs/distilled\n  softlabels compare runs/teacher runs/scratch runs/distilled --plot accuracy.png")
@click.argument("summaries", nargs=-1, required=True, metavar="RUN_DIR_OR_SUMMARY...")
@click.option("--plot", metavar="FILE.png", callback=_given, help="Also draw evaluation accuracy against parameters (the teacher as a line) to "
              "FILE.png, its numbers to FILE.json.")
@click.option("--overwrite", is_flag=True, help="Replace FILE.png and FILE.json if they exist.")
def compare(summaries, plot, overwrite):
    """Print the students of several train-student runs in one table."""
    if plot:
        if Path(plot).suffix != ".png":  # FILE.json goes beside it: FILE.PNG would be written as FILE.png
            raise click.BadParameter("must name a .png file (FILE.png, in lower case)", param_hint="--plot")
        stem = Path(plot).with_suffix("")
        existing = [path for path in (stem.with_suffix(".png"), stem.with_suffix(".json")) if path.exists()]
        if existing and not overwrite:
            raise SoftlabelsError(f"{existing[0]} exists; pass --overwrite to replace it")
        make_parent(Path(plot))  # before the table is printed: a file in the way is the command's only output
    rows = [read_summary(item)[1] for item in summaries]
    click.echo(format_comparison(list(zip(run_names(list(summaries)), rows))))
    if plot:
        runs = read_runs([Path(item) if Path(item).is_dir() else Path(item).parent for item in summaries], records=False)
        click.echo(f"wrote {save_figure('accuracy_vs_params', accuracy_vs_params_data(runs), stem)}")


@cli.command(epilog="Example:\n\n\b\n  softlabels report runs/demo/teacher runs/demo/scratch runs/demo/distilled \\\n      --cache runs/demo/transfer.zarr --cache runs/demo/test.zarr --out runs/demo/report")
@click.argument("runs", nargs=-1, metavar="[RUN_DIR]...")
@click.option("--cache", "caches", multiple=True, metavar="PATH", help="A cache to describe (repeat for several).")
@click.option("--out", required=True, metavar="DIR", callback=_given, help="Folder to write: index.html, the figures (PNG) and their numbers (JSON).")
@click.option("--overwrite", is_flag=True, help="Replace an earlier report in --out.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def report(runs, caches, out, overwrite, quiet):
    """Write figures and an HTML page of train-student runs and caches.

    Runs: learning curves, accuracy against parameters, agreement with the teacher, reliability
    diagrams. Caches: the teacher's entropy, the mass kept by its top K classes, its accuracy per
    class, the spread across recorded views. Every figure's numbers go to a JSON file beside it.
    """
    index = write_report(list(runs), list(caches), out, overwrite=overwrite, progress=not quiet)
    click.echo(f"wrote {index}")


def main() -> None:
    keep_freed_memory()  # large per-batch tensors reused, not page-faulted in afresh each batch
    cli(prog_name="softlabels")


if __name__ == "__main__":  # python -m softlabels.cli, as python -m softlabels
    main()
