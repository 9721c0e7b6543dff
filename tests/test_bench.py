"""CPU tests of the benchmark suite: row format and files, compare mode, crossover, plotting from saved rows,
the CPU fallback, the kernels-suite folding of missing/broken modules, and the GPU suites' code run on
tiny shapes with the reference ops (timers replaced by wall clocks). No speed is asserted anywhere."""
from __future__ import annotations

import dataclasses
import json
import sys
import types

import pytest
import torch

from bench import compare as compare_mod
from bench import cpu, e2e, kernels, mixers, profiling, timing
from bench import rows as R
from bench.__main__ import main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _mixer_rows(attn_ms: dict[int, float], mixer_ms: dict[int, float], phase="prefill", batch=1, provider="sdpa-flash"):
    out = []
    for L, ms in attn_ms.items():
        out.append(R.make_row("mixers", "attention_layer", provider, stats={"p20": ms * 0.9, "p50": ms, "p80": ms * 1.1},
                              phase=phase, batch=batch, seqlen=L, shape=f"b{batch} L{L}", tokens_per_s=batch * L / ms,
                              pct_of_floor=50.0))
    for L, ms in mixer_ms.items():
        out.append(R.make_row("mixers", "mixer_layer", "apriel", stats={"p20": ms * 0.9, "p50": ms, "p80": ms * 1.1},
                              phase=phase, batch=batch, seqlen=L, shape=f"b{batch} L{L}", tokens_per_s=batch * L / ms,
                              pct_of_floor=40.0))
    return out


# ------------------------------------------------------------------------------------------------ rows
def test_row_fields_rates_and_validation():
    row = R.make_row("mixers", "mixer_layer", "apriel", stats={"p20": 1.0, "p50": 2.0, "p80": 3.0}, batch=1, seqlen=1024)
    R.add_rates(row, flops=4e12, nbytes=2e9, tokens=1024, floor_ms=1.0)
    assert row["tflop_s"] == pytest.approx(2000.0)
    assert row["gb_per_s"] == pytest.approx(1000.0)
    assert row["tokens_per_s"] == pytest.approx(512_000.0)
    assert row["pct_of_floor"] == pytest.approx(50.0)
    R.validate(row)
    with pytest.raises(ValueError, match="p20 <= p50 <= p80"):
        R.validate({**row, "p20_ms": 5.0})
    with pytest.raises(ValueError, match="missing required key 'provider'"):
        R.validate({"suite": "x", "op": "y", "status": "ok"})
    with pytest.raises(ValueError, match="status"):
        R.make_row("mixers", "op", "p", status="fine")


def test_normalize_converts_microsecond_rows_and_keeps_their_keys():
    row = R.normalize({"op": "mixer_step", "provider": "apriel", "p20_us": 3.0, "p50_us": 4.0, "p80_us": 5.0,
                       "floor_us": 2.0, "state_dtype": "fp32", "shape": {"batch": 16}}, suite="kernels")
    assert (row["p20_ms"], row["p50_ms"], row["p80_ms"]) == (0.003, 0.004, 0.005)
    assert row["pct_of_floor"] == pytest.approx(50.0)
    assert row["suite"] == "kernels" and row["status"] == "ok" and row["state_dtype"] == "fp32"
    assert json.loads(row["shape"]) == {"batch": 16}


def test_json_and_csv_round_trip_with_environment(tmp_path):
    env = R.environment()
    assert set(R.ENV_FIELDS) <= set(env) and env["timestamp"].endswith("Z")
    rows = R.stamp(_mixer_rows({1024: 2.0}, {1024: 1.5}) + [R.unavailable("kernels", "scan", "mamba-ssm", "not installed")], env)
    R.write_json(tmp_path / "rows.json", rows, {"note": "meta kept"})
    R.write_csv(tmp_path / "rows.csv", rows)
    back_json, meta = R.read_rows(tmp_path / "rows.json")
    back_csv, _ = R.read_rows(tmp_path / "rows.csv")
    assert meta == {"note": "meta kept"}
    for back in (back_json, back_csv):
        assert len(back) == 3
        assert back[0]["p50_ms"] == pytest.approx(2.0) and back[0]["seqlen"] == 1024
        assert back[0]["gpu"] == env["gpu"] and back[0]["commit"] == env["commit"]
        assert back[2]["status"] == "not available" and back[2]["note"] == "not installed"
    header = (tmp_path / "rows.csv").read_text().splitlines()[0].split(",")
    assert header[: len(R.CORE_FIELDS)] == list(R.CORE_FIELDS)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        R.read_rows(tmp_path / "missing.json")


