"""The peers benchmark's plumbing (bench/peers.py): the equality check, the cost floor, the EOS
set, the table, and one real run on the small model with 4 prompts. Speed is never asserted;
vLLM is left out (its venv is made by bench/setup_peers.sh, not by the test setup), and the HF
systems run in the distgen venv, which has the same torch and transformers."""
from __future__ import annotations

import json
import sys

import pytest

from bench.peers import DISTGEN_BEST, SYSTEMS, distgen_settings
from bench.peers import main as peers_main
from bench.peers_report import (Equality, check_equality, choose_eos_ids, end_on, first_divergence, floor_seconds,
                                markdown_table, replace_block, run_figures)


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
    rows = [{"system": "distgen", "equality": Equality(4), "figures": base},
            {"system": "other", "equality": Equality(3, mismatched=[2]),
             "figures": {**base, "gen_tok_s": 50.0, "floor_fraction": 0.75}}]
    table = markdown_table(rows, "distgen")
    lines = table.splitlines()
    assert lines[0].startswith("| system | same tokens | gen tok/s (x distgen)")
    assert "| distgen | 4/4 | 100.0 (1.00x) |" in lines[2]
    assert "| other | 3/4 (1 DIFFER) | 50.0 (0.50x) |" in lines[3] and lines[3].endswith("| 0.75 |")
    assert "The comparison is unfair**: other" in table


def test_peers_runs_distgen_and_hf_systems_on_the_small_model(tmp_path):
    """4 prompts through the floor, distgen, HF static batches and HF continuous batching: every
    system's greedy tokens equal the batch-1 reference, and the table, JSON and chart are written."""
    systems = ["distgen", "hf generate, static sorted", "hf continuous batching"]
    results = peers_main(["--models", "small", "--datasets", "mixed", "--systems", *systems, "--prompts", "4",
                          "--min-new", "4", "--max-new", "12", "--batch-size", "2", "--repeats", "1",
                          "--python", f"hf={sys.executable}", "--work", str(tmp_path / "work"),
                          "--out", str(tmp_path / "results"), "--timeout", "600"])
    rows = {row["system"]: row for row in results["small-mixed"]["rows"]}
    assert not results["small-mixed"]["failures"]
    for name in systems:
        equality = rows[name]["equality"]
        assert (equality.same, equality.ties, equality.mismatched) == (4, [], []), name
        figures = rows[name]["figures"]
        assert figures["gen_tok_s"] > 0 and figures["floor_fraction"] > 0
        assert 0 < figures["startup_s"] <= figures["first_output_s"] <= figures["end_to_end_s"], (name, figures)
    reference = results["small-mixed"]["reference"]
    assert len(reference) == 4 and all(4 <= len(tokens) <= 12 for tokens in reference)
    table = (tmp_path / "results" / "peers.md").read_text()
    assert all(f"| {name} | 4/4 |" in table for name in systems)
    saved = json.loads((tmp_path / "results" / "peers.json").read_text())
    assert saved["jobs"]["small-mixed"]["equality"]["distgen"] == "4/4"
    assert (tmp_path / "results" / "peers.png").read_bytes()[:4] == b"\x89PNG"


def test_a_distgen_system_setting_replaces_the_best_settings_key():
    compiled = next(s for s in SYSTEMS if s.name == "distgen compiled")
    settings = distgen_settings(compiled)
    assert "generation.compile=on" in settings and "generation.compile=auto" not in settings
    assert len(settings) == len(DISTGEN_BEST) and distgen_settings(SYSTEMS[0]) == DISTGEN_BEST


def test_replace_block_swaps_only_what_lies_between_the_markers():
    text = "intro\n<!-- peers-table -->\nold\n<!-- /peers-table -->\nafter\n"
    expected = "intro\n<!-- peers-table -->\nnew table\n<!-- /peers-table -->\nafter\n"
    assert replace_block(text, "new table\n") == expected
    with pytest.raises(ValueError, match="markers"):
        replace_block("no markers", "x")
