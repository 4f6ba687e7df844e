"""What the commands share: one way to read a default, the option types, the option groups.

- :func:`default` reads a default from its one home (a driver's dataclass field or a
  function parameter), so no default is written here a second time.
- The ``Annotated`` types below declare an option once for every command that takes it.
- An *option group* is a dataclass of such options (``ModelPair``, ``BenchRun``): a command
  takes it as one parameter, :func:`with_groups` shows typer each field as its own option and
  hands the command the filled-in dataclass. ``bench`` and ``sweep`` declare their ~28 common
  options this way, once.
- Every command names its model ``--model``; :func:`model_option` marks it, and
  :func:`with_groups` adds the old name ``--target`` as a hidden alias.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Optional, TypeVar, get_args, get_origin, get_type_hints

import typer
from apar_spec.experiments.bench_plan import BenchSettings

from .errors import fail

F = TypeVar("F", bound=Callable)
OLD_MODEL_NAME = "--target"  # what --model was called in bench, sweep, load-bench, quality, train-heads


def default(source: Any, name: str) -> Any:
    """A default from its one source: a dataclass field or a function's (or class's) parameter."""
    if dataclasses.is_dataclass(source):
        field = {f.name: f for f in dataclasses.fields(source)}[name]
        return field.default_factory() if field.default is dataclasses.MISSING else field.default
    return inspect.signature(source).parameters[name].default


def check_mode(mode: str) -> None:
    """Fail on an unknown --mode before any model is loaded (``apar_spec.options.check_mode``)."""
    from apar_spec.options import check_mode as check

    try:
        check(mode)
    except ValueError as err:
        fail(str(err))


def model_option(help: str) -> Any:
    """The ``--model`` option (``-m``); :func:`with_groups` adds the hidden old name ``--target``."""
    info = typer.Option("--model", "-m", help=help)
    info.old_name = OLD_MODEL_NAME  # read by with_groups
    return info


# ------------------------------------------------------------------ options several commands take

MODEL_HELP = "Target model: embedded name, local path, .gguf file or cached HF id."
Model = Annotated[str, model_option(MODEL_HELP)]
Base = Annotated[
    Optional[str],
    typer.Option(
        "--base",
        help="AR baseline model for an APAR target ('same' = the target). Default: tiny-base for tiny-apar, else the "
        "target.",
    ),
]
Modes = Annotated[
    Optional[str],
    typer.Option(
        "--modes",
        help="Comma-separated configurations: hf-generate, hf-assisted, ar, apar, spec, apar+spec. Default: all that "
        "apply.",
    ),
]
Prompts = Annotated[
    str,
    typer.Option(
        "--prompts",
        help="Built-in set name, a text file (one prompt a line), JSONL with 'prompt', or Spec-Bench/FastChat "
        "question.jsonl; several files comma-separated (ids get the folder name: vicuna_bench/1).",
    ),
]
Category = Annotated[Optional[str], typer.Option("--category", help="Only these categories (comma-separated).")]
Limit = Annotated[Optional[int], typer.Option("--limit", help="At most this many prompts (after --category).")]
PerCategory = Annotated[
    Optional[int],
    typer.Option(
        "--per-category",
        help="At most this many prompts of each category (several prompt files: categories interleaved).",
    ),
]
Turn = Annotated[int, typer.Option("--turn", help="Which turn of question.jsonl rows to use (0 = first).")]
MaxNew = Annotated[int, typer.Option("--max-new-tokens", help="Token budget per request, over all branches.")]
MaxDepth = Annotated[
    Optional[int],
    typer.Option(
        "--max-depth",
        help="Fork nesting cap for apar modes (a branch at this level may not fork; root = 0). Default: the nesting "
        "the model was trained on, else 2.",
    ),
]
MaxBranch = Annotated[
    Optional[int],
    typer.Option(
        "--max-branch-tokens",
        help="Cap on each branch's own tokens (default: --max-new-tokens). With a large --max-new-tokens every branch "
        "ends on its own, so speculative rows hold the same tokens as plain ones (no shared budget for "
        "acceptance to cut elsewhere); HF and ar rows get the cap as their budget.",
    ),
]
ForkBias = Annotated[
    Optional[float],
    typer.Option(
        "--fork-bias",
        help="Added to the [Fork] logit where a fork is allowed and would spawn a child (apar modes): > 0 forks more, "
        "< 0 less. Default: the model's recorded one, else 0.",
    ),
]
DepthCap = Annotated[
    Optional[str],
    typer.Option(
        "--depth-cap",
        help="What a child at the --max-depth cap does when it asks for [Fork]: end (it ends, minus the line it "
        "began) or mask (it writes on). Default: end.",
    ),
]
RepeatedTitle = Annotated[
    Optional[str],
    typer.Option(
        "--repeated-title",
        help="What a branch does when it forks after a title it already forked after in the same list (a loop): end "
        "(it ends, minus that title) or keep (it forks again). Default: end.",
    ),
]
ForkGate = Annotated[
    Optional[float],
    typer.Option(
        "--fork-gate",
        help="The fork router's threshold (apar modes): a prompt the model's router scores under it as wanting a list "
        "decodes without forks. Default: the router's own (no router: no gate); 0 turns it off.",
    ),
]
Temperature = Annotated[float, typer.Option("--temperature", help="0 = greedy (lossless checks need greedy).")]
Seed = Annotated[Optional[int], typer.Option("--seed", help="Seed for sampling.")]
Repeats = Annotated[
    int, typer.Option("--repeats", help="Timed repeats per (configuration, prompt); the report takes medians.")
]
Warmup = Annotated[int, typer.Option("--warmup", help="Untimed warm-up calls per configuration before the first row.")]
Dtype = Annotated[
    Optional[str],
    typer.Option(
        "--dtype",
        help="float32, bfloat16, float16, float64 (default: float32 for embedded models, the checkpoint's otherwise).",
    ),
]
Device = Annotated[Optional[str], typer.Option("--device", help="cpu, cuda, or auto (accelerate picks).")]
DeviceMap = Annotated[
    Optional[str],
    typer.Option(
        "--device-map",
        help="auto: accelerate spreads a model too large for one device over all of them (instead of --device).",
    ),
]
Threads = Annotated[
    Optional[int],
    typer.Option(
        "--threads",
        help="torch CPU threads for the run (default: 1 on CPU, where batch-1 decoding of small models is "
        "latency-bound; untouched on GPU).",
    ),
]
ChatTemplate = Annotated[
    Optional[bool],
    typer.Option(
        "--chat-template/--no-chat-template",
        help="Wrap prompts in the tokenizer's chat template (default: when it has one).",
    ),
]
Out = Annotated[
    Path, typer.Option("--out", "-o", help="Results file (JSONL, one row per configuration x prompt x repeat).")
]
Resume = Annotated[bool, typer.Option("--resume", help="Continue --out: skip rows already there.")]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Start --out again when it already holds rows.")]
AsJson = Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")]
Strict = Annotated[
    bool,
    typer.Option(
        "--strict",
        help="Exit non-zero when a lossless check finds a bug: a greedy answer that differs from its reference where "
        "the target's logit gap at the first difference is 1e-4 or more, or is missing (float32; bf16/fp16 "
        "rounding is not a bug).",
    ),
]


# ------------------------------------------------------------------ option groups (bench and sweep)


@dataclasses.dataclass
class ModelPair:
    """The models a benchmark compares: the target and its AR baseline."""

    model: Model = default(BenchSettings, "target")
    base: Base = None


@dataclasses.dataclass
class BenchRun:
    """Everything else ``bench`` and ``sweep`` share: prompts, decoding, timing, placement, the results file."""

    prompts: Prompts = default(BenchSettings, "prompts")
    category: Category = None
    limit: Limit = None
    per_category: PerCategory = None
    turn: Turn = default(BenchSettings, "turn")
    max_new_tokens: MaxNew = default(BenchSettings, "max_new_tokens")
    max_depth: MaxDepth = None
    depth_cap: DepthCap = None
    fork_bias: ForkBias = None
    repeated_title: RepeatedTitle = None
    fork_gate: ForkGate = None
    max_branch_tokens: MaxBranch = None
    temperature: Temperature = default(BenchSettings, "temperature")
    seed: Seed = default(BenchSettings, "seed")
    repeats: Repeats = default(BenchSettings, "repeats")
    warmup: Warmup = default(BenchSettings, "warmup")
    dtype: Dtype = None
    device: Device = default(BenchSettings, "device")
    device_map: DeviceMap = None
    threads: Threads = None
    chat_template: ChatTemplate = None
    out: Out = default(BenchSettings, "out")
    resume: Resume = False
    overwrite: Overwrite = False
    as_json: AsJson = False
    strict: Strict = False

    def settings(self, models: ModelPair, **own: Any) -> BenchSettings:
        """The run's ``BenchSettings``: these options, the models and a command's own (draft, modes, k, ...)."""
        shared = {
            f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("as_json", "strict")
        }
        return BenchSettings(target=models.model, base=models.base, **shared, **own)


# ------------------------------------------------------------------ the decorator that expands them


def _typer_infos(annotation: Any) -> tuple:
    return get_args(annotation)[1:] if get_origin(annotation) is Annotated else ()


def with_groups(fn: F) -> F:
    """Show typer each option of ``fn``'s option-group parameters (a dataclass type; its default,
    an instance, may change the fields' defaults) and a hidden ``--target`` beside a
    :func:`model_option`; call ``fn`` with the groups filled in and ``--target`` read as ``--model``."""
    hints = get_type_hints(fn, include_extras=True)
    params: list[inspect.Parameter] = []
    groups: dict[str, tuple[type, list[str]]] = {}
    aliases: dict[str, tuple[str, Any, bool]] = {}  # hidden alias -> (model parameter, its default, required)
    kw = inspect.Parameter.KEYWORD_ONLY  # typer passes every option by name; a required one may follow a default
    for p in inspect.signature(fn).parameters.values():
        hint = hints.get(p.name, p.annotation)
        if isinstance(hint, type) and dataclasses.is_dataclass(hint):
            field_hints = get_type_hints(hint, include_extras=True)
            start = p.default if isinstance(p.default, hint) else None
            names = [f.name for f in dataclasses.fields(hint)]
            groups[p.name] = (hint, names)
            params += [
                inspect.Parameter(
                    n, kw, default=default(hint, n) if start is None else getattr(start, n), annotation=field_hints[n]
                )
                for n in names
            ]
        else:
            params.append(p.replace(kind=kw, annotation=hint))
    for i, p in reversed(list(enumerate(params))):
        infos = _typer_infos(p.annotation)
        old = next((info.old_name for info in infos if getattr(info, "old_name", None)), None)
        if old is None:
            continue
        required = p.default is inspect.Parameter.empty
        if required:  # either name may give it, so typer must not require one of them
            params[i] = p.replace(default=None, annotation=Annotated[(Optional[get_args(p.annotation)[0]], *infos)])
        alias = old.lstrip("-").replace("-", "_")
        aliases[alias] = (p.name, None if required else p.default, required)
        hidden = typer.Option(old, hidden=True, help=f"Old name of --{p.name.replace('_', '-')}.")
        params.insert(i + 1, inspect.Parameter(alias, kw, default=None, annotation=Annotated[Optional[str], hidden]))
    names = [p.name for p in params]
    clash = sorted({n for n in names if names.count(n) > 1})
    if clash:
        raise TypeError(f"{fn.__name__}: option group fields clash with its own parameters: {clash}")

    @functools.wraps(fn)
    def wrapper(**kwargs: Any) -> Any:
        for alias, (name, dflt, required) in aliases.items():
            old = kwargs.pop(alias)
            if old is not None:
                if kwargs[name] not in (None, dflt, old):
                    fail(f"--model and {OLD_MODEL_NAME} (its old name) name different models: pass --model only")
                kwargs[name] = old
            elif required and kwargs[name] is None:
                fail(f"Missing option '--model' ({OLD_MODEL_NAME} is its old name).")
        for name, (cls, fields) in groups.items():
            kwargs[name] = cls(**{n: kwargs.pop(n) for n in fields})
        return fn(**kwargs)

    wrapper.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    wrapper.__annotations__ = {p.name: p.annotation for p in params}
    return wrapper  # type: ignore[return-value]