@pytest.mark.parametrize("commit", ["965e05702056", "1234567", "0012abc-dirty"])
def test_csv_keeps_text_columns_that_look_like_numbers(tmp_path, commit):
    # CI once failed on a HEAD whose short hash reads as a float (965e05702056 -> inf)
    env = {**R.environment(), "commit": commit, "cuda": "13.0"}
    R.write_csv(tmp_path / "rows.csv", R.stamp(_mixer_rows({1024: 2.0}, {1024: 1.5}), env))
    back, _ = R.read_rows(tmp_path / "rows.csv")
    assert back[0]["commit"] == commit and back[0]["cuda"] == "13.0"
    assert back[0]["seqlen"] == 1024 and back[0]["p50_ms"] == pytest.approx(2.0)  # numbers still parse


# --------------------------------------------------------------------------------------------- compare
def test_compare_ratios_match_rows_by_key(tmp_path, capsys):
    old = _mixer_rows({1024: 2.0, 2048: 4.0}, {1024: 1.0})
    new = _mixer_rows({1024: 1.0, 4096: 9.0}, {1024: 2.0})
    ratios = compare_mod.compare(new, old)
    by = {(r["op"], r["shape"]): r["speedup"] for r in ratios}
    assert by == {("attention_layer", "b1 L1024"): pytest.approx(2.0), ("mixer_layer", "b1 L1024"): pytest.approx(0.5)}
    assert compare_mod.unmatched(new, old) == (1, 1)
    R.write_json(tmp_path / "new.json", new)
    R.write_json(tmp_path / "old.json", old)
    assert main(["compare", str(tmp_path / "new.json"), str(tmp_path / "old.json")]) == 0
    out = capsys.readouterr().out
    assert "2.00x" in out and "0.50x" in out


def test_compare_higher_is_better_metrics():
    old = [R.make_row("e2e", "model_decode", "bench-stack", layout="H1-30", shape="b8 L16384", tokens_per_s=100.0)]
    new = [R.make_row("e2e", "model_decode", "bench-stack", layout="H1-30", shape="b8 L16384", tokens_per_s=150.0)]
    (r,) = compare_mod.compare(new, old)
    assert r["metric"] == "tokens_per_s" and r["speedup"] == pytest.approx(1.5)


# ------------------------------------------------------------------------------------------- crossover
def test_crossover_interpolates_between_measured_lengths():
    # attention time grows with L, mixer is flat: ratio crosses 1 between 2048 (0.5) and 8192 (2.0) -> 4096
    c = mixers.crossover({2048: 1.0, 8192: 4.0}, {2048: 2.0, 8192: 2.0})
    assert c["crossover_L"] == 8192 and c["interp_L"] == 4096
    assert mixers.crossover({1024: 3.0}, {1024: 1.0})["verdict"].startswith("mixer faster at every")
    assert mixers.crossover({1024: 1.0, 2048: 1.0}, {1024: 2.0, 2048: 2.0})["crossover_L"] is None
    # a win at a small L followed by a loss does not count as the crossover
    c = mixers.crossover({1024: 2.0, 2048: 1.0, 4096: 3.0}, {1024: 1.0, 2048: 2.0, 4096: 1.0})
    assert c["crossover_L"] == 4096


