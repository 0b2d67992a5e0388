"""The foundation-model proof: one published checkpoint against random initialisation of the same
architecture, on many downstream sets, regimes and seeds, with the same fine-tuning budget for both.

    python -m trainer.evaluate --config configs/eval_foundation.yaml        # run, or resume
    python -m trainer.evaluate --config configs/eval_foundation.yaml --report   # tables from the records

Forecasting sets also get two baselines, as rows of the tables: seasonal naive (no training) and DLinear
(trained with the same data, budget and validation-only selection), and every forecast is scored by MSE,
MAE, MASE, sMAPE and skill against seasonal naive (trainer/metrics.py).

Why in-process: a suite is hundreds of short fine-tunes; a process each would spend more time importing
torch than training. Every fine-tune is still `trainer.finetune.finetune` (validation-only selection,
the test split read once, after selection), data loaded once per set and seed. Records land in
`<out>/results.json` after each run, so an interrupted suite resumes where it stopped.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import numpy as np

from data_pipeline import fs
from trainer.config import REPO_ROOT, load_config, repo_path, to_dict
from trainer.evaluate import load_records, save_records

# regime -> (task.mode, task.label_fraction)
REGIMES = {"full": ("full", 1.0), "label10": ("full", 0.1), "linear_probe": ("linear_probe", 1.0),
           "lora": ("lora", 1.0)}
REGIME_NAMES = {"full": "full fine-tuning, 100% labels", "label10": "full fine-tuning, 10% labels",
                "linear_probe": "linear probe, 100% labels", "lora": "LoRA (frozen encoder + adapters), 100% labels"}
# forecasting baselines, recorded with init=<name>: seasonal naive once per set and horizon (regime and
# seed None), DLinear per seed as regime "full"
BASELINES = {"seasonal_naive": "seasonal naive", "dlinear": "DLinear"}
RECORD_FIELDS = ("mse", "mae", "mase", "smape", "skill", "accuracy", "macro_f1", "auroc", "train_seconds",
                 "test_seconds", "best_epoch", "epochs_run", "steps", "n_train", "n_val", "n_test",
                 "trainable_params", "season")


@dataclass
class SuiteTask:
    name: str  # label in the tables, e.g. ETTh1
    kind: Literal["forecast", "classify"] = "forecast"
    source: str = ""  # data.source for trainer.finetune (a TSLib CSV, a TF-C/UCR folder)
    horizons: list[int] = field(default_factory=lambda: [96, 336])  # forecast only
    overrides: list[str] = field(default_factory=list)  # fine-tuning overrides for this set


@dataclass
class SuiteConfig:
    kind: Literal["foundation"] = "foundation"
    name: str = "foundation"
    published: str = ""  # a published folder/URL or a bundled name (checkpoints/<name>)
    finetune_config: str = "configs/finetune_foundation.yaml"
    finetune_overrides: list[str] = field(default_factory=list)  # for every task
    # per regime (e.g. a linear probe's larger step for the head alone), for both inits alike; and per
    # init (each init's recipe chosen on validation, bench/lpft_defaults.py). Not data settings: the data
    # of a set is loaded once for all its runs.
    regime_overrides: dict = field(default_factory=dict)
    init_overrides: dict = field(default_factory=dict)
    regimes: list[str] = field(default_factory=lambda: list(REGIMES))
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    inits: list[Literal["simmtm", "random"]] = field(default_factory=lambda: ["simmtm", "random"])
    baselines: list[str] = field(default_factory=lambda: list(BASELINES))  # forecasting sets only
    tasks: list[SuiteTask] = field(default_factory=list)
    out: str = ""  # default runs/eval/<name>
    markdown: str = ""  # default <out>/results.md

    def validate(self) -> None:
        bad = [r for r in self.regimes if r not in REGIMES]
        if bad:
            raise ValueError(f"regimes: {bad} not in {list(REGIMES)}")
        if [b for b in self.baselines if b not in BASELINES]:
            raise ValueError(f"baselines: {self.baselines}: only {list(BASELINES)}")
        if not self.seeds:
            raise ValueError("seeds: at least one seed")
        for name, table, allowed in (("regime_overrides", self.regime_overrides, list(REGIMES)),
                                     ("init_overrides", self.init_overrides, ["simmtm", "random"])):
            bad = [r for r in table if r not in allowed]
            if bad or not all(isinstance(v, list) for v in table.values()):
                raise ValueError(f"{name}: a list of overrides per key in {allowed}, got {bad or 'a non-list'}")
            data_keys = [o for v in table.values() for o in v if str(o).startswith(DATA_KEYS)]
            if data_keys:
                raise ValueError(f"{name}: {data_keys} change the data, which a set loads once for all its runs; "
                                 f"put them in the task's overrides")


KEY = ("suite", "task", "horizon", "regime", "init", "seed")
DATA_KEYS = ("data.", "task.val_stride", "task.test_stride", "task.val_fraction", "task.fit_length", "task.horizon",
             "task.kind", "train.seed")


def out_dir(cfg: SuiteConfig) -> Path:
    return Path(repo_path(cfg.out, anchor=True)) if cfg.out else REPO_ROOT / "runs" / "eval" / cfg.name


def _published(cfg: SuiteConfig) -> str:
    from models.hub import resolve

    return resolve(cfg.published)


def _runs(cfg: SuiteConfig, task: SuiteTask) -> list[tuple]:
    """(regime, init, seed) of every run of a set and horizon: the baselines first, then the fine-tunes."""
    runs = []
    if task.kind == "forecast":
        runs += [(None, "seasonal_naive", None)] if "seasonal_naive" in cfg.baselines else []
        runs += [("full", "dlinear", s) for s in cfg.seeds] if "dlinear" in cfg.baselines else []
    return runs + [(r, i, s) for r in cfg.regimes for s in cfg.seeds for i in cfg.inits]


def _seasonal_naive(data: dict, horizon: int, batch_size: int) -> dict:
    """The seasonal-naive forecast's test metrics: nothing to train or select."""
    from models.baselines import SeasonalNaive
    from trainer.distributed import DistEnv
    from trainer.finetune import evaluate

    test = data["test"]
    season = test.seasonal.season if test.seasonal else 1
    t0 = time.perf_counter()
    m = evaluate(SeasonalNaive(season, horizon), test, "forecast", batch_size, DistEnv())
    return {**m, "train_seconds": 0.0, "test_seconds": time.perf_counter() - t0, "steps": 0, "trainable_params": 0,
            "n_train": len(data["train"].x), "n_val": len(data["val"].x), "n_test": len(test.x), "season": season}


