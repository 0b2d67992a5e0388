"""Evaluation harness: pre-train -> publish -> fine-tune every horizon (SimMTM and random init at the
same fine-tuning budget) -> results.json + markdown table. Resumable: records already in the results
file are skipped, so background runs accumulate.

    python -m trainer.evaluate --config configs/eval_etth1_budget.yaml            # run (or resume)
    python -m trainer.evaluate report runs/eval/*/results.json --json docs/results.json --md docs/results.md

Each stage is a subprocess (the pre-training and fine-tuning entry points, optionally under a launcher
such as `deepspeed --num_gpus 2`), so a stage crash names its command and a re-run resumes there.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

from data_pipeline.fs import atomic_write
from trainer.config import REPO_ROOT, load_config, repo_path, split_cli

KEY = ("setting", "pretrain_data", "finetune_data", "init", "recipe", "task", "horizon", "label_fraction", "mode")
FIELDS = ("setting", "pretrain_data", "finetune_data", "init", "recipe", "task", "horizon", "mse", "mae",
          "accuracy", "macro_f1", "auroc", "train_seconds")
# The paper's averages over the four horizons (SimMTM, NeurIPS 2023), as quoted in the project's issue.
PAPER = {("in-domain", "forecast", "ETTh1", "ETTh1"): {"simmtm": "0.409", "random": "~0.43-0.44"}}


@dataclass
class EvalConfig:
    name: str = "eval"
    setting: Literal["in-domain", "cross-domain"] = "in-domain"
    recipe: str = "budget"
    task: Literal["forecast", "classify"] = "forecast"
    pretrain_data: str = "ETTh1"  # labels for the records
    finetune_data: str = "ETTh1"
    pretrain_config: str = "configs/etth1_cpu.yaml"
    pretrain_overrides: list[str] = field(default_factory=list)
    published: str = ""  # default runs/eval/<name>/pretrain/published; pre-training is skipped if it exists
    finetune_config: str = "configs/finetune_etth1.yaml"
    finetune_overrides: list[str] = field(default_factory=list)
    horizons: list[int] = field(default_factory=lambda: [96, 192, 336, 720])
    inits: list[Literal["simmtm", "random"]] = field(default_factory=lambda: ["simmtm", "random"])
    launcher: str = ""  # e.g. "deepspeed --num_gpus 2" for distributed fine-tuning; empty: one process
    out: str = ""  # default runs/eval/<name>
    markdown: str = ""  # default <out>/results.md


def record_key(r: dict) -> tuple:
    return tuple(r.get(k) for k in KEY)


def load_records(path: Path) -> list[dict]:
    return json.loads(path.read_text()) if path.exists() else []


def save_records(path: Path, records: list[dict]) -> None:
    atomic_write(str(path), json.dumps(records, indent=1).encode())


def _run(cmd: list[str], log: Path) -> float:
    """Run a stage, tee its output to a log file; returns wall seconds; raises naming the command."""
    log.parent.mkdir(parents=True, exist_ok=True)
    print("$", " ".join(shlex.quote(c) for c in cmd), flush=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        tail = log.read_text()[-3000:]
        raise RuntimeError(f"stage failed ({proc.returncode}): {' '.join(cmd)}\n--- {log} ---\n{tail}")
    return time.perf_counter() - t0


def _recipe(command: list[str]) -> list[str]:
    """A pre-training command less where it wrote (and how it resumed): a moved repo or results folder
    still matches."""
    return [c for c in command if not c.startswith(("ckpt.dir=", "ckpt.publish=", "ckpt.resume="))]


def pretrain_stage(cfg: EvalConfig, out: Path) -> tuple[str, Optional[float]]:
    """The published folder, pre-training first unless it already exists; and the pre-training wall time."""
    published = _published(cfg, out)
    run_dir = published.parent
    cmd = [sys.executable, "trainer/pretrain.py", "--config", cfg.pretrain_config, *cfg.pretrain_overrides,
           f"ckpt.dir={run_dir}", f"ckpt.publish={published}", "train.progress=false",
           "ckpt.resume=auto"]  # a stage that crashed continues from its last checkpoint
    provenance = run_dir / "pretrain_command.json"
    if (published / "model.safetensors").exists():
        # Reuse only the checkpoint this recipe would produce: a stale one would mislabel every record.
        if provenance.exists() and _recipe(json.loads(provenance.read_text())["command"]) != _recipe(cmd[1:]):
            raise RuntimeError(f"{published} was pre-trained with another command than this recipe's "
                               f"(see {provenance}); remove it or set `published` to another folder")
    else:
        seconds = _run(cmd, out / "logs" / "pretrain.log")
        atomic_write(str(run_dir / "wall_seconds.json"), json.dumps({"pretrain_wall_seconds": seconds}).encode())
        atomic_write(str(provenance), json.dumps({"command": cmd[1:]}).encode())
    wall, summary = run_dir / "wall_seconds.json", run_dir / "summary.json"
    seconds = (json.loads(wall.read_text())["pretrain_wall_seconds"] if wall.exists()
               else json.loads(summary.read_text()).get("elapsed_s") if summary.exists() else None)
    return str(published), seconds


def _published(cfg: EvalConfig, out: Path) -> Path:
    return Path(repo_path(cfg.published, anchor=True)) if cfg.published else out / "pretrain" / "published"


def run(cfg: EvalConfig) -> list[dict]:
    out = Path(repo_path(cfg.out, anchor=True)) if cfg.out else REPO_ROOT / "runs" / "eval" / cfg.name
    results = out / "results.json"
    records = load_records(results)
    done = {record_key(r) for r in records}
    horizons = cfg.horizons if cfg.task == "forecast" else [None]
    ft_overrides = list(cfg.finetune_overrides)
    from trainer.finetune import FinetuneConfig  # the fine-tuning task as the stages will resolve it

    ft_task = load_config(repo_path(cfg.finetune_config, anchor=True), ft_overrides, cls=FinetuneConfig).task
    probe, frac = ft_task.mode, float(ft_task.label_fraction)
    todo = [(i, h) for h in horizons for i in cfg.inits
            if (cfg.setting, cfg.pretrain_data if i == "simmtm" else None, cfg.finetune_data, i, cfg.recipe,
                cfg.task, h, frac, probe) not in done]
    if not todo:
        print(f"{cfg.name}: all {len(records)} records present in {results}")
    published, pt_seconds = (pretrain_stage(cfg, out) if todo and "simmtm" in {i for i, _ in todo}
                             else (str(_published(cfg, out)), None))
    for init, h in todo:
        tag = f"{init}-H{h}" if h is not None else init
        ft_out = out / "finetune" / tag
        init_args = [f"init={published}"] if init == "simmtm" else ["init=random", f"arch={published}"]
        if init == "random" and not Path(published, "config.json").exists():
            # The baseline must copy the pre-trained architecture; the fine-tune config's model.* defaults
            # would silently compare against another model.
            raise RuntimeError(f"random init copies the architecture of {published}, which does not exist: "
                               f"put simmtm first in `inits` or point `published` at a published folder")
        cmd = [*shlex.split(cfg.launcher), *([] if cfg.launcher else [sys.executable]), "trainer/finetune.py",
               "--config", cfg.finetune_config, "train.progress=false", *ft_overrides, f"task.kind={cfg.task}", *init_args, f"out={ft_out}"]
        if h is not None:
            cmd.append(f"task.horizon={h}")
        wall = _run(cmd, out / "logs" / f"finetune-{tag}.log")
        res = json.loads((ft_out / "result.json").read_text())
        rec = {"setting": cfg.setting, "pretrain_data": cfg.pretrain_data if init == "simmtm" else None,
               "finetune_data": cfg.finetune_data, "init": init, "recipe": cfg.recipe, "task": cfg.task,
               "horizon": h, **{k: res.get(k) for k in ("mse", "mae", "accuracy", "macro_f1", "auroc",
                                                         "train_seconds")},
               "test_seconds": res.get("test_seconds"), "wall_seconds": wall, "best_epoch": res.get("best_epoch"),
               "epochs_run": res.get("epochs_run"), "n_train": res.get("n_train"), "n_test": res.get("n_test"),
               "label_fraction": frac, "mode": probe, "world_size": res.get("world_size"),
               "pretrain_seconds": pt_seconds if init == "simmtm" else None,
               "command": " ".join(shlex.quote(c) for c in cmd)}
        records = [r for r in load_records(results) if record_key(r) != record_key(rec)] + [rec]
        save_records(results, records)
        print(f"  {tag}: " + " ".join(f"{k} {rec[k]:.4f}" for k in ("mse", "mae", "accuracy", "macro_f1", "auroc")
                                     if rec[k] is not None), flush=True)
    md = Path(repo_path(cfg.markdown, anchor=True)) if cfg.markdown else out / "results.md"
    atomic_write(str(md), markdown(load_records(results)).encode())
    return load_records(results)


# ----------------------------------------------------------------------------- report

def _f(v, digits: int = 3) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def _group_key(r: dict) -> tuple:
    return (r["setting"], r["task"], r["finetune_data"], r["recipe"], r.get("mode", "full"),
            r.get("label_fraction", 1.0))


def markdown(records: list[dict]) -> str:
    """One table per (setting, task, fine-tune data, recipe): SimMTM beside random init, per horizon + avg."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault(_group_key(r), []).append(r)
    lines = []
    for (setting, task, ft_data, recipe, mode, frac), rs in sorted(groups.items(), key=lambda kv: str(kv[0])):
        pre = sorted({r["pretrain_data"] for r in rs if r["pretrain_data"]})
        lines.append(f"### {setting} {task}: pre-train {', '.join(pre) or '-'} -> fine-tune {ft_data} "
                     f"(recipe `{recipe}`, {mode}, label fraction {frac:g})\n")
        by = {(r["init"], r["horizon"]): r for r in rs}
        if not any(r["init"] == "random" for r in rs):  # the random baseline does not depend on the setting
            for r in records:
                if r["init"] == "random" and _group_key(r)[1:] == _group_key(rs[0])[1:]:
                    by.setdefault(("random", r["horizon"]), r)
        if task == "forecast":
            paper = PAPER.get((setting, task, pre[0] if pre else None, ft_data), {})
            lines.append("| horizon | SimMTM MSE | SimMTM MAE | random MSE | random MAE | SimMTM ft s | random ft s |")
            lines.append("|---|---|---|---|---|---|---|")
            hs = sorted({r["horizon"] for r in rs})
            for h in hs:
                s, q = by.get(("simmtm", h), {}), by.get(("random", h), {})
                lines.append(f"| {h} | {_f(s.get('mse'))} | {_f(s.get('mae'))} | {_f(q.get('mse'))} | "
                             f"{_f(q.get('mae'))} | {_f(s.get('train_seconds'), 0)} | {_f(q.get('train_seconds'), 0)} |")

            def avg(init: str, k: str):
                vals = [by[(init, h)][k] for h in hs if (init, h) in by]
                return sum(vals) / len(vals) if vals and len(vals) == len(hs) else None
            lines.append(f"| **avg ({len(hs)} horizon{'s' if len(hs) > 1 else ''})** | **{_f(avg('simmtm', 'mse'))}** | {_f(avg('simmtm', 'mae'))} | "
                         f"**{_f(avg('random', 'mse'))}** | {_f(avg('random', 'mae'))} | | |")
            if paper:
                lines.append(f"| paper avg | {paper['simmtm']} | | {paper['random']} | | | |")
        else:
            lines.append("| init | accuracy | macro-F1 | AUROC | ft s |")
            lines.append("|---|---|---|---|---|")
            for init in ("simmtm", "random"):
                r = by.get((init, None))
                if r:
                    lines.append(f"| {init} | {_f(r['accuracy'])} | {_f(r['macro_f1'])} | {_f(r['auroc'])} | "
                                 f"{_f(r['train_seconds'], 0)} |")
        pts = {r.get("pretrain_seconds") for r in rs if r.get("pretrain_seconds")}
        if pts:
            lines.append(f"\nPre-training wall time: {', '.join(f'{p:.0f} s' for p in sorted(pts))}.")
        lines.append("")
    return "\n".join(lines) + "\n"