def test_crossovers_per_phase_batch_and_best_attention():
    rows = _mixer_rows({2048: 1.0, 8192: 4.0}, {2048: 2.0, 8192: 2.0}, batch=16)
    rows += _mixer_rows({2048: 0.5, 8192: 1.0}, {}, batch=16, provider="sdpa-cudnn")
    got = {(c["batch"], c["vs"]): c["crossover_L"] for c in mixers.crossovers(rows)}
    assert got == {(16, "sdpa-flash"): 8192, (16, "sdpa-cudnn"): None, (16, "best-attention"): None}


# ------------------------------------------------------------------------------------------------ plots
def _synthetic_run():
    rows = []
    for phase, b in (("prefill", 1), ("decode", 16)):
        rows += _mixer_rows({1024: 1.0, 4096: 5.0, 16384: 40.0}, {1024: 2.0, 4096: 6.0, 16384: 20.0}, phase=phase, batch=b)
    rows.append(R.make_row("kernels", "mixer_scan_fwd", "apriel", stats={"p20": 0.1, "p50": 0.2, "p80": 0.3},
                           shape="b1 L8192", pct_of_floor=70.0))
    for layout, tps in (("all-attention", 100.0), ("H1-30", 230.0)):
        for b in (1, 16):
            rows.append(R.make_row("e2e", "model_decode", "bench-stack", stats={"p20": 1, "p50": 1, "p80": 1}, layout=layout,
                                   phase="decode", batch=b, seqlen=16384, tokens_per_s=tps * b))
        rows.append(R.make_row("e2e", "model_prefill", "bench-stack", stats={"p20": 1, "p50": 9.0, "p80": 10}, layout=layout,
                               phase="prefill", batch=1, seqlen=4096))
    return R.stamp(rows, R.environment())


def test_plots_from_saved_rows(tmp_path):
    R.write_json(tmp_path / "rows.json", _synthetic_run())
    assert main(["plot", str(tmp_path / "rows.json"), "--out", str(tmp_path / "plots")]) == 0
    names = sorted(p.name for p in (tmp_path / "plots").iterdir())
    assert names == ["e2e.png", "roofline.png", "speedup_vs_context.png", "throughput_vs_context.png"]
    for name in names:
        data = (tmp_path / "plots" / name).read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 10_000


def test_plots_skip_figures_without_data(tmp_path):
    from bench.plots import make_plots

    only_e2e = [r for r in _synthetic_run() if r["suite"] == "e2e"]
    assert [p.name for p in make_plots(only_e2e, tmp_path)] == ["e2e.png"]


# --------------------------------------------------------------------------------------- CPU fallback
def test_cpu_fallback_runs_reference_ops_and_says_so(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["all", "--quick", "--out", str(tmp_path), "--no-plots"]) == 0
    rows, meta = R.read_rows(tmp_path / "rows.json")
    assert meta["cpu_fallback"] is True and meta["suites"] == ["kernels", "mixers", "e2e"]
    ok = [r for r in rows if r["status"] == "ok" and r["suite"] in ("kernels", "mixers") and r["op"] != "crossover"]
    assert {r["provider"] for r in ok} == {cpu.PROVIDER}
    assert {r["op"] for r in ok} >= {"mixer_scan_fwd", "causal_conv1d_fwd", "mixer_step", "attention_layer", "mixer_layer"}
    assert all("CPU fallback" in r["note"] and r["p50_ms"] > 0 for r in ok)
    (e2e_row,) = [r for r in rows if r["suite"] == "e2e"]
    assert e2e_row["status"] == "not available"
    assert (tmp_path / "rows.csv").exists()


# ------------------------------------------------------------------------ GPU suites' code on tiny shapes
TINY_MODEL = e2e.ModelShape(name="tiny", layer=cpu.TINY, n_layers=4, intermediate=128, vocab=256)


