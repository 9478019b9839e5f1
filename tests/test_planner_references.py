"""The planner against published runs (references.toml) and the search
features a practitioner sizing a cluster uses: --references, --min-gpus,
--explain, the simpler-layout preference."""

from __future__ import annotations

import json

import pytest
from test_cli import assert_one_line_error, run_main

from scaletrain.planner import references
from scaletrain.planner.hardware import load_catalog


@pytest.fixture(scope="module")
def rows():
    return references.report()


def test_published_throughput_within_20_percent(rows):
    assert len(rows) >= 9
    for r in rows:
        assert abs(r["throughput_error"]) <= 0.20, r


def test_published_memory_within_10_percent(rows):
    with_memory = [r for r in rows if r["published_memory_gib"]]
    assert len(with_memory) >= 2
    for r in with_memory:
        assert abs(r["memory_error"]) <= 0.10, r


def test_held_out_runs_exist_for_every_fitted_device(rows):
    """The fit does not see the held-out rows: each device has some."""
    for gpu in {r["gpu"] for r in rows if not r["held_out"]}:
        assert any(r["held_out"] and r["gpu"] == gpu for r in rows), gpu


def test_catalog_efficiency_is_the_fit_on_the_fit_rows():
    """catalog.toml's efficiency for the fitted devices is what the fit on the
    'fit' rows finds (nobody tuned it by hand towards the held-out rows)."""
    catalog = load_catalog()
    for gpu, params in references.fitted(catalog).items():
        for name, value in params.items():
            assert getattr(catalog[gpu], name) == pytest.approx(value), (gpu, name)


def test_zero_paper_model_states():
    _, zero = references.load_references()
    for row in references.zero_rows(zero):
        assert abs(row["error"]) <= 0.02, row


def test_plan_references_command(capsys):
    code, out, _ = run_main(capsys, ["plan", "--references", "--json"])
    assert code == 0
    data = json.loads(out)
    assert data["summary"]["held_out_max_throughput_error"] <= 0.20
    assert {r["id"] for r in data["runs"]} >= {"tt-h100-l3-8b-8gpu", "tt-a100-l3-70b-full"}


def test_min_gpus_scaling_table(capsys):
    code, out, _ = run_main(capsys, ["plan", "--model", "1b", "--gpu", "rtx-4090", "--gpus-per-node", "4",
                                     "--min-gpus", "--max-gpus", "8", "--seq-len", "2048", "--global-batch", "32",
                                     "--json"])
    assert code == 0
    data = json.loads(out)
    rows = data["rows"]
    assert [r["gpus"] for r in rows] == [1, 2, 4, 8]
    first = next(r for r in rows if r["fits"])
    assert data["min_gpus"] == first["gpus"]
    later = [r for r in rows if r["fits"] and r["gpus"] > first["gpus"]]
    assert later and all(r["speedup"] > 1 and 0 < r["efficiency"] <= 1.05 for r in later)
    for r in later:  # Karp-Flatt agrees with the speedup it came from
        p = r["gpus"] / first["gpus"]
        assert r["speedup"] == pytest.approx(1 / (r["serial_fraction"] + (1 - r["serial_fraction"]) / p))


def test_explain_prints_the_arithmetic(capsys):
    code, out, _ = run_main(capsys, ["plan", "--model", "7b", "--gpus", "8", "--seq-len", "2048",
                                     "--global-batch", "64", "--explain", "1"])
    assert code == 0
    for needle in ("memory per GPU", "compute per step", "gemm", "attention", "exposed", "step ="):
        assert needle in out


def test_preferred_layout_is_simpler_within_the_error(capsys):
    code, out, _ = run_main(capsys, ["plan", "--model", "70b", "--gpus", "64", "--seq-len", "4096",
                                     "--global-batch", "1024", "--json", "--top", "3"])
    assert code == 0
    data = json.loads(out)
    fastest, preferred = data["layouts"][0], data["preferred"]
    assert preferred["layout"]["tokens_per_s"] >= (1 - 0.2) * fastest["tokens_per_s"]
    assert not preferred["layout"]["layout"]["cpu_offload"]  # the fastest offloads; the preferred does not
    assert fastest["layout"]["cpu_offload"] and "no CPU offload" in preferred["reason"]


@pytest.mark.parametrize("args, needle", [
    (["--micro-batch", "3", "--global-batch", "64"], "--micro-batch 3 does not divide --global-batch 64"),
    (["--micro-batch", "0"], "--micro-batch = 0; allowed: 1 or more"),
    (["--explain", "0"], "--explain = 0"),
    (["--min-gpus", "--gpu", "a100-80g:8,v100-32g:8", "--gpus", "16"], "--min-gpus plans one kind"),
])
def test_plan_search_bad_input(capsys, args, needle):
    code, _, err = run_main(capsys, ["plan", "--model", "7b", *args])
    assert_one_line_error(code, err, needle)
