"""`ldm bench` plumbing on tiny models: every group's rows, finite ratios, the JSON schema, the Markdown page.
The measurements themselves are not asserted (they depend on the machine and its load)."""

from __future__ import annotations

import json
import math

import pytest

from ldm.cli import main as ldm_main

pytest.importorskip("diffusers")

ROW_KEYS = {"group", "row", "unit", "ours"}


def test_tiny_bench_writes_every_row_and_the_markdown_page(tmp_path, capsys):
    from ldm.bench.suite import GROUPS

    out, md = tmp_path / "bench.json", tmp_path / "bench.md"
    assert ldm_main(["bench", "--tiny", "--out", str(out), "--markdown", str(md)]) == 0
    result = json.loads(out.read_text())
    assert result["benchmark"] == "ldm-bench" and result["groups"] == list(GROUPS)
    context = result["context"]
    assert {"cpu", "cpus", "threads", "torch", "load_average", "time"} <= set(context)
    assert len(context["load_average"]) == 3 and result["cpu_s"] > 0 and result["wall_s"] > 0
    rows = result["rows"]
    assert all(ROW_KEYS <= set(r) for r in rows)
    by_group = {g: [r for r in rows if r["group"] == g] for g in GROUPS}
    assert [r["row"] for r in by_group["kernels"]] == ["peak float32 (best kernel)", "peak bfloat16 (best kernel)"]
    denoiser = {r["row"] for r in by_group["denoiser"]}
    assert denoiser == {f"{kind} {name} b2" for kind in ("train step", "forward") for name in ("shapes", "mid")}
    assert len(by_group["vae"]) == 2 and len(by_group["generate"]) == 2 and len(by_group["data"]) == 2
    assert by_group["compile"] == []  # --tiny skips compiling
    assert [r["row"] for r in by_group["scaling"] if "batch" in r] == [f"{kind} shapes b{b}" for kind in
                                                                       ("train step", "forward") for b in (1, 2, 4)]
    switches = {r["row"].split(" (")[0] for r in by_group["fastpath"]}
    assert {"bf16 autocast vs fp32", "fused QKV", "channels_last", "attention math vs sdpa, bf16",
            "inference_mode vs no_grad", "mask check once per tensor vs every call", "text work once per run",
            "VAE channels_last"} <= switches
    sampling = [r["row"] for r in by_group["fastpath"] if r["row"].startswith(("text work", "VAE"))]
    assert sampling == ["text work once per run (generate shapes, 2 steps CFG)",
                        "text work once per run (generate shapes + refiner, 2 steps CFG)",
                        "VAE channels_last (decode shapes-sd b1)", "VAE channels_last (encode shapes-sd b1)"]
    allocator = [r for r in by_group["fastpath"] if r["row"].startswith("allocator")]  # child processes per side
    assert [r["row"] for r in allocator] == ["allocator keeps freed memory (forward shapes b2)",
                                             "allocator keeps freed memory (train step shapes b2)"]
    assert all(set(r["faults_per_call"]) == set(r["sys_ms_per_call"]) == {"on", "off"} and len(r["times"]["on"]) == 1
               for r in allocator)
    for r in rows:
        assert math.isfinite(r["ours"]) and r["ours"] > 0, r
        for key in ("reference", "speedup", "cpu_speedup", "mem_ratio"):
            if key in r and r[key] is not None:
                assert math.isfinite(r[key]) and r[key] > 0, (key, r)
    for r in by_group["denoiser"] + by_group["vae"] + by_group["generate"]:
        assert r["speedup"] is not None and r["reference"] is not None
    for r in by_group["denoiser"] + by_group["vae"] + by_group["generate"] + by_group["fastpath"]:
        lo, hi = r["speedup_range"]  # one round each in --tiny: the range is that round's ratio
        assert math.isfinite(lo) and 0 < lo <= hi
    for r in by_group["denoiser"]:
        assert r["mem_ratio"] is not None and r["ran_as"] in {"fp32-sdpa", "bf16-sdpa", "bf16-math"}
        assert set(r["times"]) >= {"ours", "ours fp32", "diffusers"}
    for r in by_group["generate"]:  # diffusers' pipeline from ldm.interop's conversion: the same images in fp32
        assert r["images"] == 1 and (r["ran_as"] != "fp32-sdpa" or r["max_abs_diff"] < 1e-4), r
    forward = next(r for r in by_group["denoiser"] if r["row"].startswith("forward mid"))
    assert forward["gflop_per_img"] > 0 and 0 < forward["pct_fp32_peak"]
    page = md.read_text()
    assert context["cpu"] in page and "ldm bench --tiny" in page and "| train step mid b2 |" in page
    printed = capsys.readouterr().out
    assert "train step shapes b2" in printed and f"wrote {out}" in printed