@pytest.fixture
def cpu_suite(monkeypatch):
    """Run the GPU suites' code on the CPU: reference ops, wall-clock timers, a fake ceiling."""
    monkeypatch.setattr(mixers, "DEVICE", "cpu")
    wall = lambda fn, *a, **k: cpu.time_cpu_ms(fn, reps=2)
    for name in ("time_ms", "time_auto_ms", "time_long_ms", "time_graph_ms"):
        monkeypatch.setattr(timing, name, wall)
    from bench.ceilings import Ceilings

    return Ceilings(copy_bytes_per_s=3e12, gemm_bf16_flops=7e14, exp2_per_s=3.8e12, sm_count=132, gpu="fake")


def test_mixers_suite_code_on_tiny_shapes(cpu_suite):
    rows = mixers.run(ceilings=cpu_suite, shape=cpu.TINY, batches=(1, 2), providers=("sdpa", "apriel"), seqlens=(16, 32))
    assert [r for r in rows if r["status"] != "ok"] == []
    assert len(rows) == 2 * 2 * 2 * 2  # phase x batch x L x provider
    for r in rows:
        R.validate(r)
        assert r["floor_ms"] > 0 and r["pct_of_floor"] > 0 and r["tokens_per_s"] > 0
    summaries = mixers.crossovers(rows)
    assert {(c["phase"], c["batch"]) for c in summaries} == {("prefill", 1), ("prefill", 2), ("decode", 1), ("decode", 2)}


def test_mixers_suite_reports_a_failing_provider_as_an_error_row(cpu_suite):
    rows = mixers.run(ceilings=cpu_suite, shape=cpu.TINY, batches=(1,), providers=("no-such-attention", "apriel"), seqlens=(16,))
    bad = [r for r in rows if r["provider"] == "no-such-attention"]
    assert bad and all(r["status"] == "error" and "provider" in r["note"] for r in bad)
    assert all(r["status"] == "ok" for r in rows if r["provider"] == "apriel")


def test_e2e_stack_code_on_a_tiny_model(cpu_suite, monkeypatch):
    monkeypatch.setattr(e2e, "_free_bytes", lambda: 4 << 20)
    monkeypatch.setattr(e2e, "plan", lambda quick: {"prefill": (16,), "context": 256, "batches": (1,), "contexts": (16,),
                                                      "reserve": 1 << 19})
    rows = e2e.run(ceilings=cpu_suite, model=TINY_MODEL, engine=False)
    assert [r for r in rows if r["status"] not in ("ok",)] == []
    layouts = TINY_MODEL.layouts()
    assert [layouts["H1-30"].count("m2"), layouts["H1-40"].count("m2")] == [2, 3]
    mem = {r["layout"]: r for r in rows if r["op"] == "memory_per_sequence"}
    assert mem["all-attention"]["mib_per_seq"] > mem["H1-30"]["mib_per_seq"] > mem["H1-40"]["mib_per_seq"]
    assert mem["H1-40"]["max_batch"] > mem["all-attention"]["max_batch"] >= 1
    decode = [r for r in rows if r["op"] == "model_decode"]
    assert {r["layout"] for r in decode} == {"all-attention", "H1-30", "H1-40"}
    assert all(r["tokens_per_s"] > 0 and r["pct_of_floor"] > 0 for r in decode)
    assert any(r.get("at_max_batch") for r in decode)
    assert any(r["op"] == "decode_speedup" for r in rows)
    assert {r["layout"] for r in rows if r["op"] == "model_prefill"} == {"all-attention", "H1-30", "H1-40"}
    assert all(r["pct_of_floor"] > 0 and r["ttft_ms"] == r["p50_ms"] for r in rows if r["op"] == "model_prefill")


def test_e2e_engine_rows_not_available_without_the_script(monkeypatch, tmp_path):
    monkeypatch.setattr(e2e, "_e2e_decode_path", lambda: tmp_path / "absent.py")
    (row,) = e2e.engine_rows(quick=True)
    assert row["status"] == "not available" and "e2e_decode.py" in row["note"]


