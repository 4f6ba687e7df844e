"""``apar-spec generate``: answer one prompt (``apar_spec.generate``) and print the answer with its stats."""

from __future__ import annotations

from typing import Annotated, Optional

import typer
from apar_spec.experiments.bench_plan import BenchSettings

from apar_spec.api import generate as run_generate
from apar_spec.options import DecodeOptions, given

from .errors import fail, handle_errors
from .options import (
    MODEL_HELP,
    AsJson,
    ChatTemplate,
    DepthCap,
    Device,
    DeviceMap,
    Dtype,
    ForkBias,
    ForkGate,
    MaxDepth,
    MaxNew,
    RepeatedTitle,
    Seed,
    Temperature,
    Threads,
    check_mode,
    default,
    model_option,
    with_groups,
)
from .output import print_json, quiet_transformers, show_generation, stdout_console
from .progress import ensure_packaged_base


@handle_errors
@with_groups
def generate(
    prompt: Annotated[str, typer.Argument(help="The question to answer.")],
    model: Annotated[str, model_option(MODEL_HELP)] = default(BenchSettings, "target"),
    mode: Annotated[str, typer.Option("--mode", help="ar, apar, spec or apar+spec.")] = default(run_generate, "mode"),
    draft: Annotated[
        Optional[str],
        typer.Option(
            "--draft",
            help="Draft for spec modes: registry name (see `apar-spec drafts list`), model path, or a union such as "
            "'smollm2-hydra+ngram:8'.",
        ),
    ] = None,
    k: Annotated[int, typer.Option("-k", help="Draft tokens per branch per step.")] = default(
        DecodeOptions, "num_draft_tokens"
    ),
    max_new_tokens: MaxNew = default(DecodeOptions, "max_new_tokens"),
    max_depth: MaxDepth = None,
    depth_cap: DepthCap = None,
    fork_bias: ForkBias = None,
    repeated_title: RepeatedTitle = None,
    fork_gate: ForkGate = None,
    fork_in_code: Annotated[
        bool,
        typer.Option(
            "--fork-in-code",
            help="Let a branch fork inside a ``` code block (off by default: a fork there splits one piece of code "
            "over two branches).",
        ),
    ] = default(DecodeOptions, "fork_in_code"),
    temperature: Temperature = default(DecodeOptions, "temperature"),
    seed: Seed = default(DecodeOptions, "seed"),
    chat_template: ChatTemplate = None,
    dtype: Dtype = None,
    device: Device = None,
    device_map: DeviceMap = None,
    threads: Threads = None,
    live: Annotated[bool, typer.Option("--live", help="Show the branches growing, step by step.")] = False,
    as_json: AsJson = False,
) -> None:
    """Answer one prompt and print the answer with its stats."""
    from apar_spec.experiments.bench import torch_threads
    from apar_spec.experiments.models import Loaded, default_draft, encode_prompt, resolve_draft

    from apar_spec.models.loading import load

    if not prompt.strip():
        fail('the prompt is empty; pass the question to answer, e.g. apar-spec generate "Give 3 tips for sleep"')
    quiet_transformers()
    check_mode(mode)
    if draft and mode not in ("spec", "apar+spec"):
        fail(f"--draft is only used by --mode spec or apar+spec (got --mode {mode})")
    ensure_packaged_base(stdout_console(stderr=True), model, draft)  # a first SmolLM2 load says why it waits
    loaded = Loaded(model, *load(model, dtype=dtype, device=device, device_map=device_map))
    draft_name = draft or (default_draft(model) if mode in ("spec", "apar+spec") else None)
    draft_device = loaded.model.device if device_map else device  # a draft runs where the target's inputs are
    draft_arg = resolve_draft(draft_name, loaded, loaded, dtype=dtype, device=draft_device).arg if draft_name else None
    ids = encode_prompt(loaded, prompt, chat_template)
    kwargs = dict(
        mode=mode,
        draft=draft_arg,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        seed=seed,
        num_draft_tokens=k,
        fork_in_code=fork_in_code,
        **given(
            max_depth=max_depth,
            depth_cap=depth_cap,
            fork_bias=fork_bias,
            repeated_title=repeated_title,
            fork_gate=fork_gate,
        ),
    )
    console = stdout_console()
    with torch_threads(threads, str(loaded.model.device)):
        if live and console.is_terminal and not as_json:
            from .live import generate_live

            gen = generate_live(loaded.model, loaded.tokenizer, ids, console=console, **kwargs)
        else:
            gen = run_generate(loaded.model, loaded.tokenizer, [ids], **kwargs)[0]
    if as_json:
        print_json({"model": model, "mode": mode, "draft": draft_name, **gen.to_dict()})
    else:
        show_generation(gen, console, model=model, mode=mode, draft=draft_name)