def report(paths: list[str], json_out: Optional[str], md_out: Optional[str]) -> list[dict]:
    """Merge results files (later files win per key) into one JSON and one markdown table."""
    merged: dict[tuple, dict] = {}
    for p in paths:
        for r in load_records(Path(p)):
            merged[record_key(r)] = r
    records = list(merged.values())
    if json_out:
        save_records(Path(json_out), records)
    text = markdown(records)
    if md_out:
        atomic_write(md_out, text.encode())
    else:
        print(text)
    return records


def main(argv: Optional[list[str]] = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "report":
        ap = argparse.ArgumentParser(prog="python -m trainer.evaluate report")
        ap.add_argument("results", nargs="+")
        ap.add_argument("--json")
        ap.add_argument("--md")
        a = ap.parse_args(argv[1:])
        report(a.results, a.json, a.md)
        return
    from trainer import suite
    from trainer.cli import show_help

    if show_help(argv, __doc__ + "\nA config file with `kind: foundation` runs a foundation suite (SuiteConfig); "
                 "`--report` prints its tables from the records.", EvalConfig, suite.SuiteConfig):
        return
    report_only = "--report" in argv
    argv = [a for a in argv if a != "--report"]
    path, overrides = split_cli(argv)
    if path is not None and _is_suite(path):  # a foundation suite: many sets x regimes x seeds, in-process
        cfg = load_config(path, overrides, cls=suite.SuiteConfig)
        if report_only:
            print(suite.markdown(load_records(suite.out_dir(cfg) / "results.json"), cfg))
        else:
            suite.run(cfg)
        return
    run(load_config(path, overrides, cls=EvalConfig))


def _is_suite(path: str) -> bool:
    import yaml

    p = Path(repo_path(path))
    try:
        return (yaml.safe_load(p.read_text()) or {}).get("kind") == "foundation"
    except (OSError, yaml.YAMLError):
        return False  # load_config names the problem


if __name__ == "__main__":
    from trainer import cli
    from trainer import distributed as dist

    dist.exit_process(cli.run(main))