# -------------------------------------------------------------------------------------- kernels suite
def test_kernels_suite_folds_missing_broken_and_working_modules(monkeypatch):
    good = types.ModuleType("bench._fake_good")
    good.run = lambda quick=False, ceilings=None: [{"op": "mixer_step", "provider": "apriel", "p20_us": 4.0, "p50_us": 5.0,
                                                    "p80_us": 6.0, "bytes": 5e6, "quick": quick, "got": ceilings.gpu}]
    broken = types.ModuleType("bench._fake_broken")

    def boom(quick=False):
        raise RuntimeError("kernel exploded")

    broken.run = boom
    monkeypatch.setitem(sys.modules, "bench._fake_good", good)
    monkeypatch.setitem(sys.modules, "bench._fake_broken", broken)
    monkeypatch.setattr(kernels, "MODULES", {"step": "bench._fake_good", "scan": "bench._fake_broken",
                                             "conv1d": "bench._not_written_yet"})
    from bench.ceilings import Ceilings

    ceil = Ceilings(copy_bytes_per_s=2e12, gemm_bf16_flops=7e14, exp2_per_s=3.8e12, sm_count=132, gpu="fake")
    rows = {r["family"] if "family" in r else r["op"]: r for r in kernels.run(quick=True, ceilings=ceil)}
    assert rows["step"]["p50_ms"] == pytest.approx(0.005) and rows["step"]["quick"] is True and rows["step"]["got"] == "fake"
    assert rows["step"]["gb_per_s"] == pytest.approx(1000.0) and rows["step"]["pct_of_copy_bandwidth"] == pytest.approx(50.0)
    assert rows["scan"]["status"] == "error" and "kernel exploded" in rows["scan"]["note"]
    assert rows["conv1d"]["status"] == "not available"


# ------------------------------------------------------------------------------------------- profiling
def test_nsys_command_and_its_absence(monkeypatch, tmp_path):
    monkeypatch.setattr(profiling.shutil, "which", lambda name: None)
    assert profiling.nsys_command(["all", "--nsys"], tmp_path) is None
    monkeypatch.setattr(profiling.shutil, "which", lambda name: "/usr/bin/nsys")
    cmd = profiling.nsys_command(["mixers", "--nsys", "--quick"], tmp_path)
    assert cmd[:4] == ["nsys", "profile", "--capture-range=cudaProfilerApi", "--capture-range-end=stop"]
    assert cmd[-4:] == ["bench", "mixers", "--quick", "--in-process"] and "--nsys" not in cmd


def test_cli_rejects_bad_arguments():
    with pytest.raises(SystemExit):
        main(["nonsense"])
    with pytest.raises(SystemExit):
        main(["plot"])
    with pytest.raises(SystemExit):
        main(["e2e", "--e2e-layers", "0"])


def test_layouts_scale_with_layer_count():
    full = e2e.APRIEL_15B_MODEL.layouts()
    assert [full[k].count("m2") for k in ("all-attention", "H1-30", "H1-40")] == [0, 30, 40]
    ten = dataclasses.replace(e2e.APRIEL_15B_MODEL, n_layers=10).layouts()
    assert [ten[k].count("m2") for k in ("H1-30", "H1-40")] == [6, 8]


def test_mixers_suite_says_not_available_without_the_kernels(monkeypatch):
    from apriel_kernels import _ext

    monkeypatch.setattr(mixers, "DEVICE", "cuda")
    monkeypatch.setattr(_ext, "has_kernel", lambda name: False)
    rows = mixers.run(shape=cpu.TINY, batches=(1,), providers=("apriel",), seqlens=(16,))
    assert [(r["phase"], r["status"]) for r in rows] == [("prefill", "not available"), ("decode", "not available")]
    assert "mixer_scan_fwd" in rows[0]["note"] and "mixer_step" in rows[1]["note"]