def run(cfg: SuiteConfig, only: Optional[list[str]] = None) -> list[dict]:
    """Every (task, horizon, regime, seed, init) and baseline not yet in the results file; returns all records."""
    from trainer.finetune import FinetuneConfig, classify_data, finetune, forecast_data
    from models.hub import load_state

    out = out_dir(cfg)
    results = out / "results.json"
    records = load_records(results)
    done = {tuple(r.get(k) for k in KEY) for r in records}
    published = _published(cfg)
    seq_len = load_state(published)[0].seq_len
    weights = {"simmtm": [f"init={published}"], "random": ["init=random", f"arch={published}"],
               "dlinear": ["init=random", f"arch={published}", "task.baseline=dlinear"],
               "seasonal_naive": ["init=random", f"arch={published}"]}
    t_suite = time.perf_counter()
    for task in cfg.tasks:
        if only and task.name not in only:
            continue
        horizons = task.horizons if task.kind == "forecast" else [None]
        for h in horizons:
            cache: dict = {}
            for regime, init, seed in _runs(cfg, task):
                key = (cfg.name, task.name, h, regime, init, seed)
                if key in done:
                    continue
                mode, frac = REGIMES[regime or "full"]
                overrides = ["train.progress=false", *cfg.finetune_overrides, *task.overrides,
                             *cfg.regime_overrides.get(regime, []), *cfg.init_overrides.get(init, []),
                             f"task.kind={task.kind}",
                             f"data.source={task.source}", f"task.mode={mode}",
                             f"task.label_fraction={frac}", *([f"train.seed={seed}"] if seed is not None else []),
                             *weights[init], *([f"task.horizon={h}"] if h is not None else [])]
                ft = load_config(repo_path(cfg.finetune_config, anchor=True), overrides, cls=FinetuneConfig)
                # data once per set (and per seed where the validation carve depends on it)
                dkey = seed if task.kind == "classify" else None
                if dkey not in cache:
                    cache[dkey] = (forecast_data(ft, seq_len) if task.kind == "forecast"
                                   else classify_data(ft))
                t0 = time.perf_counter()
                res = (_seasonal_naive(cache[dkey], h, ft.task.eval_batch_size) if init == "seasonal_naive"
                       else finetune(ft, data=cache[dkey]))
                res.pop("_model", None)
                rec = {"suite": cfg.name, "task": task.name, "kind": task.kind, "horizon": h,
                       "regime": regime, "init": init, "seed": seed, "mode": mode, "label_fraction": frac,
                       **{k: res.get(k) for k in RECORD_FIELDS},
                       "wall_seconds": time.perf_counter() - t0, "published": cfg.published,
                       "overrides": overrides}
                records = [r for r in records if tuple(r.get(k) for k in KEY) != key] + [rec]
                save_records(results, records)
                done.add(key)
                metric = (f"mse {rec['mse']:.4f}" if task.kind == "forecast"
                          else f"acc {rec['accuracy']:.4f}")
                print(f"[suite {time.perf_counter() - t_suite:6.0f}s] {task.name}"
                      f"{'/H' + str(h) if h else ''} {regime} seed {seed} {init}: {metric} "
                      f"({rec['wall_seconds']:.1f}s)", flush=True)
    md = Path(repo_path(cfg.markdown, anchor=True)) if cfg.markdown else out / "results.md"
    fs.atomic_write(str(md), markdown(records, cfg).encode())
    fs.atomic_write(str(out / "suite_config.json"), json.dumps(to_dict(cfg), indent=2).encode())
    return records


