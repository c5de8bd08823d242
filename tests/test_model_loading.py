import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

from distgen.config import ModelConfig, TinyModelConfig
from distgen.common.errors import ConfigError
from distgen.models.loading import check_model_source, load_model, load_tokenizer, resolve_dtype
from distgen.models.tiny import build_tiny_model
from distgen.run import main as run_main
from tests.helpers import fake_hub_cache, run_module, write_prompts

CPU = torch.device("cpu")


def test_saved_tiny_model_loads_with_from_pretrained(tiny_model_dir):
    cfg = ModelConfig(source="pretrained", path=str(tiny_model_dir), dtype="fp32")
    check_model_source(cfg)
    tokenizer = load_tokenizer(cfg)
    loaded = load_model(cfg, tokenizer, CPU)
    built = build_tiny_model(TinyModelConfig(layers=2, seed=7), tokenizer)
    assert loaded.state_dict().keys() == built.state_dict().keys()
    for name, tensor in built.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    assert tokenizer.decode(tokenizer("héllo, world")["input_ids"]) == "héllo, world"


def test_tiny_source_is_the_same_on_every_build():
    cfg = ModelConfig(source="tiny")
    a, b = (load_model(cfg, load_tokenizer(cfg), CPU) for _ in range(2))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_dtype_choice(tiny_model_dir):
    assert resolve_dtype("auto", CPU) == torch.float32
    assert resolve_dtype("auto", torch.device("cuda", 0)) == torch.bfloat16
    cfg = ModelConfig(source="pretrained", path=str(tiny_model_dir), dtype="bf16")
    assert load_model(cfg, load_tokenizer(cfg), CPU).dtype == torch.bfloat16


def test_folder_without_model_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="model.path=.* is not a folder with a saved model"):
        check_model_source(ModelConfig(source="pretrained", path=str(tmp_path)))


def test_auto_attention_is_left_to_transformers_without_cuda_and_a_named_one_is_kept():
    from distgen.models.loading import resolve_attn_implementation
    assert resolve_attn_implementation("auto", CPU, torch.bfloat16) is None  # transformers picks
    assert resolve_attn_implementation("eager", torch.device("cuda", 0), torch.float32) == "eager"


