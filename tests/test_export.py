"""``apar-spec export``: a plain Hugging Face folder that decodes exactly as the original."""

from __future__ import annotations

import json

from apar_spec.cli.app import app
from typer.testing import CliRunner

import apar_spec
from apar_spec.models.export import export
from apar_spec.options import model_decode_defaults

PROMPTS = ["Question: Give 4 tips for better sleep.\nAnswer:", "Question: What is the capital of France?\nAnswer:"]


def test_export_of_tiny_apar_loads_as_a_plain_folder_and_decodes_the_same(tmp_path):
    model, tok = apar_spec.load("tiny-apar")
    rep = export("tiny-apar", tmp_path / "out")
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= set(rep.files)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    fork = tok.convert_tokens_to_ids(apar_spec.FORK_TOKEN)
    assert (config["apar_fork_id"], config["apar_child_id"]) == (fork, tok.convert_tokens_to_ids(apar_spec.CHILD_TOKEN))
    again, again_tok = apar_spec.load(tmp_path / "out")
    assert model_decode_defaults(again) == model_decode_defaults(model)  # max depth, fork bias travel along
    for mode in ("apar", "ar"):
        want = apar_spec.generate(model, tok, PROMPTS, mode=mode, max_new_tokens=48)
        got = apar_spec.generate(again, again_tok, PROMPTS, mode=mode, max_new_tokens=48)
        assert [g.token_ids for g in got] == [w.token_ids for w in want]
        assert [len(g.branches) for g in got] == [len(w.branches) for w in want]
    assert any(len(w.branches) > 1 for w in apar_spec.generate(model, tok, PROMPTS[:1], mode="apar", max_new_tokens=48))


def test_export_refuses_bad_input_in_one_line_and_keeps_what_is_there(tmp_path):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("mine")
    res = CliRunner().invoke(app, ["export", "tiny-apar", str(tmp_path / "busy")])
    assert res.exit_code == 2 and "already exists" in res.output and "Traceback" not in res.output
    assert (tmp_path / "busy" / "keep.txt").read_text() == "mine"
    res = CliRunner().invoke(app, ["export", "tiny-apar", str(tmp_path / "x"), "--dtype", "int8"])
    assert res.exit_code == 2 and "--dtype must be one of float32, bfloat16" in res.output
    assert not (tmp_path / "x").exists()
    res = CliRunner().invoke(app, ["export", "tiny-apar", str(tmp_path / "ok"), "--dtype", "bfloat16", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["dtype"] == "bfloat16"
    assert json.loads((tmp_path / "ok" / "config.json").read_text())["dtype"] == "bfloat16"