# ----------------------------------------------------------------------------- report

def _stats(values: list[float]) -> tuple[float, float]:
    a = np.asarray(values, dtype=np.float64)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0


def summarise(records: list[dict]) -> list[dict]:
    """Per (task, horizon, regime): mean/std of the metric for each init and the relative gain.

    Gain: forecasting, % lower MSE than random init; classification, accuracy points over random."""
    groups: dict[tuple, dict[str, list[float]]] = {}
    kinds, params = {}, {}
    for r in records:
        metric = r["mse"] if r["kind"] == "forecast" else r["accuracy"]
        if metric is None or r["init"] not in ("simmtm", "random"):
            continue
        g = groups.setdefault((r["task"], r["horizon"], r["regime"]), {})
        g.setdefault(r["init"], []).append(metric)
        kinds[r["task"]] = r["kind"]
        if r["init"] == "simmtm":
            params[(r["task"], r["horizon"], r["regime"])] = r.get("trainable_params")
    rows = []
    for (task, h, regime), by in groups.items():
        if "simmtm" not in by or "random" not in by:
            continue
        (sm, ss), (rm, rs) = _stats(by["simmtm"]), _stats(by["random"])
        forecast = kinds[task] == "forecast"
        gain = 100.0 * (rm - sm) / rm if forecast else 100.0 * (sm - rm)
        rows.append({"task": task, "horizon": h, "regime": regime, "kind": kinds[task], "simmtm": sm,
                     "simmtm_std": ss, "random": rm, "random_std": rs, "n": min(len(by["simmtm"]), len(by["random"])),
                     "gain": gain, "trainable_params": params.get((task, h, regime)),
                     # not worse than one standard deviation (of the random baseline's seeds, or SimMTM's if larger)
                     "within_1std": (sm <= rm + max(rs, ss)) if forecast else (sm >= rm - max(rs, ss))})
    order = {r: i for i, r in enumerate(REGIMES)}
    return sorted(rows, key=lambda r: (r["kind"], r["task"], r["horizon"] or 0, order.get(r["regime"], 9)))


def targets(rows: list[dict]) -> dict:
    """The issue's targets per set (a forecasting set's gain is its mean over horizons): >= 3% MSE /
    >= 2 accuracy points in the label10 and linear-probe regimes; at 100% labels within one std."""
    sets: dict[str, dict] = {}
    for r in rows:
        s = sets.setdefault(r["task"], {"kind": r["kind"], "gains": {}, "within": []})
        s["gains"].setdefault(r["regime"], []).append(r["gain"])
        if r["regime"] == "full":
            s["within"].append(r["within_1std"])
    out = {}
    for name, s in sets.items():
        need = 3.0 if s["kind"] == "forecast" else 2.0
        g = {k: float(np.mean(v)) for k, v in s["gains"].items()}
        out[name] = {"gain": g, "label10_met": g.get("label10", -math.inf) >= need,
                     "linear_probe_met": g.get("linear_probe", -math.inf) >= need,
                     "full_within_1std": all(s["within"]) if s["within"] else None}
    return out


