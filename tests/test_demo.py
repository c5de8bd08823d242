"""The README's demo command, end to end, as a newcomer runs it."""
import json
import os
import subprocess

from distgen.models.tiny import main as tiny_main
from tests.helpers import REPO


def test_demo_script_generates_every_bundled_prompt(tmp_path):
    env = {**os.environ, "DEMO_DIR": str(tmp_path)}
    result = subprocess.run(["bash", "scripts/demo.sh"], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr
    assert f"demo outputs: {tmp_path}/outputs/outputs.jsonl" in result.stdout
    records = [json.loads(line) for line in (tmp_path / "outputs" / "outputs.jsonl").read_text().splitlines()]
    bundled = (REPO / "distgen" / "data" / "demo_prompts.jsonl").read_text().splitlines()
    assert [r["id"] for r in records] == [json.loads(line)["id"] for line in bundled]
    assert all(r["completion_tokens"] > 0 for r in records)
    ranks = json.loads((tmp_path / "outputs" / "stats.json").read_text())["ranks"]
    assert len(ranks) == 2


def test_tiny_command_saves_a_loadable_model(tmp_path, capsys):
    tiny_main([str(tmp_path / "m"), "--layers", "1", "--hidden-size", "32"])
    assert "saved tiny Llama" in capsys.readouterr().out
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["num_hidden_layers"] == 1 and config["hidden_size"] == 32
    assert (tmp_path / "m" / "tokenizer.json").is_file()
