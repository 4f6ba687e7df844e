"""Scale-out: the data-parallel bench (2 CPU processes, gloo) and ``device_map`` loading.

The 2-process test launches ``python -m torch.distributed.run --standalone
--nproc_per_node 2 -m apar_spec.cli bench ...`` (what ``accelerate launch`` runs under
the hood on GPUs; accelerate's own ``--cpu`` launch needs mpirun for more than one
process). It is marked ``multiprocess`` so it is easy to spot (``-m multiprocess``),
bounded by a timeout, and runs in CI on CPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from apar_spec.cli.app import app
from apar_spec.experiments.bench import compare
from apar_spec.experiments.bench_files import read_rows
from apar_spec.experiments.bench_plan import BenchSettings
from apar_spec.experiments.parallel import Processes, shard_files, shard_path
from test_bench import make_micro_setup, settings
from typer.testing import CliRunner

import apar_spec

PROMPTS = [  # three prompts for two processes: the split is uneven on purpose
    {"prompt": "Give 3 tips for better sleep.", "id": "sleep", "category": "list"},
    {"prompt": "Name two colours.", "id": "colours", "category": "plain"},
    {"prompt": "List 3 fruits.", "id": "fruits", "category": "list"},
]
MODES = ["ar", "apar"]
BENCH = ["--modes", ",".join(MODES), "--max-new-tokens", "12", "--repeats", "1", "--warmup", "0", "--device", "cpu"]


@pytest.fixture(scope="module")
def micro(tmp_path_factory) -> dict:
    return make_micro_setup(tmp_path_factory.mktemp("dp_micro"))


def test_each_process_takes_every_nth_prompt():
    items = list(range(7))
    shares = [Processes(r, 3).share(items) for r in range(3)]
    assert shares == [[0, 3, 6], [1, 4], [2, 5]]
    assert sorted(x for s in shares for x in s) == items
    assert Processes().share(items) == items and not Processes().parallel
    assert Processes().output(Path("r.jsonl")) == Path("r.jsonl")
    assert Processes(1, 2).output(Path("d/r.jsonl")) == Path("d/r.jsonl.part1")


@pytest.mark.multiprocess
def test_two_cpu_processes_split_the_prompts_and_merge_one_file(tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    out = tmp_path / "dp.jsonl"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("WORLD_SIZE", None)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "apar_spec.cli",
        "bench",
        "--prompts",
        str(prompts),
        "--out",
        str(out),
        *BENCH,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = read_rows(out)
    keys = [(r["config"], r["prompt_id"]) for r in rows]
    assert sorted(keys) == sorted((m, p["id"]) for m in MODES for p in PROMPTS)  # every row exactly once
    # merged in the single-process order, and each prompt ran on the process that owns it (i::2)
    assert keys == [(m, p["id"]) for p in PROMPTS for m in MODES]
    owner = {p["id"]: i % 2 for i, p in enumerate(PROMPTS)}
    assert all(r["process"] == owner[r["prompt_id"]] and r["processes"] == 2 for r in rows)
    assert shard_files(out) == []
    assert proc.stdout.count("all prompts") == 1, proc.stdout  # one report, from the main process
    assert "6 new row(s)" in proc.stderr

    report = CliRunner().invoke(app, ["report", str(out), "--json"])
    assert report.exit_code == 0, report.output
    summary = json.loads(report.stdout)
    assert summary  # the report parses the merged file

    # the split changes where a prompt runs, not what it generates: one process gives the same tokens
    single = BenchSettings(
        prompts=str(prompts),
        modes=",".join(MODES),
        max_new_tokens=12,
        repeats=1,
        warmup=0,
        device="cpu",
        out=tmp_path / "single.jsonl",
    )
    compare(single)
    alone = {(r["config"], r["prompt_id"]): r["output_ids"] for r in read_rows(single.out)}
    assert {(r["config"], r["prompt_id"]): r["output_ids"] for r in rows} == alone
    assert read_rows(single.out)[0]["setup_id"] == rows[0]["setup_id"]  # the process count is not part of the setup


def test_resume_merges_shards_of_an_interrupted_parallel_run(micro, tmp_path):
    """Shards left by a killed data-parallel run are refused without --resume, merged with it
    (their rows are not measured again), and dropped with --overwrite."""
    s = settings(micro, tmp_path, modes="ar,apar", limit=3)
    full = compare(s)
    rows = read_rows(s.out)
    assert full.written == len(rows) == 6
    # pretend a 2-process run was killed: process 1 had finished prompt p2, process 0 only the first row of p1
    s.out.unlink()
    shard_path(s.out, 0).write_text(json.dumps(rows[0]) + "\n" + json.dumps(rows[1])[:20])  # a cut last line
    shard_path(s.out, 1).write_text("".join(json.dumps(r) + "\n" for r in rows if r["prompt_id"] == "p2"))
    with pytest.raises(ValueError, match="shard.*interrupted data-parallel run.*--resume"):
        compare(settings(micro, tmp_path, modes="ar,apar", limit=3))
    resumed = compare(settings(micro, tmp_path, modes="ar,apar", limit=3, resume=True))
    assert resumed.skipped == 3 and resumed.written == 3
    assert shard_files(s.out) == []
    after = read_rows(s.out)
    assert sorted((r["variant"], r["prompt_id"]) for r in after) == sorted((r["variant"], r["prompt_id"]) for r in rows)

    shard_path(s.out, 0).write_text(json.dumps(rows[0]) + "\n")
    again = compare(settings(micro, tmp_path, modes="ar", limit=1, overwrite=True))
    assert again.written == 1 and shard_files(s.out) == [] and len(read_rows(s.out)) == 1


def test_device_map_auto_loads_and_decodes_like_a_plain_load():
    """On CPU accelerate puts every layer on the CPU; the decoder must still run and give
    the tokens of the ordinary load (a real split needs several GPUs)."""
    mapped, tok = apar_spec.load("tiny-apar", device_map="auto")
    plain, _ = apar_spec.load("tiny-apar", device="cpu")
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "Give 3 tips for better sleep."}], add_generation_prompt=True, return_dict=False
    )
    a = apar_spec.generate(mapped, tok, [ids], mode="apar", max_new_tokens=40)[0]
    b = apar_spec.generate(plain, tok, [ids], mode="apar", max_new_tokens=40)[0]
    assert a.token_ids == b.token_ids and len(a.token_ids) > 5
    with pytest.raises(ValueError, match="either device.*or device_map"):
        apar_spec.load("tiny-apar", device="cpu", device_map="auto")


def test_device_map_through_the_cli(tmp_path):
    runner = CliRunner()
    result = runner.invoke(
        app,
        [
            "generate",
            "Name two colours.",
            "--model",
            "tiny-apar",
            "--mode",
            "apar",
            "--device-map",
            "auto",
            "--max-new-tokens",
            "6",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["stats"]["tokens_generated"] > 0
    clash = runner.invoke(app, ["bench", "--device", "cpu", "--device-map", "auto", "--out", str(tmp_path / "x.jsonl")])
    assert clash.exit_code == 2 and "--device-map auto places the models itself" in clash.stderr
    with pytest.raises(ValueError, match="device-map"):
        BenchSettings(device="cuda", device_map="auto")
    assert BenchSettings(device_map="auto").setup_id() != BenchSettings().setup_id()