def test_bench_flags_are_checked(tmp_path):
    from ldm.errors import UsageError

    with pytest.raises(UsageError, match="--markdown"):
        ldm_main(["--debug", "bench", "--tiny", "--out", str(tmp_path / "b.json"),
                  "--markdown", str(tmp_path / "b.txt")])
    with pytest.raises(UsageError, match="--only"):
        ldm_main(["--debug", "bench", "--only", "gpu"])


def test_tiny_profile_sums_each_sides_operators(tmp_path, capsys):
    out = tmp_path / "profile.json"
    assert ldm_main(["bench", "profile", "--tiny", "--precision", "fp32", "--batch", "2", "--steps", "1",
                     "--warmup", "0", "--top", "5",
                     "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert len(rows) == 6 and rows[-1]["op"] == "total (all operators)" and result["kind"] == "train"
    total = rows[-1]
    assert total["ours_ms"] > 0 and total["diffusers_ms"] > 0
    for r in rows[:-1]:  # each operator's self time is a part of its side's total
        for side in ("ours", "diffusers"):
            assert r[f"{side}_ms"] is None or 0 <= r[f"{side}_ms"] <= total[f"{side}_ms"] + 1e-9
            assert 0 <= r[f"{side}_share"] <= 1
    assert "aten::convolution_backward" in {r["op"] for r in rows}  # a training step runs the conv backward
    assert "operator (self CPU time)" in capsys.readouterr().out


def test_every_benchmark_is_an_ldm_bench_subcommand_with_its_flags_explained(capsys):
    """interop and lcm (once `python -m` scripts) run through the one `ldm bench` CLI; --help explains each flag."""
    expected = {"data": "--samples", "unet": "--channels-last", "ddp": "--layouts", "lcm": "--teacher",
                "interop": "--sd15", "profile": "--kind"}
    for name, flag in expected.items():
        with pytest.raises(SystemExit) as done:
            ldm_main(["bench", name, "--help"])
        assert done.value.code == 0
        assert flag in capsys.readouterr().out, name
    with pytest.raises(SystemExit):
        ldm_main(["bench", "--help"])
    text = capsys.readouterr().out
    from ldm.bench.suite import GROUPS

    assert all(group in text for group in GROUPS) and "--install" in text and "make bench" in text


def test_round_range_pairs_the_rounds_of_both_sides():
    from ldm.bench.measure import round_range

    assert round_range({"wall_rounds": [2.0, 4.0]}, {"wall_rounds": [1.0, 2.0]}) == [2.0, 2.0]
    assert round_range({"wall_rounds": [3.0, 2.0, 2.0]}, {"wall_rounds": [1.0, 2.0, 4.0]}) == [0.5, 3.0]
    assert round_range({"wall_s": 1.0}, {"wall_s": 1.0}) is None  # no per-round times recorded


def test_denoiser_rows_print_without_the_kernels_group(tmp_path, capsys):
    assert ldm_main(["bench", "--tiny", "--only", "denoiser", "--out", str(tmp_path / "b.json")]) == 0
    assert "no peak measured: add the kernels group" in capsys.readouterr().out


def test_fit_line_recovers_an_exact_line_and_needs_two_batches():
    from ldm.bench.scaling import fit_line, scaling_batches

    fixed, per = fit_line([8, 16, 32, 64], [0.05 + 0.002 * b for b in (8, 16, 32, 64)])
    assert fixed == pytest.approx(0.05, abs=1e-12) and per == pytest.approx(0.002, abs=1e-14)
    assert fit_line([1, 3], [1.0, 2.0]) == pytest.approx((0.5, 0.5))
    with pytest.raises(ValueError, match="two different batch sizes"):
        fit_line([4, 4], [1.0, 2.0])
    assert scaling_batches(32) == [8, 16, 32, 64] and scaling_batches(2) == [1, 2, 4]


def _stub_interleaved(line):
    """An ``interleaved`` whose medians follow ``line(side, kind, batch)`` exactly (kind and batch read off the bound
    Contender method)."""
    def interleaved(fns, rounds=5, warmup=1, device="cpu"):
        out = {}
        for name, fn in fns.items():
            t = line(name, fn.__name__, fn.__self__.data["x"].shape[0])
            out[name] = {"wall_s": t, "wall_min_s": t, "cpu_s": t, "wall_rounds": [t]}
        return out
    return interleaved


def test_scaling_rows_split_each_sides_time_into_fixed_and_per_image_parts(monkeypatch):
    import ldm.bench.measure as measure
    from ldm.bench.scaling import scaling_rows
    from ldm.bench.suite import Settings, denoiser_configs, denoiser_flops, make_batch, our_unet

    fixed = {"ours": 0.040, "ours fp32": 0.035, "diffusers": 0.045}
    per = {"ours": 0.002, "ours fp32": 0.003, "diffusers": 0.0035}
    line = {"train": lambda n, b: fixed[n] + per[n] * b, "forward": lambda n, b: (fixed[n] + per[n] * b) / 4}
    monkeypatch.setattr(measure, "interleaved", _stub_interleaved(lambda n, kind, b: line[kind](n, b)))
    s = Settings.tiny_run()
    rows = scaling_rows(s, {"peak": {"peak_gflops": {"float32": 100.0}}})
    assert [r["row"] for r in rows] == [f"{kind} shapes b{b}" for kind in ("train step",) for b in (1, 2, 4)] + [
        "train step shapes, per image (fit over b1-b4)"] + [f"forward shapes b{b}" for b in (1, 2, 4)] + [
        "forward shapes, per image (fit over b1-b4)"]
    b4 = rows[2]
    assert b4["ours"] == pytest.approx(4 / 0.048) and b4["speedup"] == pytest.approx(0.059 / 0.048)
    assert b4["same_precision_speedup"] == pytest.approx(0.059 / 0.047) and b4["note"] == ""
    fit = rows[3]
    assert fit["unit"] == "ms/img" and fit["ours"] == pytest.approx(2.0) and fit["reference"] == pytest.approx(3.5)
    assert fit["speedup"] == pytest.approx(1.75) and "per_image_gflops" not in fit
    assert fit["fixed_s"] == pytest.approx(fixed) and fit["per_image_s"] == pytest.approx(per)
    assert fit["note"] == ("fixed per step (any batch): ours 40 ms (in fp32 35), diffusers 45 ms; "
                           "per image both fp32: 1.17x")
    forward = rows[7]  # a quarter of each time: the same ratios, and the arithmetic rate of the per-image part
    config, size = denoiser_configs(s)["shapes"]
    gflop = denoiser_flops(our_unet(config), make_batch(config, s.batch, size, s.tokens, "cpu")) / s.batch / 1e9
    assert forward["ours"] == pytest.approx(0.5) and forward["speedup"] == pytest.approx(1.75)
    assert forward["per_image_gflops"] == pytest.approx(gflop / 0.0005)
    assert forward["per_image_pct_fp32_peak"] == pytest.approx(gflop / 0.0005 / 100.0)
    assert forward["note"].startswith("fixed per call (any batch): ours 10 ms (in fp32 9), diffusers 11 ms; ")
    assert forward["note"].endswith(f"at {gflop / 0.0005:.0f} GFLOP/s = {gflop / 0.0005:.0f} % of the fp32 peak")

    shrinking = lambda n, kind, b: 0.05 - 0.001 * b if n == "ours" else line[kind](n, b)  # noqa: E731
    monkeypatch.setattr(measure, "interleaved", _stub_interleaved(shrinking))  # faster with more images: noise
    rows = scaling_rows(s, {})
    assert [r["row"] for r in rows] == [f"{kind} shapes b{b}" for kind in ("train step", "forward") for b in (1, 2, 4)]
    assert [r["note"] for r in rows if r["note"]] == [
        "no fit: the time did not grow with the batch on every side (noise)"] * 2
