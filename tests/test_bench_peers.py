"""The bench harness (bench/common.py, bench/report.py, bench/peers.py, bench/configs.py): every system
starts under the same core binding and threads; every run records its process tree's CPU seconds, the load
before and after and the load from elsewhere; a loaded run is marked and kept out of medians and headlines;
the equality check, the cost floor, the EOS set and the tables; and real runs of distgen and the HF
systems on a small model with 4 prompts. Speed is never asserted. vLLM is left out (its venv is made by
bench/setup_peers.sh, not by the test setup): its command line is built, never started; the HF systems run
in the distgen venv, which has the same torch and transformers."""
from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest

from bench.common import (LOADED_ABOVE, Binding, DistgenWatch, Launch, Usage, bench_env, core_list, make_prompts,
                          other_load, parse_cores, run_measured)
from bench.configs import SUITES, chosen
from bench.configs import main as configs_main
from bench.peers import DISTGEN_BEST, FLOOR, SYSTEMS, Job, alternating, distgen_settings, plan
from bench.peers import main as peers_main
from bench.report import (Equality, Run, check_equality, choose_eos_ids, end_on, first_divergence, floor_seconds,
                          headline, markdown_table, median_figures, pair_ratios, run_figures, usage_table)

THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "BENCH_THREADS")


def fake_job(tmp_path: Path) -> Job:
    prompts = make_prompts(3, seed=1)
    return Job("small-mixed", tmp_path / "model", prompts, [[1, 5, 6]] * 3, [], 2, tmp_path)


def usage(other: float, cpu_s: float = 5.0) -> dict:
    return Usage(wall_s=10.0, cpu_s=cpu_s, peak_rss_mib=100.0, load_before=0.2, load_after=1.1, other_load=other,
                 affinity="0").record()


# ---------------------------------------------------------------- one binding for every system