def test_hub_ids_load_from_the_local_cache_and_name_the_cache_when_missing(tiny_model_dir, tmp_path):
    cache = tmp_path / "hub"
    fake_hub_cache(cache, "acme/tiny-llama", tiny_model_dir)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"id": "a", "prompt": "Hello"}\n')
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    run = [sys.executable, "-m", "distgen.run", f"dataset={prompts}", "generation.max_new_tokens=3"]
    done = subprocess.run([*run, "model=acme/tiny-llama", f"output.dir={tmp_path / 'out'}"], env=env,
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    [record] = [json.loads(line) for line in (tmp_path / "out" / "outputs.jsonl").read_text().splitlines()]
    assert record["id"] == "a" and record["completion_tokens"] == 3
    # The same tokens as the folder itself gives.
    direct = subprocess.run([*run, f"model={tiny_model_dir}", f"output.dir={tmp_path / 'direct'}"], env=env,
                            capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert direct.returncode == 0, direct.stderr[-3000:]
    [same] = [json.loads(line) for line in (tmp_path / "direct" / "outputs.jsonl").read_text().splitlines()]
    assert same["completion_token_ids"] == record["completion_token_ids"]
    missing = subprocess.run([*run, "model=acme/not-cached", f"output.dir={tmp_path / 'none'}"], env=env,
                             capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert missing.returncode == 2
    assert (f"model.path='acme/not-cached' is neither a folder here ({tmp_path}) nor a model in the Hugging Face "
            f"cache ({cache}), and HF_HUB_OFFLINE is set; fetch it with `hf download acme/not-cached`") in missing.stderr
    assert not (tmp_path / "none").exists()
def test_model_folder_problems_stop_before_anything_starts(tiny_model_dir, tmp_path, capsys):
    """Issue 21 item 9: --check and the pre-start checks open the model folder (config, weight headers,
    remote code), before any process group and before output.dir exists."""
    prompts = write_prompts(tmp_path / "p.jsonl", [{"id": "a", "prompt": "Hi"}])

    def broken(name, change):
        folder = shutil.copytree(tiny_model_dir, tmp_path / name)
        change(folder)
        return folder

    weights = "model.safetensors"
    cases = {
        "no-weights": (lambda m: (m / weights).unlink(), r"has no weight files"),
        "cut-weights": (lambda m: (m / weights).write_bytes((m / weights).read_bytes()[:-100]),
                        r"weight file model.safetensors is not usable: its tensors need \d+ bytes but the file has"),
        "bad-header": (lambda m: (m / weights).write_bytes(b"\xff" * 64), r"header length .* does not fit"),
        "bad-config": (lambda m: (m / "config.json").write_text("{not json"), r"config.json cannot be read as JSON"),
        "remote-code": (lambda m: (m / "config.json").write_text(json.dumps(
            {**json.loads((m / "config.json").read_text()), "auto_map": {"AutoModelForCausalLM": "x.Model"}})),
                        r"needs its own Python code .* model.trust_remote_code=true"),
    }
    for name, (change, message) in cases.items():
        out = tmp_path / f"out-{name}"
        assert run_main(["--check", f"model={broken(name, change)}", f"dataset={prompts}", f"output.dir={out}"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("distgen: config error: ") and re.search(message, err), (name, err)
        assert not out.exists()
    # and a real run (not --check) stops the same way, before output.dir exists
    failed = run_module("distgen.run", [f"model={tmp_path / 'cut-weights'}", f"dataset={prompts}",
                                        f"output.dir={tmp_path / 'out'}"])
    assert failed.returncode == 2 and "is not usable" in failed.stderr and not (tmp_path / "out").exists()


@pytest.mark.parametrize("env, allow, reason", [
    ({"HF_ENDPOINT": "http://127.0.0.1:9"}, "true", r"and the hub could not be reached \(.+\); fetch it with "
                                                    r"`hf download acme/x`$"),
    ({"HF_HUB_OFFLINE": "1"}, "true", r"and HF_HUB_OFFLINE is set; fetch it with `hf download acme/x` "
                                      r"\(or unset HF_HUB_OFFLINE\)$"),
    ({"HF_HUB_OFFLINE": "1"}, "false", r"and HF_HUB_OFFLINE is set; fetch it with `hf download acme/x` "
                                       r"\(or unset HF_HUB_OFFLINE and give model.allow_download=true\)$"),
])
def test_a_missing_hub_model_says_why_it_was_not_fetched(env, allow, reason, tmp_path):
    """With model.allow_download=true the message never says downloads are off: the hub did not answer, or
    HF_HUB_OFFLINE stopped it; the way out it offers is one the user has not taken already."""
    prompts = write_prompts(tmp_path / "p.jsonl", [{"id": "a", "prompt": "Hi"}])
    clean = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_ENDPOINT")}
    done = subprocess.run([sys.executable, "-m", "distgen.launch", "--check", "model=acme/x", f"dataset={prompts}",
                           f"model.allow_download={allow}"], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env={**clean, "HF_HUB_CACHE": str(tmp_path / "hub"), **env})
    assert done.returncode == 2
    line = done.stderr.strip().splitlines()[-1]
    assert "model.allow_download=false" not in line and re.search(reason, line), line


def test_model_revision_picks_a_branch_or_a_commit_of_a_cached_hub_id_and_nothing_else(tiny_model_dir, tmp_path,
                                                                                        monkeypatch):
    from huggingface_hub import constants

    from distgen.models.loading import resolve_hub_ids
    cache = tmp_path / "hub"
    main = fake_hub_cache(cache, "acme/tiny", tiny_model_dir, commit="a" * 40)
    dev = shutil.copytree(tiny_model_dir, main.parent / ("b" * 40))
    (main.parent.parent / "refs" / "dev").write_text("b" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    folder = lambda **given: resolve_hub_ids(ModelConfig(path="acme/tiny", **given)).path  # noqa: E731
    assert folder() == folder(revision="main") == str(main)
    assert folder(revision="dev") == folder(revision="b" * 40) == str(dev)
    with pytest.raises(ConfigError, match=r"model.revision='dev' is not allowed: it picks a hub model's version, "
                                          r"and model.path='.*' is a folder here"):
        resolve_hub_ids(ModelConfig(path=str(tiny_model_dir), revision="dev"))
    with pytest.raises(ConfigError, match=r"model.revision='dev' is not allowed: .* model=tiny builds its model"):
        resolve_hub_ids(ModelConfig(source="tiny", revision="dev"))
