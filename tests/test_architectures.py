"""A spread of decoder-only architectures, saved and loaded through distgen's real path, against `model.generate`."""
import pytest
import torch
from transformers import AutoModelForCausalLM

from distgen.run import main as run_in_process
from tests.helpers import ARCHITECTURES, PROMPTS, read_outputs, reference_greedy, save_architecture

BUDGET = 6
SLIDING_WINDOW = 64  # qwen2's, in tests/helpers/models.py


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_batched_greedy_equals_generate(name, tokenizer, prompts_file, tmp_path):
    model_dir = save_architecture(name, tmp_path / name)
    out = tmp_path / "out"
    assert run_in_process([f"model={model_dir}", f"dataset={prompts_file}", f"output.dir={out}",
                           f"generation.max_new_tokens={BUDGET}", "generation.batch_size=3",
                           "generation.eos_token_ids=[]", "output.print_table=false"]) == 0
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    for record, prompt in zip(read_outputs(out), PROMPTS):  # qwen2's "story" runs past its sliding window
        budget = prompt.get("max_new_tokens", BUDGET)
        want = reference_greedy(model, tokenizer, prompt["prompt"], budget, [])
        assert record["completion_token_ids"] == want, (name, prompt["id"])
    if name == "qwen2":
        assert max(r["prompt_tokens"] + r["completion_tokens"] for r in read_outputs(out)) > SLIDING_WINDOW