@pytest.mark.parametrize("binding", [Binding(2, "0-1"), Binding(2, None)], ids=["taskset 0-1", "no binding"])
def test_every_system_starts_with_the_same_binding_and_threads(tmp_path, binding):
    """distgen (1 and 2 ranks), the floor, both HF systems and vLLM: the same taskset prefix (or none for
    all), the same threads per process tree (a 2-rank system splits them), vLLM's OpenMP threads bound to
    the same cores; the environments differ in nothing else."""
    job = fake_job(tmp_path)
    pythons = {"hf": sys.executable, "vllm": "/no/vllm/venv/bin/python"}  # built, never started
    plans = {s.name: (s, plan(s, job, s.name.replace(" ", "_"), binding, pythons)) for s in [*SYSTEMS, FLOOR]}
    assert {"distgen", "distgen 2x fsdp", "hf generate", "hf continuous batching", "vllm", "floor"} <= set(plans)
    reference = bench_env(binding)
    for name, (system, launch) in plans.items():
        prefix = ["taskset", "-c", "0-1"] if binding.cores else []
        assert launch.command[:len(prefix)] == prefix, name
        assert "taskset" not in launch.command[len(prefix):], name
        threads = {launch.env[var] for var in THREAD_VARS}
        assert threads == {str(binding.threads // system.ranks)}, (name, threads)
        assert launch.env["VLLM_CPU_OMP_THREADS_BIND"] == (binding.cores or "nobind"), name
        others = {k: v for k, v in launch.env.items() if k not in THREAD_VARS}
        assert others == {k: v for k, v in reference.items() if k not in THREAD_VARS}, name
    assert plans["vllm"][1].command[len(prefix)] == pythons["vllm"]
    assert "launcher.nproc_per_node=2" in plans["distgen 2x fsdp"][1].command


def test_binding_defaults_and_refusals():
    assert Binding.make(None, None) == Binding(1, "0")
    assert Binding.make(None, "none") == Binding(1, None)
    assert Binding.make(4, "none") == Binding(4, None)
    assert parse_cores("0,2-3") == [0, 2, 3] and core_list([0, 2, 3, 5]) == "0,2-3,5"
    with pytest.raises(ValueError, match="one thread per core"):
        Binding.make(3, "0")
    with pytest.raises(ValueError, match="core list"):
        parse_cores("a-b")
    with pytest.raises(ValueError, match="this machine has cores"):
        Binding.make(None, str(os.cpu_count()))
    with pytest.raises(ValueError, match="2 ranks cannot share 1 thread"):
        Binding(1, "0").per_rank(2)
    assert Binding(1, "0").command(["python", "x.py"]) == ["taskset", "-c", "0", "python", "x.py"]
    assert Binding(1, None).command(["python", "x.py"]) == ["python", "x.py"]


def test_peers_refuses_a_system_whose_ranks_cannot_share_the_threads(capsys):
    with pytest.raises(SystemExit):
        peers_main(["--systems", "distgen 2x replicate", "--cores", "0"])
    assert "2 ranks cannot share 1 thread" in capsys.readouterr().err


def test_repeats_alternate_the_order():
    systems = SYSTEMS[:3]
    assert alternating(systems, 0) == list(systems) and alternating(systems, 1) == list(reversed(systems))


# ---------------------------------------------------------------- what a run records

@pytest.mark.skipif(shutil.which("taskset") is None, reason="taskset (util-linux) is not installed")
def test_run_measured_counts_the_whole_tree_and_the_load(tmp_path):
    """A parent that burns 0.3 CPU s and waits for a child that burns 0.4: the tree's CPU seconds hold
    both (whatever else loads the machine: CPU time, not wall time), the cores are the binding's, and the
    load fields are there."""
    burn = "import time\nwhile time.process_time() < {}: pass\n"
    script = (f"import subprocess, sys\nchild = subprocess.Popen([sys.executable, '-c', {burn.format(0.4)!r}])\n"
              f"{burn.format(0.3)}child.wait()\n")
    binding = Binding(1, "0")
    measured = run_measured(Launch(binding.command([sys.executable, "-c", script]), bench_env(binding),
                                   tmp_path / "burn.log"), timeout_s=120)
    u = measured.usage
    assert u.cpu_s >= 0.7 and u.wall_s >= u.cpu_s * 0.9, u  # one core: the tree cannot outrun the wall
    assert u.affinity == "0" and 0 < u.cores_used <= 1.05, u
    assert u.load_before >= 0 and u.load_after >= 0 and u.other_load >= 0, u
    record = u.record()
    assert {"wall_s", "cpu_s", "peak_rss_mib", "load_before", "load_after", "other_load", "affinity", "cores_used",
            "loaded"} <= set(record)
    with pytest.raises(RuntimeError, match="exited 3"):
        run_measured(Launch([sys.executable, "-c", "raise SystemExit(3)"], dict(os.environ), tmp_path / "x.log"), 60)


def test_load_from_elsewhere_is_the_machine_less_the_run_and_the_harness():
    # 10 busy CPU seconds over 5 s of wall: 4 were the run's tree, 1 this harness's: 1 core elsewhere.
    assert other_load(busy_s=10.0, tree_cpu_s=4.0, harness_cpu_s=1.0, wall_s=5.0) == pytest.approx(1.0)
    assert other_load(busy_s=4.0, tree_cpu_s=4.5, harness_cpu_s=0.1, wall_s=5.0) == 0.0  # clock skew: never < 0
    assert usage(LOADED_ABOVE + 0.01)["loaded"] and not usage(LOADED_ABOVE)["loaded"]


def test_a_loaded_run_is_marked_and_kept_out_of_medians_and_headlines():
    runs = [Run("distgen", 0, {"gen_tok_s": 100.0}, usage(0.1)), Run("vllm", 0, {"gen_tok_s": 120.0}, usage(0.2)),
            Run("vllm", 1, {"gen_tok_s": 60.0}, usage(1.3)), Run("distgen", 1, {"gen_tok_s": 104.0}, usage(0.0)),
            Run("distgen", 2, {"gen_tok_s": 98.0}, usage(0.0)), Run("vllm", 2, {"gen_tok_s": 98.0}, usage(0.0))]
    assert pair_ratios(runs, "vllm", "distgen") == pytest.approx([1.2, 1.0])  # repeat 1 left out
    assert headline(runs, "vllm", "distgen") == ("vllm vs distgen: 1.10x gen_tok_s (median of 2 clean repeat "
                                                 "pair(s) of 3, pairs 1.00x-1.20x)")
    vllm = [run for run in runs if run.system == "vllm"]
    assert median_figures(vllm)["gen_tok_s"] == pytest.approx(109.0)  # 120 and 98; not 60
    rows = [{"system": "distgen", "equality": Equality(3), "runs": [r for r in runs if r.system == "distgen"]},
            {"system": "vllm", "equality": Equality(3), "runs": vllm}]
    table = markdown_table(rows, "distgen")
    assert "| distgen | 3/3 | 3/3 | 100.0 (1.00x) |" in table and "| vllm | 3/3 | 2/3 | 109.0 (1.09x) |" in table
    lines = usage_table(runs).splitlines()
    assert lines[4] == "| 1 | vllm | 60.0 | 10.0 | 5.0 | 0.50 | 0.20 -> 1.10 | 1.30 | **LOADED** |"
    assert sum("**LOADED**" in line for line in lines) == 1
    # Every run of a system loaded: its medians shown, marked, and no headline from them.
    loaded = [Run(r.system, r.repeat, r.figures, usage(2.0)) for r in runs]
    assert headline(loaded, "vllm", "distgen").endswith("no headline: every one of 3 repeat pair(s) had load "
                                                        "from elsewhere")
    assert "| vllm | 3/3 | 0/3 LOADED |" in markdown_table([{**rows[1], "runs": loaded[1::2]}], "distgen")


# ---------------------------------------------------------------- equality, floor, EOS, tables

def test_first_divergence_counts_a_length_difference():
    assert first_divergence([1, 2, 3], [1, 2, 3]) is None
    assert first_divergence([1, 2, 3], [1, 5, 3]) == 1
    assert first_divergence([1, 2, 3], [1, 2]) == 2
    assert first_divergence([1, 2], [1, 2, 7]) == 2


def test_check_equality_excuses_only_a_first_difference_at_a_near_tie():
    reference = [[1, 2, 3]] * 5
    margins = [[5.0, 5.0, 5.0], [5.0, 1e-5, 5.0], [5.0, 5.0, 5.0], [5.0, 5.0, 5.0], [1e-5, 5.0, 5.0]]
    tokens = [[1, 2, 3], [1, 9, 9], [1, 9, 3], [1, 2], [1, 9, 3]]
    equality = check_equality(reference, margins, tokens)
    assert (equality.same, equality.ties, equality.mismatched) == (1, [1], [2, 3, 4])
    assert not equality.fair
    assert equality.summary() == "1/5 (+1 ties) (3 DIFFER)"
    with pytest.raises(ValueError, match="2 completions for 5 prompts"):
        check_equality(reference, margins, tokens[:2])


def test_floor_is_prefill_plus_decode_and_figures_are_ratios_of_it():
    assert floor_seconds({"prefill_s": 1.5, "decode_s": 2.5}) == 4.0
    figures = run_figures(generated=200, prompt_tokens=1000, gen_s=2.0, launch=100.0, ready=103.0,
                          first_output=103.5, done=105.0, peak_mib=512.0, floor_s=4.0)
    assert figures == {"gen_s": 2.0, "gen_tok_s": 100.0, "prompt_tok_s": 500.0, "first_output_s": 3.5,
                       "startup_s": 3.0, "end_to_end_s": 5.0, "peak_mib": 512.0, "floor_fraction": 2.0}


def test_choose_eos_ids_ends_most_sequences_early_at_different_steps():
    reference = [[10 + i, 20 + i, 30 + i, 40 + i, 50 + i, 60 + i, 70 + i, 80 + i] for i in range(8)]
    eos = choose_eos_ids(reference, always=[1], seed=3, early_fraction=0.75)
    assert 1 in eos
    ends = [end_on(seq, set(eos)) for seq in reference]
    assert sum(end < len(seq) for end, seq in zip(ends, reference)) >= 6
    assert len(set(ends)) > 1
    assert choose_eos_ids(reference, always=[1], seed=3) == eos  # seeded


def test_markdown_table_gives_ratios_to_the_base_and_flags_unfair_rows():
    base = {"gen_tok_s": 100.0, "prompt_tok_s": 400.0, "first_output_s": 2.0, "startup_s": 1.0, "peak_mib": 300.0,
            "floor_fraction": 1.5}
    rows = [{"system": "distgen", "equality": Equality(4), "runs": [Run("distgen", 0, base, usage(0.0))]},
            {"system": "other", "equality": Equality(3, mismatched=[2]),
             "runs": [Run("other", 0, {**base, "gen_tok_s": 50.0, "floor_fraction": 0.75}, usage(0.0))]}]
    table = markdown_table(rows, "distgen")
    lines = table.splitlines()
    assert lines[0].startswith("| system | same tokens | clean runs | gen tok/s (x distgen)")
    assert "| distgen | 4/4 | 1/1 | 100.0 (1.00x) |" in lines[2]
    assert "| other | 3/4 (1 DIFFER) | 1/1 | 50.0 (0.50x) |" in lines[3] and lines[3].endswith("| 0.75 |")
    assert "The comparison is unfair**: other" in table
    assert "unfair" not in markdown_table(rows, "distgen", unfair_note=False)


def test_make_prompts_is_seeded_and_keeps_to_its_ranges():
    prompts = make_prompts(20, seed=4, lengths=(8, 40), budgets=(3, 9))
    assert prompts == make_prompts(20, seed=4, lengths=(8, 40), budgets=(3, 9)) != make_prompts(20, seed=5)
    assert all(1 <= len(p.text) <= 40 and 3 <= p.budget <= 9 for p in prompts)
    assert len({p.text for p in prompts}) > 10
    phrase = make_prompts(1, seed=4, lengths=(200, 200), repetitive=True)[0].text
    assert len(set(phrase.split())) <= 4  # a short phrase, repeated


def test_even_prompts_keep_their_shape_whatever_the_seed():
    """bench/gpu.py's job: prompt i's length and budget walk their ranges in strides of 37 and 53."""
    one, other = (make_prompts(30, seed=seed, lengths=(16, 80), budgets=(4, 9), even=True) for seed in (0, 1))
    assert [p.budget for p in one] == [p.budget for p in other] == [4 + (i * 53) % 6 for i in range(30)]
    assert all(16 + (i * 37) % 65 - 1 <= len(p.text) <= 16 + (i * 37) % 65 for i, p in enumerate(one))
    assert [p.text for p in one] != [p.text for p in other]  # the words are still drawn


def test_a_distgen_system_setting_replaces_the_best_settings_key():
    compiled = next(s for s in SYSTEMS if s.name == "distgen compiled")
    settings = distgen_settings(compiled)
    assert "generation.compile=on" in settings and "generation.compile=auto" not in settings
    assert len(settings) == len(DISTGEN_BEST) and distgen_settings(SYSTEMS[0]) == DISTGEN_BEST


def test_every_suite_names_its_configurations_once(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "model.safetensors").write_bytes(b"0" * 3000)
    for suite in SUITES.values():
        names = [config.name for config in suite.configs(model)]
        assert names and len(names) == len(set(names)), suite.name
    assert [c.name for c in chosen(SUITES["engine"], model, ["static, static", "chunked, static"])] == [
        "static, static", "chunked, static"]
    with pytest.raises(SystemExit, match="suite engine has"):
        chosen(SUITES["engine"], model, ["no such"])


# ---------------------------------------------------------------- real runs

def test_peers_runs_distgen_and_hf_systems_on_the_small_model(tmp_path):
    """4 prompts through the floor, distgen, HF generate and HF continuous batching, bound to core 0:
    every system's greedy tokens equal the batch-1 reference; every run's usage (tree CPU seconds, load
    before and after, load from elsewhere, its cores) is in the table, the JSON and the chart."""
    systems = ["distgen", "hf generate", "hf continuous batching"]
    results = peers_main(["--models", "small", "--datasets", "mixed", "--systems", *systems, "--prompts", "4",
                          "--min-new", "4", "--max-new", "12", "--batch-size", "2", "--repeats", "1", "--cores", "0",
                          "--python", f"hf={sys.executable}", "--work", str(tmp_path / "work"),
                          "--out", str(tmp_path / "results"), "--name", "smoke", "--timeout", "600"])
    result = results["small-mixed"]
    assert not result["failures"]
    for name in systems:
        equality = result["equality"][name]
        assert (equality.same, equality.ties, equality.mismatched) == (4, [], []), name
        [run] = [run for run in result["runs"] if run.system == name]
        figures, used = run.figures, run.usage
        assert figures["gen_tok_s"] > 0 and figures["floor_fraction"] > 0
        assert 0 < figures["startup_s"] <= figures["first_output_s"] <= figures["end_to_end_s"], (name, figures)
        assert used["affinity"] == "0" and used["cpu_s"] > 1.0 and used["wall_s"] >= figures["end_to_end_s"], used
    reference = result["reference"]
    assert len(reference) == 4 and all(4 <= len(tokens) <= 12 for tokens in reference)
    table = (tmp_path / "results" / "smoke.md").read_text()
    assert all(f"| {name} | 4/4 |" in table for name in systems)
    assert "binding: taskset -c 0, 1 thread(s)" in table and "VLLM_CPU_OMP_THREADS_BIND=0)" in table
    assert table.count("| 0 | ") == len(systems) + 1  # every run (the floor's too) in the usage table
    saved = json.loads((tmp_path / "results" / "smoke.json").read_text())["jobs"]["small-mixed"]
    assert saved["equality"]["distgen"] == "4/4"
    assert [run["system"] for run in saved["runs"]] == ["floor", *systems]
    assert all({"cpu_s", "load_before", "load_after", "other_load", "loaded"} <= set(run["usage"])
               for run in saved["runs"])
    assert (tmp_path / "results" / "smoke.png").read_bytes()[:4] == b"\x89PNG"


def test_configs_runs_two_engine_settings_and_compares_their_tokens(tmp_path):
    results = configs_main(["engine", "--model", "small", "--prompts", "2", "--repeats", "1", "--cores", "0",
                            "--only", "continuous, static", "continuous, static, torch kernels",
                            "--work", str(tmp_path / "work"), "--out", str(tmp_path / "results")])
    result = results["engine"]
    assert not result["failures"] and [row["equality"].summary() for row in result["rows"]] == ["2/2", "2/2"]
    assert all(run.usage["affinity"] == "0" and run.usage["cpu_s"] > 0 for run in result["runs"])
    table = (tmp_path / "results" / "configs-engine-small.md").read_text()
    assert "| continuous, static, torch kernels | 2/2 |" in table and "load from elsewhere" in table


@pytest.mark.parametrize("line, ready", [(b"distgen: engine: batch_size=4", True),
                                         (b"distgen[rank 0]: engine: batch_size=4", True),
                                         (b"distgen[rank 1]: generation.batch_size=auto picked 7", False)])
def test_the_watch_sees_rank_0s_engine_line_with_or_without_the_rank(line, ready, tmp_path):
    log = tmp_path / "run.log"
    log.write_bytes(b"distgen: launching torchrun ...\n" + line + b"\n")
    watch = DistgenWatch(tmp_path / "out", log)
    watch(5.0)
    assert watch.ready == (5.0 if ready else None)
