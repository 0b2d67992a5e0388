"""Every CUDA number this project needs, from one command on a short-lived GPU machine.

    bash scripts/gpu_check.sh --out DIR [--budget-s 480] [--dry-run]
    python -m bench.gpu_check --table DIR/gpu_check.json        # the table again (markdown)

Why this shape: the GPU window is ~15 minutes, start-up included, without network access. So the
wheels arrive prepared in .whl/ (scripts/gpu_wheels.sh) and go into DIR/.pylib, never into the
system's site-packages; each stage runs in its own process group under its own time limit (its share
of the budget plus what earlier stages left), so a hang costs that stage alone; stages save their
record as they go and DIR/gpu_check.json is rewritten after every stage, so a timeout or a crash keeps
every earlier number. `--dry-run` runs the same code on CPU with tiny shapes, recording the parts that
need CUDA as "skipped: no CUDA"; CI runs it (tests/test_gpu_check.py), so the command cannot rot.

Stages: env (GPU, versions, the ceilings: bf16 GEMM rate, device copy bandwidth); correctness
(`pytest -m gpu`, a 1-rank DeepSpeed run under the launcher, resume with equal losses, publish ->
load_pretrained on CPU); throughput (ETTh1 reference, batch 16/64 x fp32/bf16/bf16+compile, and the
projector GEMMs' rate); similarity (N = 82,752, the Traffic batch, and the dense/blockwise crossover);
data (loader windows/s vs the GPU's consumption); pretrain (the reference run, as many steps as fit).
FLOPs come from bench/flops.py, the similarity kernel from bench/similarity.py, the stream from
bench/data_stream.py.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHARES = {"env": 0.04, "correctness": 0.30, "throughput": 0.36, "similarity": 0.08, "data": 0.04, "pretrain": 0.0}
MIN_STAGE_S = 10
AUTHORS_STEPS = 50 * 519  # configs/etth1.yaml: 50 epochs of 519 steps (batch 16, ETTh1 train split)
TARGETS = {"bf16_steps_per_s": 50.0, "gemm_fraction": 0.5, "similarity_gb": 20.0, "loader_ratio": 10.0,
           "data_wait": 0.02}
TRAFFIC_N, TRAFFIC_WIDTH = 24 * 862 * 4, 336 * 128  # 24 windows x 862 channels x (1 + 3 views); T x d_model
TINY = ["model.seq_len=48", "model.d_model=8", "model.n_heads=2", "model.e_layers=1", "model.d_ff=16",
        "model.proj_dim=16", "data.window_stride=16"]
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
_children: set[int] = set()  # process groups this process started and has not reaped


# ----------------------------------------------------------------------------- processes

def run(cmd: list, timeout: float, log: Path, env: dict | None = None) -> tuple[int | None, str]:
    """`cmd` in its own process group, output to `log`; (exit code, None after a timeout, and the
    output's last lines). A timeout, or this process being terminated, kills the whole group."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        proc = subprocess.Popen([str(c) for c in cmd], cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
        _children.add(proc.pid)
        try:
            rc = proc.wait(timeout=max(1.0, timeout))
        except subprocess.TimeoutExpired:
            rc = None
            _kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        _kill(proc.pid, signal.SIGKILL)  # stragglers: launcher workers, DataLoader workers
        proc.wait()
        _children.discard(proc.pid)
    return rc, "\n".join(log.read_text(errors="replace").splitlines()[-15:])


def _kill(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _on_term(signum, frame) -> None:
    for pgid in list(_children):
        _kill(pgid, signal.SIGKILL)
    sys.exit(128 + signum)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------- one stage, in its own process

class Stage:
    """What a stage function gets: where to write, how large to run, its time left, and its record,
    saved to DIR/stages/<name>.json at every `save` so a killed stage leaves what it measured."""

    def __init__(self, name: str, out: Path, dry: bool, limit_s: float):
        import torch

        self.name, self.out, self.dry, self.t0, self.limit_s = name, out, dry, time.monotonic(), limit_s
        self.cuda = torch.cuda.is_available() and not dry
        self.device = "cuda" if self.cuda else "cpu"
        self.record: dict = {}

    def left(self) -> float:
        return self.limit_s - (time.monotonic() - self.t0)

    def save(self, **values) -> None:
        self.record.update(values)
        write_json(self.out / "stages" / f"{self.name}.json", self.record)

    def sync(self) -> None:
        import torch

        if self.cuda:
            torch.cuda.synchronize()

    def pretrain(self, label: str, overrides: list, timeout: float, launcher: bool = False) -> dict:
        """trainer/pretrain.py on the ETTh1 reference config (under the deepspeed launcher, 1 rank, if
        `launcher`); its summary with "status", or the error's last lines."""
        if timeout < MIN_STAGE_S:
            return {"status": "skipped: no time left"}
        runner = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "1",
                  "--master_port", free_port()] if launcher else [sys.executable]
        cmd = [*runner, "trainer/pretrain.py", "--config", "configs/etth1.yaml", "train.progress=false",
               "log.tensorboard=false", "dist.deepspeed=true", *(TINY if self.dry else []),
               f"ckpt.dir={self.out / self.name / label}", *overrides]
        t, log = time.monotonic(), self.out / "logs" / f"{self.name}-{label}.log"
        rc, tail = run(cmd, timeout, log)
        wall = time.monotonic() - t
        # the trainer's first line: parameters, ranks, launcher, device, engine
        started = next((x for x in log.read_text(errors="replace").splitlines() if x.startswith("simmtm:")), None)
        if rc != 0:
            return {"status": "timeout" if rc is None else f"failed (exit {rc})", "wall_s": wall, "started": started,
                    "error": tail}
        s = json.loads((self.out / self.name / label / "summary.json").read_text())
        return {"status": "ok", "wall_s": wall, "started": started,
                **{k: s[k] for k in ("steps", "elapsed_s", "peak_memory_gb", "data_wait_fraction", "history")}}


def steady_steps_per_s(history: list) -> float | None:
    """Optimizer steps/s between the second logged step (past start-up and compilation) and the last."""
    if len(history) < 3:
        return None
    a, b = history[1], history[-1]
    return (b["step"] - a["step"]) / max(b["time_s"] - a["time_s"], 1e-9)


def stage_env(st: Stage) -> None:
    import platform

    import torch

    from bench.flops import matmul_peak

    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "device": st.device}
    for mod in ("deepspeed", "webdataset"):
        try:
            m = __import__(mod)
            info[mod] = f"{getattr(m, '__version__', '?')} ({Path(m.__file__).parent.parent})"
        except Exception as e:  # noqa: BLE001 - recorded, the later stages say what it breaks
            info[mod] = f"not importable: {e}"
    if st.cuda:
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, gpu_memory_gb=p.total_memory / 1e9, capability=f"{p.major}.{p.minor}",
                    nccl=".".join(map(str, torch.cuda.nccl.version())), cudnn=torch.backends.cudnn.version())
    else:
        info["gpu"] = "skipped: no CUDA"
    st.save(**info)
    n = 8192 if st.cuda else 256
    st.save(gemm_n=n, bf16_tflops=matmul_peak(n, 20 if st.cuda else 3, torch.bfloat16, st.device) / 1e3)
    nbytes = 2 * 2**30 if st.cuda else 16 * 2**20
    src = torch.empty(nbytes, dtype=torch.uint8, device=st.device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    st.sync()
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        dst.copy_(src)
        st.sync()
        best = min(best, time.perf_counter() - t)
    st.save(copy_gbs=2 * nbytes / best / 1e9, copy_bytes=nbytes)  # bytes read + written


def stage_correctness(st: Stage) -> None:
    # 1. the CUDA tests (marker `gpu`; they skip without CUDA), collected from the files that use the
    # marker: a module importing what the GPU image lacks (huggingface_hub, ...) cannot stop them
    files = [str(f.relative_to(ROOT)) for f in sorted((ROOT / "tests").glob("test_*.py"))
             if "mark.gpu" in f.read_text()] or ["tests/"]
    log = st.out / "logs" / "pytest-gpu.log"
    rc, tail = run([sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider",
                    "--continue-on-collection-errors", *files], min(st.left() * 0.55, st.left() - 60), log)
    counts = {k.rstrip("s"): int(v) for v, k in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected)", tail)}
    uncollected = re.findall(r"ERROR collecting (\S+)", log.read_text(errors="replace"))
    ran_clean = rc == 1 and not counts.get("failed") and counts.get("error", 0) == len(uncollected)
    status = ("ok" if rc == 0 or ran_clean else {5: "no test has the marker gpu", None: "timeout"}.get(
        rc, f"failed (exit {rc})"))
    st.save(pytest={"status": status, "files": files, **counts, "not_collected": uncollected, "tail": tail[-1500:]})
    # 2. DeepSpeed, 1 rank under the launcher: 4 steps saving at 2; then resume at 2 in another folder.
    # Equal losses: bitwise on CPU; on CUDA step 3 to 1e-6 and step 4 to 1e-3 relative (as tests/test_gpu.py:
    # atomics in attention's backward reorder fp32 sums, and bf16 weights round the differences up)
    precision = "bf16" if st.cuda else "fp32"
    common = [f"train.precision={precision}", "train.max_steps=4", "train.log_every=1", "optim.warmup_steps=2"]
    first = st.pretrain("first", [*common, "ckpt.every=2", f"ckpt.publish={st.out / st.name / 'published'}"],
                        (st.left() - 10) / 2, launcher=True)
    st.save(deepspeed={k: v for k, v in first.items() if k != "history"}, precision=precision)
    if first["status"] != "ok":
        return st.save(status="failed: deepspeed run")
    resumed = st.pretrain("resumed", [*common, f"ckpt.resume={st.out / st.name / 'first/checkpoints/step_00000002'}"],
                          st.left() - 10, launcher=True)
    if resumed["status"] == "ok":
        a = {h["step"]: h for h in first["history"]}
        rel = [max(abs(h[k] - a[h["step"]][k]) / max(abs(a[h["step"]][k]), 1e-12)
                   for k in ("loss", "loss_rec", "loss_cl")) for h in resumed["history"] if h["step"] > 2]
        resumed.update(rel_diff_by_step=rel, identical=max(rel) == 0.0,
                       equal=max(rel) == 0.0 if not st.cuda else rel[0] <= 1e-6 and max(rel) <= 1e-3)
    st.save(resume={k: v for k, v in resumed.items() if k != "history"})
    for run_dir in ("first", "resumed"):
        _rmtree(st.out / st.name / run_dir / "checkpoints")  # 0.75 GB each
    # 3. the published weights on CPU, with torch + safetensors only
    import torch

    from models import load_pretrained

    enc = load_pretrained(str(st.out / st.name / "published"))
    with torch.no_grad():
        y = enc(torch.randn(2, enc.cfg.seq_len))
    st.save(load_pretrained={"device": str(next(enc.parameters()).device), "output_shape": list(y.shape),
                             "finite": bool(torch.isfinite(y).all())})
    _rmtree(st.out / st.name / "published")
    bad = [k for k in ("pytest", "resume") if st.record[k]["status"] not in ("ok", "no test has the marker gpu")]
    bad += ["losses after resume"] * (not bad and not st.record["resume"]["equal"])
    st.save(status=f"failed: {', '.join(bad)}" if bad else "ok")


def projector_gemms(st: Stage, batch: int) -> dict:
    """Achieved FLOP/s of the projector's GEMMs (forward and backward; the matmuls whose shapes hold
    its hidden width) in bf16 training steps of the reference model, from the profiler's counts."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from bench.flops import step_flops
    from models import SimMTM
    from trainer.config import load_config

    cfg = load_config(ROOT / "configs/etth1.yaml", TINY if st.dry else []).model
    model = SimMTM(cfg).to(st.device)
    for p in model.parameters():  # bf16 weights, fp32 buffers: as DeepSpeed's bf16 engine holds the model
        p.data = p.data.to(torch.bfloat16)
    x = torch.randn(batch, 7, cfg.seq_len, device=st.device)
    g = torch.Generator(device=st.device).manual_seed(0)
    steps = 3

    def step():
        model(x, generator=g)["loss"].backward()

    for _ in range(2):
        step()
    st.sync()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if st.cuda else [])
    with profile(activities=acts, record_shapes=True, with_flops=True) as prof:
        for _ in range(steps):
            step()
        st.sync()
    hidden = cfg.num_tokens * cfg.d_model // 2
    flops = us = 0.0
    for e in prof.key_averages(group_by_input_shape=True):
        if e.key in ("aten::mm", "aten::addmm") and any(hidden in s for s in e.input_shapes if s):
            flops += e.flops
            us += e.self_device_time_total if st.cuda else e.self_cpu_time_total
    analytic = step_flops(cfg, batch)["projector"]
    return {"batch": batch, "dtype": "bf16", "gflop": flops / 1e9, "seconds": us * 1e-6,
            "tflops": flops / max(us * 1e-6, 1e-12) / 1e12, "analytic_gflop": steps * analytic / 1e9}


# in order of need: the targets' runs first; what the budget cannot fit is recorded as skipped or timeout
THROUGHPUT = [("bf16", 16), ("bf16", 64), ("bf16+compile", 16), ("fp32", 16), ("fp32", 64), ("bf16+compile", 64)]


def stage_throughput(st: Stage) -> None:
    st.save(projector_gemms=projector_gemms(st, 4 if st.dry else 64))
    if st.cuda:
        import torch

        torch.cuda.empty_cache()  # the trainer runs next, in their own processes
    runs = {}
    for mode, batch in THROUGHPUT:
        label = f"{mode} b{batch}"
        if mode != "fp32" and not st.cuda:
            runs[label] = {"status": "skipped: no CUDA"}
            continue
        steps, log_every = (4, 2) if st.dry else ((300, 50) if batch == 16 else (150, 25))
        overrides = [f"train.batch_size={batch // 8 if st.dry else batch}", f"train.max_steps={steps}",
                     f"train.log_every={log_every}", f"train.precision={mode[:4]}", "optim.warmup_steps=10"]
        r = st.pretrain(label.replace(" ", "-"), overrides + ["train.compile=true"] * mode.endswith("compile"),
                        min(st.left() - 5, 120))
        hist = r.pop("history", [])
        sps = steady_steps_per_s(hist)
        if sps:  # overhead: the wall time beyond steady stepping (start-up, compilation, the final save)
            overhead = r["wall_s"] - r["elapsed_s"] + max(0.0, hist[1]["time_s"] - hist[1]["step"] / sps)
            r.update(batch=batch, steps_per_s=sps, windows_per_s=sps * batch, overhead_s=overhead)
            if batch == 16:
                r["full_pretraining_min"] = AUTHORS_STEPS / sps / 60
        runs[label] = r
        st.save(runs=runs)
        _rmtree(st.out / st.name / label.replace(" ", "-") / "checkpoints")  # 0.75 GB each
    bad = [k for k, r in runs.items() if not (r["status"] == "ok" or r["status"].startswith("skipped"))]
    st.save(status="ok" if not bad else f"failed: {', '.join(bad)}")


def _rmtree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def stage_similarity(st: Stage) -> None:
    from bench.similarity import one

    # the Traffic reference batch at its real value width (T x d_model), bf16 as under DeepSpeed; then
    # the bench's width 1,024 in fp32; then dense vs blockwise around the dispatch threshold (N = 8,192)
    n, width = (1024, 64) if st.dry else (TRAFFIC_N, TRAFFIC_WIDTH)
    cases = [("reference", n, width, "ours", "bf16"), ("width_1024", n, 64 if st.dry else 1024, "ours", "fp32")]
    for m in ((256, 512) if st.dry else (4096, 8192, 16384)):
        cases += [(f"crossover_{m}_{p}", m, 64 if st.dry else 1024, p, "fp32") for p in ("dense", "ours")]
    for label, n, width, path, dtype in cases:
        if st.left() < 5:
            break
        r = one(n, width, path, st.device, dtype, block=None)
        r["total_gb"] = r["peak_gb"] + r["inputs_gb"]
        st.save(**{label: r})
        if st.cuda:
            import torch

            torch.cuda.empty_cache()
    st.save(status="ok")


def stage_data(st: Stage) -> None:
    from bench.data_stream import CSV, best_of, run_stream
    from data_pipeline import convert

    url = convert(str(CSV["ETTh1"]), str(st.out / st.name / "parquet"), "parquet", progress=False)["_url"]
    loader = {}
    for workers in ((0,) if st.dry else (0, 2, 4)):
        dt, first, n, _ = best_of(lambda t0, w=workers: run_stream(url, w, t0, batch=64), 2)
        loader[str(workers)] = {"windows_per_s": n / dt, "windows": n, "first_batch_s": first,
                                "steady_windows_per_s": (n - 64) / max(dt - first, 1e-9)}
        st.save(loader=loader, batch=64, source="local parquet, ETTh1 train split")
    st.save(status="ok")


def stage_pretrain(st: Stage) -> None:
    runs = _load(st.out / "stages" / "throughput.json").get("runs", {})
    fast = max((r for k, r in runs.items() if k.startswith("bf16") and k.endswith("b16") and r.get("steps_per_s")),
               key=lambda r: r["steps_per_s"], default=None)
    compiled = fast is not None and fast is runs.get("bf16+compile b16")
    if st.dry:
        steps = 3
    else:
        rate, overhead = (fast["steps_per_s"], fast["overhead_s"]) if fast else (10.0, 60.0)
        steps = max(10, min(AUTHORS_STEPS, int(0.8 * rate * (st.left() - overhead - 20))))
    overrides = [f"train.precision={'bf16' if st.cuda else 'fp32'}", f"train.max_steps={steps}",
                 f"train.log_every={max(1, steps // 20)}"] + ["train.compile=true"] * compiled
    r = st.pretrain("etth1", overrides, st.left() - 5)
    hist = r.pop("history", [])
    if hist:
        r.update(first_loss=hist[0]["loss"], last_loss=hist[-1]["loss"], last_loss_rec=hist[-1]["loss_rec"],
                 last_loss_cl=hist[-1]["loss_cl"], steps_per_s=steady_steps_per_s(hist))
    st.save(run=r, planned_steps=steps, compile=compiled, of_authors_steps=AUTHORS_STEPS,
            note="cosine schedule over the planned steps, not the authors' 50 epochs")
    _rmtree(st.out / st.name / "etth1" / "checkpoints")
    st.save(status=r["status"])


STAGES = {"env": stage_env, "correctness": stage_correctness, "throughput": stage_throughput,
          "similarity": stage_similarity, "data": stage_data, "pretrain": stage_pretrain}


# ----------------------------------------------------------------------------- the orchestrator

def _load(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def install(out: Path, dry: bool) -> dict:
    """.whl/*.whl into DIR/.pylib (pip --no-index --no-deps --target; nothing else is touched). A dry
    run resolves the same command with pip's --dry-run and keeps the current environment."""
    wheels = sorted((ROOT / ".whl").glob("*.whl"))
    if not wheels:
        return {"status": "skipped: no .whl/ (bash scripts/gpu_wheels.sh makes it)"}
    from packaging.tags import sys_tags
    from packaging.utils import parse_wheel_filename

    ours = set(sys_tags())
    usable = [w for w in wheels if parse_wheel_filename(w.name)[3] & ours]
    _rmtree(out / ".pylib")
    cmd = [sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--disable-pip-version-check",
           "--target", out / ".pylib", *(["--dry-run"] if dry else []), *usable]
    t = time.monotonic()
    rc, tail = run(cmd, 180, out / "logs" / "install.log")
    status = "ok" if rc == 0 else f"failed (exit {rc})"
    if rc != 0 and not dry:  # an image without pip: a wheel is a zip of what site-packages holds
        import zipfile

        for w in usable:
            zipfile.ZipFile(w).extractall(out / ".pylib")
        status = f"ok (unzipped; pip failed with exit {rc})"
    return {"status": status, "seconds": time.monotonic() - t, "wheels": [w.name for w in usable],
            "not_for_this_python": [w.name for w in wheels if w not in usable], **({"error": tail} if rc else {}),
            **({"note": "pip --dry-run: resolved, not installed"} if dry else {})}


def stage_environ(out: Path, dry: bool) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    pylib = out / ".pylib"
    paths = [str(pylib)] * (pylib.is_dir() and not dry) + [str(ROOT), env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    # this interpreter's scripts first (as tests/launch_utils.py does): its ninja, not the system's, whose
    # other log format would make every build in a shared extensions cache start over
    bins = [str(pylib / "bin")] * (pylib.is_dir() and not dry) + [str(Path(sys.executable).parent)]
    env["PATH"] = os.pathsep.join(bins + [env.get("PATH", "")])
    env["PYTHONUNBUFFERED"] = "1"
    if not dry:  # a dry run keeps the repository's prebuilt CPU op (.torch_extensions/), as the entry points do
        env["TORCH_EXTENSIONS_DIR"] = str(out / "torch_extensions")
    return env


def check(out: Path, budget_s: float, dry: bool) -> dict:
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    for old in (out / "stages").glob("*.json"):
        old.unlink()
    t0 = time.monotonic()
    result = {"started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "dry_run": dry, "budget_s": budget_s, "install": install(out, dry), "stages": {}}
    env = stage_environ(out, dry)
    names = list(STAGES)
    for i, name in enumerate(names):
        left = budget_s - (time.monotonic() - t0)
        limit = left - sum(SHARES[n] for n in names[i + 1:]) * budget_s
        if limit < MIN_STAGE_S:
            rec = {"status": f"skipped: {max(limit, 0):.0f} s left of the budget"}
        else:
            print(f"gpu_check: stage {name} (up to {limit:.0f} s)", flush=True)
            t = time.monotonic()
            rc, tail = run([sys.executable, "-m", "bench.gpu_check", "--stage", name, "--out", out,
                            "--limit-s", f"{limit:.1f}", *(["--dry-run"] if dry else [])],
                           limit, out / "logs" / f"stage-{name}.log", env)
            rec = _load(out / "stages" / f"{name}.json")
            rec["status"] = (f"timeout after {limit:.0f} s" if rc is None else f"failed (exit {rc})" if rc
                             else rec.get("status", "ok"))
            rec.update(seconds=time.monotonic() - t, limit_s=limit, **({"error": tail} if rc != 0 else {}))
        result["stages"][name] = rec
        result["targets"] = [r for r in rows(result) if r["target"] != "-"]
        write_json(out / "gpu_check.json", result)
    _rmtree(out / ".pylib")  # installed for this run only (~30 MB); DIR keeps results and logs
    result["seconds"] = time.monotonic() - t0
    write_json(out / "gpu_check.json", result)
    return result


def write_json(path: Path, obj: dict) -> None:
    """Temp file + rename in the stdlib, not data_pipeline.fs.atomic_write: the supervising process runs on
    the GPU image's Python without DIR/.pylib, and must record results whatever the project fails to import."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.with_suffix(".tmp").write_text(json.dumps(obj, indent=2, default=str))
    path.with_suffix(".tmp").replace(path)


# ----------------------------------------------------------------------------- the table

def _get(d, *keys):
    for k in keys:
        d = d.get(k) if isinstance(d, dict) else None
    return d


def rows(result: dict) -> list[dict]:
    """{name, measured, target, met} per line of the table; whatever stages are missing or partial."""
    s = result.get("stages", {})
    out = []

    def add(name, measured, target="-", met=None):
        out.append({"name": name, "measured": measured, "target": target, "met": met})

    for name in STAGES:
        rec = s.get(name, {})
        add(f"stage {name}", rec.get("status", "not run") + (f", {rec['seconds']:.0f} s" if "seconds" in rec else ""))
    env = s.get("env", {})
    if "torch" in env:
        gpu = env.get("gpu", "-")
        mem = f", {env['gpu_memory_gb']:.0f} GB" if "gpu_memory_gb" in env else ""
        add("device", f"{gpu}{mem}; torch {env['torch']}, CUDA {env.get('cuda')}, python {env.get('python')}")
    if "bf16_tflops" in env:
        add(f"bf16 GEMM {env['gemm_n']}^3 (ceiling)", f"{env['bf16_tflops']:.3g} TFLOP/s")
    if "copy_gbs" in env:
        add("device copy (read + write)", f"{env['copy_gbs']:,.0f} GB/s")
    c = s.get("correctness", {})
    if "pytest" in c:
        p = c["pytest"]
        add("pytest -m gpu", f"{p['status']}: {p.get('passed', 0)} passed, {p.get('failed', 0)} failed, "
            f"{p.get('skipped', 0)} skipped" + (f"; not collected: {', '.join(p['not_collected'])}"
                                                if p.get("not_collected") else ""),
            "all pass", p["status"] == "ok" and not p.get("failed"))
    if "deepspeed" in c:
        d = c["deepspeed"]
        add(f"DeepSpeed launcher, 1 rank, {c.get('precision')}", f"{d['status']}" +
            (f", {d['steps']} steps, {d['peak_memory_gb']:.2f} GB peak" if d["status"] == "ok" else ""))
    if "resume" in c:
        r = c["resume"]
        rel = r.get("rel_diff_by_step")
        add("resume at step 2: losses of steps 3, 4", r["status"] + (f", relative diff {rel[0]:.2g}, {rel[-1]:.2g}"
                                                                    if rel else ""),
            "CPU bitwise; CUDA 1e-6, 1e-3", r.get("equal"))
    if "load_pretrained" in c:
        lp = c["load_pretrained"]
        add("publish -> load_pretrained", f"on {lp['device']}, output {lp['output_shape']}, finite {lp['finite']}",
            "finite", lp["finite"])
    t = s.get("throughput", {})
    for label, r in t.get("runs", {}).items():
        if not r.get("steps_per_s"):
            add(f"ETTh1 {label}", r["status"])
            continue
        text = (f"{r['steps_per_s']:.1f} steps/s, {r['windows_per_s']:,.0f} windows/s, {r['peak_memory_gb']:.2f} GB"
                + (f"; 26k steps in {r['full_pretraining_min']:.1f} min" if "full_pretraining_min" in r else ""))
        if label == "bf16 b16":
            add(f"ETTh1 {label}", text, f">= {TARGETS['bf16_steps_per_s']:.0f} steps/s",
                r["steps_per_s"] >= TARGETS["bf16_steps_per_s"])
        else:
            add(f"ETTh1 {label}", text)
    pg, peak = t.get("projector_gemms"), env.get("bf16_tflops")
    if pg and peak:
        frac = pg["tflops"] / peak
        add(f"projector GEMMs, bf16 batch {pg['batch']}", f"{pg['tflops']:.3g} TFLOP/s = {100 * frac:.0f}% of the "
            f"GEMM rate", f">= {100 * TARGETS['gemm_fraction']:.0f}%", frac >= TARGETS["gemm_fraction"])
    sim = s.get("similarity", {})
    for label, r in sim.items():
        if not isinstance(r, dict):
            continue
        text = f"{r['fwd_bwd_s'] * 1e3:,.1f} ms, {r['total_gb']:.2f} GB ({r['peak_gb']:.2f} beyond inputs)"
        name = f"similarity N={r['n']:,} width {r['value_width']:,} {r['dtype']} {r['path']}"
        if label == "reference":
            add(name, text, f"< {TARGETS['similarity_gb']:.0f} GB", r["total_gb"] < TARGETS["similarity_gb"])
        else:
            add(name, text)
    loader = _get(s, "data", "loader") or {}
    for w, r in loader.items():
        add(f"loader, local parquet, {w} workers", f"{r['windows_per_s']:,.0f} windows/s")
    consumer = next((k for k in ("bf16 b64", "fp32 b64") if _get(t, "runs", k, "windows_per_s")), None)  # fp32: CPU
    gpu = _get(t, "runs", consumer) or {}
    if "0" in loader and gpu:
        ratio = loader["0"]["windows_per_s"] / gpu["windows_per_s"]
        add(f"loader (0 workers) / trainer {consumer}",
            f"{ratio:.1f}x ({gpu['windows_per_s']:,.0f} windows/s consumed)",
            f">= {TARGETS['loader_ratio']:.0f}x", ratio >= TARGETS["loader_ratio"])
    if gpu:
        add(f"trainer data wait, {consumer}", f"{100 * gpu['data_wait_fraction']:.2f}%",
            f"< {100 * TARGETS['data_wait']:.0f}%", gpu["data_wait_fraction"] < TARGETS["data_wait"])
    f = _get(s, "pretrain", "run") or {}
    if f.get("steps"):
        add("ETTh1 reference pre-training", f"{f['steps']:,} of {AUTHORS_STEPS:,} steps in {f['elapsed_s']:.0f} s, "
            f"loss {f['first_loss']:.3f} -> {f['last_loss']:.3f}")
    return out


def table(result: dict) -> str:
    dry = result.get("dry_run")
    head = ("measurement", "measured", "target", "status")
    body = [(r["name"], r["measured"], r["target"],
             "-" if r["met"] is None else "dry run" if dry else "met" if r["met"] else "NOT met") for r in rows(result)]
    w = [max(len(x[i]) for x in [head, *body]) for i in range(4)]
    line = lambda cells: "| " + " | ".join(c.ljust(w[i]) for i, c in enumerate(cells)) + " |"  # noqa: E731
    title = (f"gpu_check {result.get('started', '')}, budget {result.get('budget_s', 0):.0f} s"
             + (" (dry run: CPU, tiny shapes; no figure is comparable to a target)" if dry else ""))
    return "\n".join([title, "", line(head), "|" + "|".join("-" * (x + 2) for x in w) + "|", *map(line, body)])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, help="output folder: gpu_check.json, stages/, logs/, .pylib/")
    ap.add_argument("--budget-s", type=float, default=480.0, help="wall time for all stages (default 480)")
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, seconds per stage")
    ap.add_argument("--table", type=Path, metavar="JSON", help="print the table of a gpu_check.json and exit")
    ap.add_argument("--stage", choices=list(STAGES), help=argparse.SUPPRESS)  # one stage, in this process
    ap.add_argument("--limit-s", type=float, default=60.0, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    signal.signal(signal.SIGTERM, _on_term)
    if a.table:
        print(table(_load(a.table)))
    elif a.out is None:
        ap.error("--out DIR is required")
    elif a.stage:
        st = Stage(a.stage, a.out.resolve(), a.dry_run, a.limit_s)
        STAGES[a.stage](st)
    else:
        print(table(check(a.out, a.budget_s, a.dry_run)))


if __name__ == "__main__":
    main()