def test_units_run_in_child_processes_and_failures_become_rows(tmp_path, monkeypatch):
    """The GPU path: each unit in its own process (here on the CPU fallback); a crashing unit is a row."""
    import argparse

    from bench import __main__ as cli

    monkeypatch.chdir(cli.Path(__file__).resolve().parent.parent)
    args = argparse.Namespace(quick=True, nvtx_layers=False, e2e_layers=None, only=None, skip="")
    good = cli._run_unit("e2e", "stack", args, tmp_path, tmp_path / "absent-ceilings.json")
    assert [(r["suite"], r["status"]) for r in good] == [("e2e", "not available")]
    (tmp_path / "bad.json").write_text("{not json")
    bad = cli._run_unit("e2e", "stack", args, tmp_path, tmp_path / "bad.json")
    assert bad[-1]["status"] == "error" and "exited with 1" in bad[-1]["note"] and "JSONDecodeError" in bad[-1]["note"]
    assert [u for u in cli._units(["kernels", "mixers"], argparse.Namespace(only="step"))] == [
        ("ceilings", None), ("kernels", "step"), ("mixers", None)]
    assert cli._units(["e2e"], argparse.Namespace(only=None)) == [("ceilings", None), ("e2e", "stack"), ("e2e", "engine")]
    assert cli._units(["kernels", "e2e"], argparse.Namespace(only=None, skip="kernels,e2e:engine")) == [
        ("ceilings", None), ("e2e", "stack")]


def test_report_from_saved_rows(tmp_path, capsys):
    R.write_json(tmp_path / "rows.json", _synthetic_run(), {"wall_s": {"total": 1.0}})
    assert main(["report", str(tmp_path / "rows.json")]) == 0
    out = capsys.readouterr().out
    assert "crossover" in out and "mixer faster from L~" in out and "wall seconds" in out


def test_markdown_summary_from_saved_rows(tmp_path, capsys):
    R.write_json(tmp_path / "rows.json", _synthetic_run(), {"ceilings": {"copy_gb_per_s": 3000.0, "gemm_bf16_tflop_s": 740.0,
                                                                        "exp2_t_per_s": 3.8}})
    assert main(["report", str(tmp_path / "rows.json"), "--markdown"]) == 0
    out = capsys.readouterr().out
    assert "| phase | batch | vs |" in out and "copy 3000 GB/s" in out and "**Whole model (e2e)**" in out


def test_engine_rows_fold_the_scripts_output_and_keep_partial_rows(monkeypatch, tmp_path):
    script = tmp_path / "bench" / "e2e_decode.py"
    script.parent.mkdir()
    (tmp_path / "bench" / "__init__.py").write_text("")
    script.write_text(
        "import argparse, json, sys\n"
        "p = argparse.ArgumentParser(); p.add_argument('--out'); p.add_argument('--quick', action='store_true')\n"
        "a = p.parse_args()\n"
        "json.dump([{'op': 'model_decode', 'layout': 'H1-30', 'context': 4096, 'p50_ms': 2.0, 'tokens_per_s': 8.0,\n"
        "            'quick': a.quick}], open(a.out, 'w'))\n"
        "sys.exit(3)\n")
    monkeypatch.setattr(e2e, "_e2e_decode_path", lambda: script)
    monkeypatch.setattr(e2e.importlib.util, "find_spec", lambda name: object())
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    rows = e2e.engine_rows(quick=True, timeout_s=60)
    assert rows[0]["provider"] == "apriel_model-engine" and rows[0]["seqlen"] == 4096 and rows[0]["quick"] is True
    assert rows[0]["status"] == "ok" and rows[-1]["status"] == "error" and "exited 3" in rows[-1]["note"]


def test_torch_trace_fallback_writes_a_chrome_trace(tmp_path):
    a = torch.randn(64, 64)
    path = profiling.torch_trace(lambda: a @ a, tmp_path / "trace_mm.json", calls=2)
    assert "traceEvents" in json.loads(path.read_text())
    with profiling.nvtx("cpu/no-op"), profiling.measured_region(), profiling.layer_range("layer00/t"):
        pass  # NVTX and profiler ranges are free no-ops without a GPU
