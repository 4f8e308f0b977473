"""`python train.py stage=vocab` end to end: run folder contract, reload from final/, same logits on old tokens."""

from __future__ import annotations

import json

import torch
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import only_run_dir, run_train
from stagewise.config import DEEPANALYZE_TAGS, ModelConfig, TinyModelConfig
from stagewise.models import load_model_and_tokenizer


def test_vocab_stage_run_folder_and_reload(tmp_path):
    proc = run_train(["stage=vocab", "model.tiny.with_deepanalyze_tags=false"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = only_run_dir(tmp_path)
    # the run-folder contract
    for rel in (".hydra/config.yaml", "metrics.jsonl", "train.log", "final/config.json", "final/model.safetensors",
                "final/tokenizer.json", "final/chat_template.jinja", "vocab.json"):
        assert (run / rel).exists(), rel
    saved = OmegaConf.load(run / ".hydra" / "config.yaml")
    assert saved.stage.name == "vocab" and saved.model.tiny.with_deepanalyze_tags is False
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["stage"] == "vocab" and rows[0]["step"] == 0 and rows[0]["vocab/added"] == 10
    assert "vocab/added 10" in (run / "train.log").read_text()

    # plain transformers reloads it; each tag is one id; old-token logits are unchanged
    tok = AutoTokenizer.from_pretrained(run / "final")
    model = AutoModelForCausalLM.from_pretrained(run / "final", dtype=torch.float32)
    for tag in DEEPANALYZE_TAGS:
        assert len(tok.encode(tag, add_special_tokens=False)) == 1, tag
    base, base_tok = load_model_and_tokenizer(ModelConfig(tiny=TinyModelConfig(with_deepanalyze_tags=False)))
    ids = torch.tensor([base_tok.encode("<|im_start|>user\nWhat is 12 + 30?<|im_end|>\n")])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits[..., :1028], base(ids).logits[..., :1028], rtol=0, atol=1e-5)
    # chat template survives the round trip
    msgs = [{"role": "user", "content": "hi"}]
    assert tok.apply_chat_template(msgs, tokenize=False) == base_tok.apply_chat_template(msgs, tokenize=False)

    # running it again on final/ changes nothing
    proc2 = run_train(["stage=vocab", f"model.name_or_path={run / 'final'}", "task_name=again"], cwd=tmp_path)
    assert proc2.returncode == 0, proc2.stderr[-3000:]
    run2 = only_run_dir(tmp_path, "again")
    assert json.loads((run2 / "vocab.json").read_text()) == []
    model2 = AutoModelForCausalLM.from_pretrained(run2 / "final", dtype=torch.float32)
    for a, b in zip(model.state_dict().values(), model2.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_bad_model_path_names_the_path(tmp_path):
    missing = tmp_path / "no" / "such" / "model"
    proc = run_train(["stage=vocab", f"model.name_or_path={missing}"], cwd=tmp_path)
    assert proc.returncode != 0
    assert str(missing) in proc.stderr + proc.stdout
    assert "does not exist" in proc.stderr + proc.stdout


def test_two_ranks_share_one_run_folder(tmp_path):
    """Under torchrun, both ranks resolve the same run id (no ${now:} per process)."""
    import subprocess
    import sys

    from conftest import REPO

    script = tmp_path / "ids.py"
    # each rank writes its own file: both ranks printing to one pipe can interleave within a line
    script.write_text(
        "import os, sys, pathlib\nsys.path.insert(0, %r)\nfrom stagewise.run_folder import make_run_id\n"
        "pathlib.Path(%r, 'rank' + os.environ['RANK']).write_text(make_run_id())\n" % (str(REPO / "src"), str(tmp_path)))
    env = {k: v for k, v in __import__("os").environ.items() if k != "STAGEWISE_RUN_ID"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(script)],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ids = [(tmp_path / f"rank{r}").read_text() for r in (0, 1)]
    assert ids[0] == ids[1] and ids[0], ids
