"""The sampler's share of a step: engine.sampler.Sampler on one step's logits, per setting, rows and vocabulary;
and whole engine steps on a benchmark model with each setting.

    .venv/bin/python bench/sampling.py                          # rows 4/16/64 x vocab 259/32000/151936, CPU
    .venv/bin/python bench/sampling.py --rows 16 --vocab 259 --device cuda
    .venv/bin/python bench/sampling.py --engine large --prompts 32 --repeats 3   # the 8-layer model, ms per step
    .venv/bin/python bench/sampling.py --engine tiny --tree /path/to/other/checkout --only greedy sampled
    .venv/bin/python bench/sampling.py --only greedy "greedy, json_schema" sampled "sampled, json_schema"
    .venv/bin/python bench/sampling.py --grammar-parts                      # where a grammar step's time goes

Each setting runs the real Sampler (the same call a step makes, after the forward) on random fp32 logits for
`rows` requests that all take a token, `--steps` times after a warm-up, and reports the median milliseconds
per call: greedy (the plain argmax: the path a job without knobs takes), sampled (one plain setting: drawn as
one batch), and vLLM's knobs on the logits path (engine/logits.py) greedy and sampled, and logprobs. A
penalized row's token history grows by one token per step, as in a job. A grammar setting (structured output,
engine/grammar.py) also times what the engine does on the host with each step's tokens: every row's matcher takes
its token (a matcher whose grammar ended starts again); its rows need a tokenizer as wide as the vocabulary: the
tiny byte-level one at 259, else a byte-level BPE trained once on transformers' modeling files (at most as many
tokens as that text gives; the logits' other ids are never allowed), cached under .cache/bench-sampling/.
Prints a markdown table.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
# --tree DIR: time another checkout's distgen (e.g. the commit before the knobs), with this script and bench/
TREE = Path(sys.argv[sys.argv.index("--tree") + 1]).resolve() if "--tree" in sys.argv else REPO
sys.path[:0] = [str(TREE), str(REPO)]

from distgen.config import GenerationConfig  # noqa: E402
from distgen.engine.request import Request  # noqa: E402
from distgen.inputs.records import Prompt  # noqa: E402

PENALTIES = dict(repetition_penalty=1.2, presence_penalty=0.5, frequency_penalty=0.5)
SAMPLED = dict(do_sample=True, temperature=0.8, top_k=50, top_p=0.95)
# A JSON schema of the kind a batch job asks for: a few typed, bounded fields and an array.
SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 24}, "age": {"type": "integer", "minimum": 0, "maximum": 150},
    "tags": {"type": "array", "items": {"type": "string", "enum": ["red", "green", "blue"]}, "maxItems": 4},
    "score": {"type": "number"}, "ok": {"type": "boolean"}}, "required": ["name", "age", "ok"]}
SETTINGS = {  # name -> generation.* (a checkout without the knobs runs the first two only)
    "greedy": {},
    "sampled": SAMPLED,
    "greedy, penalties": PENALTIES,
    "greedy, logprobs 5": dict(logprobs=5),
    "sampled, every knob": dict(**SAMPLED, min_p=0.05, min_tokens=4, logit_bias={5: 1.5, 7: -2.0}, **PENALTIES),
    "greedy, json_schema": dict(json_schema=SCHEMA),
    "sampled, json_schema": dict(**SAMPLED, json_schema=SCHEMA),
}
EOS = 1  # the bench tokenizers' </s>


def tokenizer_for(vocab: int):
    """A tokenizer for `vocab`-wide logits: the tiny byte-level one (259 tokens), else a byte-level BPE of at most
    `vocab` tokens trained once on transformers' modeling files (a real BPE's merges, as a grammar's masks see them)."""
    from distgen.models.tiny import BOS, EOS as EOS_TOKEN, PAD, build_tokenizer
    from transformers import PreTrainedTokenizerFast
    if vocab <= len(build_tokenizer()):
        return build_tokenizer()
    folder = REPO / ".cache" / "bench-sampling" / f"bpe-{vocab}"
    if not (folder / "tokenizer.json").is_file():
        import transformers
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
        core = Tokenizer(models.BPE())
        core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        core.decoder = decoders.ByteLevel()
        files = sorted(str(p) for p in Path(transformers.__file__).parent.glob("models/*/modeling_*.py"))
        core.train(files, trainers.BpeTrainer(vocab_size=vocab, special_tokens=[BOS, EOS_TOKEN, PAD],
                                              show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
        PreTrainedTokenizerFast(tokenizer_object=core, bos_token=BOS, eos_token=EOS_TOKEN,
                                pad_token=PAD).save_pretrained(folder)
    return PreTrainedTokenizerFast.from_pretrained(folder)


def requests_for(cfg: GenerationConfig, rows: int, vocab: int, device: torch.device) -> list[Request]:
    """`rows` requests with 64-token prompts, each its own seed (distinct settings per row when sampled,
    so the sampled rows of "every knob" differ: temperatures 0.8 + row/100), each its matcher where the setting
    has a grammar (compiled once, as on a rank)."""
    from distgen.engine.request import Request
    from distgen.engine.sampling import row_sampling
    grammar = book = None
    if getattr(cfg, "json_schema", None) is not None:
        from distgen.engine.grammar import GrammarBook
        from distgen.inputs.grammar import job_grammar
        grammar, book = job_grammar(cfg), GrammarBook(tokenizer_for(vocab), vocab, [EOS])
    made = []
    for row in range(rows):
        prompt = Prompt(row, row, "")
        sampling = row_sampling(cfg, prompt, grammar) if grammar else row_sampling(cfg, prompt)
        if sampling.processed and sampling.do_sample:
            sampling = replace(sampling, temperature=sampling.temperature + row / 100)
        ids = torch.randint(0, vocab, (64,), generator=torch.Generator().manual_seed(row)).tolist()
        # the row's seed (a checkout before the counter-based draw takes a generator there)
        seed = row if "seed" in Request.__dataclass_fields__ else torch.Generator(device=device).manual_seed(row)
        made.append(Request(prompt, ids, 1 << 20, seed, sampling))
        if book is not None:
            made[-1].matcher = book.matcher(grammar)
    return made


def take_tokens(requests: list[Request], tokens: list[int]) -> None:
    """What the engine does with a step's tokens on the host for a grammar: each matcher takes its row's token
    (engine.core.Engine.finish_reason); one whose grammar ended starts again, as the next request would."""
    for request, token in zip(requests, tokens):
        if request.matcher is not None:
            assert request.matcher.accept_token(token), "a masked step chose a token its grammar refuses"
            if request.matcher.is_terminated():
                request.matcher.reset()


def time_setting(name: str, rows: int, vocab: int, steps: int, device: torch.device) -> float:
    """Median ms per Sampler call: on CPU the process's CPU time (this box is shared: wall time counts the others'
    work), on CUDA wall time, synchronized."""
    from distgen.engine.sampler import Sampler
    cfg = GenerationConfig(**SETTINGS[name])
    sampler = Sampler(cfg, [2], device)
    requests = requests_for(cfg, rows, vocab, device)
    logits = torch.randn((rows, vocab), generator=torch.Generator().manual_seed(0)).to(device)
    positions = list(range(rows))
    clock = time.perf_counter if device.type == "cuda" else time.process_time
    times = []
    for step in range(steps + 3):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = clock()
        sampled = sampler(logits, positions, requests)
        host = sampled.for_host()
        if requests[0].matcher is not None:
            take_tokens(requests, host[0].tolist())
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step >= 3:
            times.append((clock() - start) * 1e3)
        for request in requests:
            request.generated.append(0)  # a completion one token longer: min_tokens passes, as in a job
    return statistics.median(times)


def grammar_parts(rows: int, vocab: int, steps: int) -> dict[str, float]:
    """Median CPU ms per step of a greedy grammar step's parts (CPU): the matchers filling the bitmask, the mask
    applied, the argmax, the matchers taking their tokens."""
    from distgen.engine.grammar import apply_bitmask, step_bitmask
    requests = requests_for(GenerationConfig(**SETTINGS["greedy, json_schema"]), rows, vocab, torch.device("cpu"))
    logits = torch.randn((rows, vocab), generator=torch.Generator().manual_seed(0))
    parts: dict[str, list[float]] = {"fill": [], "apply": [], "argmax": [], "take": []}
    for step in range(steps + 3):
        marks = [time.process_time()]
        masked, bitmask = step_bitmask([r.matcher for r in requests], vocab)
        marks.append(time.process_time())
        chosen = logits.clone()
        marks.append(time.process_time())
        apply_bitmask(chosen, bitmask, masked)
        marks.append(time.process_time())
        tokens = chosen.argmax(-1).tolist()
        marks.append(time.process_time())
        take_tokens(requests, tokens)
        marks.append(time.process_time())
        if step >= 3:
            for part, took in zip(parts, (marks[1] - marks[0], marks[3] - marks[2], marks[4] - marks[3],
                                          marks[5] - marks[4])):
                parts[part].append(took * 1e3)
    return {part: statistics.median(values) for part, values in parts.items()}


def engine_seconds(model, tokenizer, prompts, settings: dict, batch_size: int) -> tuple[float, int, int]:
    """One in-process engine over `prompts` (slot cache, no EOS): (generation CPU seconds of this process: the box is
    shared, and wall time counts the others' work; forward steps; tokens)."""
    from distgen.engine import build_engine
    from distgen.parallel.loop import run_loop
    queue = [(Prompt(i, i, p.text, p.budget), tokenizer(p.text)["input_ids"]) for i, p in enumerate(prompts)]
    cfg = GenerationConfig(max_new_tokens=128, batch_size=batch_size, cache="static", compile="off", seed=0,
                           **settings)
    grammar = {"tokenizer": tokenizer} if "json_schema" in settings else {}  # older checkouts take no tokenizer
    engine = build_engine(model, queue, cfg, tokenizer.pad_token_id, [], torch.device("cpu"), **grammar)
    done = []
    start = time.process_time()
    with torch.no_grad():
        counters = run_loop(engine, lockstep=False, idle_step=lambda: None, device=torch.device("cpu"),
                            on_finished=done.extend)
    return time.process_time() - start, counters.forward_steps, sum(len(c.token_ids) for c in done)


def time_engine(args) -> None:
    """ms per engine step of each setting on a benchmark model, the settings alternating over --repeats."""
    from bench.common import MODELS, make_prompts, save_model
    from distgen.models.tiny import build_tokenizer
    from transformers import AutoModelForCausalLM
    folder = save_model(args.engine, REPO / ".cache" / "bench-sampling" / args.engine)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tokenizer = build_tokenizer()
    prompts = make_prompts(args.prompts, 0)
    names = args.only or [name for name in SETTINGS if all(hasattr(GenerationConfig(), k) for k in SETTINGS[name])]
    runs: dict[str, list[tuple[float, int, int]]] = {name: [] for name in names}
    engine_seconds(model, tokenizer, prompts[:4], SETTINGS[names[0]], args.batch_size)  # warm-up: kernels, allocator
    for repeat in range(args.repeats):
        for name in names if repeat % 2 == 0 else reversed(names):
            runs[name].append(engine_seconds(model, tokenizer, prompts, SETTINGS[name], args.batch_size))
    print(f"engine steps: model {args.engine} ({MODELS[args.engine].describe()}), distgen from {TREE}, "
          f"{args.prompts} prompts, budgets 16-128, batch {args.batch_size}, cache=static, no EOS, "
          f"{torch.get_num_threads()} thread(s); median of {args.repeats}, settings alternating\n")
    print("| setting | CPU ms per step | gen tok per CPU s | steps | tokens |")
    print("|---|---|---|---|---|")
    for name in names:
        seconds, steps, tokens = (statistics.median(values) for values in zip(*runs[name]))
        per_step = statistics.median(s / n * 1e3 for s, n, _ in runs[name])
        print(f"| {name} | {per_step:.2f} | {tokens / seconds:.1f} | {steps:.0f} | {tokens:.0f} |", flush=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[4, 16, 64])
    parser.add_argument("--vocab", type=int, nargs="+", default=[259, 32000, 151936])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--engine", default=None, help="time engine steps on this bench/common.py model instead")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", nargs="+", default=None, choices=list(SETTINGS))
    parser.add_argument("--tree", default=None, help="the checkout whose distgen is timed (default: this one)")
    parser.add_argument("--grammar-parts", action="store_true", help="a greedy json_schema step's parts (CPU)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.engine:
        return time_engine(args)
    if args.grammar_parts:
        print(f"greedy json_schema step, CPU ms (median of {args.steps}), {torch.get_num_threads()} thread(s)\n")
        print("| rows | vocab | fill bitmask | apply mask | argmax | matchers take tokens |\n|---|---|---|---|---|---|")
        for vocab in args.vocab:
            for rows in args.rows:
                parts = grammar_parts(rows, vocab, args.steps)
                print(f"| {rows} | {vocab} | " + " | ".join(f"{v:.3f}" for v in parts.values()) + " |", flush=True)
        return None
    device = torch.device(args.device)
    print(f"sampler ms per step (median of {args.steps}; {'wall' if device.type == 'cuda' else 'CPU'} time), {device}, "
          f"{torch.get_num_threads()} thread(s), torch {torch.__version__}\n")
    names = args.only or list(SETTINGS)
    print("| rows | vocab | " + " | ".join(names) + " |")
    print("|---|---|" + "---|" * len(names))
    with torch.no_grad():
        for vocab in args.vocab:
            for rows in args.rows:
                cells = [f"{time_setting(name, rows, vocab, args.steps, device):.3f}" for name in names]
                print(f"| {rows} | {vocab} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