def forecast_table(records: list[dict]) -> list[dict]:
    """Per forecasting (task, horizon, model, regime), baselines included: the means over seeds of every
    forecasting metric and of the trainable-parameter count, and the MSE's std."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        if r["kind"] == "forecast" and r["mse"] is not None:
            groups.setdefault((r["task"], r["horizon"], r["init"], r["regime"]), []).append(r)
    rows = []
    for (task, h, init, regime), rs in groups.items():
        row = {"task": task, "horizon": h, "init": init, "regime": regime, "n": len(rs),
               "season": rs[0].get("season"), "mse_std": _stats([r["mse"] for r in rs])[1]}
        for k in ("mse", "mae", "mase", "smape", "skill", "trainable_params"):
            vals = [r.get(k) for r in rs if r.get(k) is not None]
            row[k] = _stats(vals)[0] if vals else None
        rows.append(row)
    model = {m: i for i, m in enumerate([*BASELINES, "simmtm", "random"])}
    regime = {r: i for i, r in enumerate(REGIMES)}
    return sorted(rows, key=lambda r: (r["task"], r["horizon"], model.get(r["init"], 9), regime.get(r["regime"], -1)))


def _num(v: Optional[float], fmt: str = "{:.3f}") -> str:
    return "-" if v is None else fmt.format(v)


def markdown(records: list[dict], cfg: Optional[SuiteConfig] = None) -> str:
    rows = summarise(records)
    lines = []
    if cfg is not None:
        lines.append(f"Checkpoint `{cfg.published}`; seeds {cfg.seeds}; mean ± std over seeds; test split read "
                     f"once per run, after validation-based selection.\n")
    for kind, metric, better in (("forecast", "MSE", "lower"), ("classify", "accuracy", "higher")):
        sub = [r for r in rows if r["kind"] == kind]
        if not sub:
            continue
        gain_h = "MSE gain %" if kind == "forecast" else "gain (points)"
        lines.append(f"| set | {'H | ' if kind == 'forecast' else ''}regime | trainable params | SimMTM {metric} | "
                     f"random {metric} | {gain_h} | full: within 1 std |")
        lines.append("|---|" + ("---|" if kind == "forecast" else "") + "---|---|---|---|---|---|")
        for r in sub:
            fmt = "{:.3f} ± {:.3f}"
            lines.append(f"| {r['task']} | {str(r['horizon']) + ' | ' if kind == 'forecast' else ''}"
                         f"{r['regime']} | {_num(r['trainable_params'], '{:,.0f}')} | "
                         f"{fmt.format(r['simmtm'], r['simmtm_std'])} | "
                         f"{fmt.format(r['random'], r['random_std'])} | {r['gain']:+.1f} | "
                         f"{('yes' if r['within_1std'] else 'no') if r['regime'] == 'full' else ''} |")
        lines.append(f"\n({metric}: {better} is better.)\n")
    table = forecast_table(records)
    if table:
        lines.append("Forecasting, every model beside the baselines (test, mean over seeds; MSE ± std). MASE: MAE "
                     "over the training split's seasonal-naive MAE, per channel (season m); sMAPE in [0, 2] on raw "
                     "values; skill: 1 - MASE / MASE of seasonal naive (> 0 beats it).\n")
        lines.append("| set | H | model | regime | trainable params | MSE | MAE | MASE | sMAPE | skill |")
        lines.append("|---|---|---|---|---|---|---|---|---|---|")
        for r in table:
            name = BASELINES.get(r["init"], "SimMTM" if r["init"] == "simmtm" else r["init"])
            name += f" (m={r['season']})" if r["init"] == "seasonal_naive" else ""
            lines.append(f"| {r['task']} | {r['horizon']} | {name} | {r['regime'] or '-'} | "
                         f"{_num(r['trainable_params'], '{:,.0f}')} | {r['mse']:.3f} ± {r['mse_std']:.3f} | "
                         f"{_num(r['mae'])} | {_num(r['mase'])} | {_num(r['smape'])} | {_num(r['skill'])} |")
        lines.append("")
    t = targets(rows)
    if t:
        lines.append("| set | label10 gain | linear-probe gain | full gain | label10 target | linear-probe target | "
                     "full within 1 std |")
        lines.append("|---|---|---|---|---|---|---|")
        for name, v in t.items():
            g = v["gain"]
            lines.append(f"| {name} | {g.get('label10', float('nan')):+.1f} | {g.get('linear_probe', float('nan')):+.1f} "
                         f"| {g.get('full', float('nan')):+.1f} | {'met' if v['label10_met'] else 'missed'} | "
                         f"{'met' if v['linear_probe_met'] else 'missed'} | "
                         f"{'-' if v['full_within_1std'] is None else 'yes' if v['full_within_1std'] else 'no'} |")
        both = sum(v["label10_met"] and v["linear_probe_met"] for v in t.values())
        lines.append(f"\nSets meeting both the 10%-label and linear-probe targets: {both} of {len(t)}.\n")
    secs = [r.get("wall_seconds") or 0.0 for r in records]
    lines.append(f"{len(records)} fine-tuning runs, {sum(secs) / 60:.1f} min of fine-tuning wall time in all.\n")
    return "\n".join(lines) + "\n"
