"""benchmarks/train_speed.py end to end on a tiny dataset, our side only (no peers: CI has no network).

The full benchmark is too slow for CI; this checks that the one command runs our four models in both
backends through the real loaders and writes the JSON and Markdown it promises, with the same
configuration recorded for every run (AutoInt: embedding / heads per head by default)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import ROOT, subprocess_env

SCRIPT = os.path.join(ROOT, "benchmarks", "train_speed.py")


def test_train_speed_ours_only_writes_json_and_table(tmp_path):
    out = tmp_path / "speed.json"
    args = [sys.executable, SCRIPT, "--models", "DeepFM,AutoInt", "--peers", "none", "--rows", "6000",
            "--valid_rows", "1000", "--fields", "6", "--vocab", "500", "--batch_size", "500", "--mlp", "16,8",
            "--warmup", "1", "--window", "2", "--windows", "2", "--threads", "1", "--inter_op_threads", "1",
            "--data_dir", str(tmp_path / "data"), "--out", str(out), "--no_progress"]
    p = subprocess.run(args, capture_output=True, text=True, env=subprocess_env(tmp_path), timeout=600, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["settings"]["attention_dim"] == 8          # embedding 16 / 2 heads: every runner's size
    assert r["settings"]["autoint_use_wide"] is True    # the first-order term every peer's AutoInt has
    runs = {(x["model"], x["backend"]): x for x in r["runs"]}
    assert set(runs) == {(m, b) for m in ("DeepFM", "AutoInt") for b in ("torch", "tf")}
    for (model, backend), x in runs.items():
        assert x["status"] == "ok", x
        assert x["rows_per_s"] > 0 and len(x["windows"]) == 2 and x["peak_rss_mb"] > 0
        assert 0.0 <= x["valid_auc"] <= 1.0 and x["valid_rows"] == 1000
    # same weights count in both backends for the same config (one architecture)
    for model in ("DeepFM", "AutoInt"):
        assert runs[(model, "torch")]["params"] == runs[(model, "tf")]["params"]
    # AutoInt ran with 2 heads of 8 and the peers' linear term: embedding + 3 layers x (Q, K, V, Res)
    # 16 x 16 + the output layer + the first-order table and bias
    from common.schema import Schema

    rows = sum(f.vocab_size for f in Schema.load(str(tmp_path / "data")).categorical)
    assert runs[("AutoInt", "torch")]["params"] == rows * 16 + 3 * 4 * 16 * 16 + 6 * 16 + 1 + rows + 1
    table = out.with_suffix(".md").read_text()
    # DeepFM's PyTorch run trains under torch.compile by default (--torch_compile), AutoInt's eagerly
    assert runs[("DeepFM", "torch")]["torch_compile"] is True and runs[("AutoInt", "torch")]["torch_compile"] is False
    assert r["settings"]["torch_compile"] == ["DeepFM"]
    assert "| DeepFM | ours (torch, compiled)" in table and "| AutoInt | ours (torch) |" in table
    assert "| AutoInt | ours (tf)" in table and "head size 8" in table
    assert "runs under torch.compile (`--torch_compile`, label \"compiled\"): DeepFM" in table
    assert "(AutoInt: attention + first-order term, head size 8)" in table


def test_mlp_ceiling_writes_its_json(tmp_path):
    out = tmp_path / "ceiling.json"
    p = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "mlp_ceiling.py"), "--fields", "3",
                        "--embed_size", "4", "--mlp", "8,8", "--batch_size", "64", "--threads", "1", "--warmup", "1",
                        "--window", "2", "--windows", "3", "--out", str(out)],
                       capture_output=True, text=True, env=subprocess_env(tmp_path), timeout=300, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-2000:]
    r = json.loads(out.read_text())
    assert r["dims"] == [12, 8, 8, 1] and len(r["windows"]) == 3 and r["rows_per_s"] > 0
    assert r["flop_per_row"] == 6 * (12 * 8 + 8 * 8 + 8 * 1)
    assert abs(r["gflop_per_s"] - r["rows_per_s"] * r["flop_per_row"] / 1e9) < 1e-9
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp")]     # written atomically


def test_torch_compile_must_name_models_the_run_has(tmp_path):
    p = subprocess.run([sys.executable, SCRIPT, "--models", "AutoInt", "--torch_compile", "DeepFM", "--peers", "none",
                        "--out", str(tmp_path / "x.json")], capture_output=True, text=True,
                       env=subprocess_env(tmp_path), timeout=120, cwd=ROOT)
    assert p.returncode == 2
    assert "--torch_compile names ['DeepFM'], which --models does not run (AutoInt)" in p.stderr
    assert not (tmp_path / "x.json").exists()


def test_torch_compile_default_is_deepfm_where_it_runs():
    sys.path.insert(0, os.path.dirname(SCRIPT))
    import train_speed

    assert train_speed.parse_args(["--models", "AutoInt,DCN"]).torch_compile == []
    assert train_speed.parse_args(["--models", "DCN,DeepFM"]).torch_compile == ["DeepFM"]
    assert train_speed.parse_args(["--models", "DCN,DeepFM", "--torch_compile", "all"]).torch_compile == ["DCN", "DeepFM"]
    assert train_speed.parse_args(["--models", "DeepFM", "--torch_compile", "none"]).torch_compile == []
    assert train_speed.parse_args(["--models", "DeepFM", "--device", "cuda"]).torch_compile == []
