"""scripts/gpu_check.sh: its dry run (how CI keeps the GPU command from rotting), the table it prints
from partial results, and the time limit that must kill a stage's whole process tree."""
import json
import subprocess
import sys
import time
from pathlib import Path

from bench.gpu_check import STAGES, rows, run, table
from trainer.config import REPO_ROOT

from .launch_utils import clean_env


def test_dry_run_records_every_stage_and_prints_the_table(tmp_path):
    out = tmp_path / "gpu_out"
    proc = subprocess.run(["bash", str(REPO_ROOT / "scripts" / "gpu_check.sh"), "--dry-run", "--out", str(out)],
                          cwd=tmp_path, env=clean_env(PYTHON=sys.executable), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((out / "gpu_check.json").read_text())
    assert result["dry_run"] is True and set(result["stages"]) == set(STAGES)
    for name, rec in result["stages"].items():
        assert rec["status"] == "ok", (name, rec, (out / "logs" / f"stage-{name}.log").read_text()[-3000:])
    s = result["stages"]
    assert s["env"]["gpu"] == "skipped: no CUDA" and s["env"]["bf16_tflops"] > 0
    assert s["correctness"]["resume"]["identical"] and s["correctness"]["load_pretrained"]["finite"]
    assert s["throughput"]["runs"]["bf16 b16"]["status"] == "skipped: no CUDA"
    assert s["throughput"]["runs"]["fp32 b16"]["steps_per_s"] > 0 and s["throughput"]["projector_gemms"]["gflop"] > 0
    assert s["similarity"]["reference"]["total_gb"] > 0 and s["data"]["loader"]["0"]["windows_per_s"] > 0
    assert s["pretrain"]["run"]["steps"] == 3
    assert {t["name"] for t in result["targets"]} >= {"projector GEMMs, bf16 batch 4", "trainer data wait, fp32 b64"}
    assert not (out / ".pylib").exists()
    printed = proc.stdout[proc.stdout.index("gpu_check 20"):]
    for name in STAGES:
        assert f"| stage {name} " in printed
    again = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--table", str(out / "gpu_check.json")],
                           cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    assert again.stdout == printed


def test_table_from_partial_results():
    """A stage that timed out keeps what it saved; stages that never ran say so; targets are judged."""
    result = {"dry_run": False, "stages": {
        "env": {"status": "ok", "seconds": 4, "torch": "2.11.0", "gpu": "NVIDIA H200", "gemm_n": 8192,
                "bf16_tflops": 700.0, "copy_gbs": 3900.0},
        "throughput": {"status": "timeout after 170 s", "seconds": 170,
                       "projector_gemms": {"batch": 64, "tflops": 300.0},
                       "runs": {"bf16 b16": {"status": "ok", "steps_per_s": 60.0, "windows_per_s": 960.0,
                                             "peak_memory_gb": 2.5, "full_pretraining_min": 7.2},
                                "bf16 b64": {"status": "timeout"}}}}}
    by_name = {r["name"]: r for r in rows(result)}
    assert by_name["stage throughput"]["measured"] == "timeout after 170 s, 170 s"
    assert by_name["stage correctness"]["measured"] == "not run"
    assert by_name["ETTh1 bf16 b16"]["met"] is True
    assert by_name["projector GEMMs, bf16 batch 64"]["met"] is False  # 300 / 700 = 43%
    assert by_name["ETTh1 bf16 b64"]["measured"] == "timeout"
    text = table(result)
    assert "NOT met" in text and "| met " in text and "dry run" not in text


def test_a_timeout_kills_the_whole_process_group(tmp_path):
    pidfile = tmp_path / "pid"
    t = time.monotonic()
    rc, _ = run(["bash", "-c", f"sleep 60 & echo $! > {pidfile}; wait"], 1, tmp_path / "log")
    assert rc is None and time.monotonic() - t < 15
    stat = Path(f"/proc/{pidfile.read_text().strip()}/stat")
    for _ in range(50):  # gone, or a zombie waiting for init to reap it
        if not stat.exists() or stat.read_text().rsplit(")", 1)[1].split()[0] == "Z":
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"{stat.parent.name} outlived the timeout")
