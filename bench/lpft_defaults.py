"""How the fine-tuning defaults (head warm-up, encoder learning-rate multiplier, schedule) were chosen:
on VALIDATION scores only (the test split is never evaluated: task.evaluate_test=false), fine-tuning the
foundation checkpoint with the suite's budget (configs/eval_foundation.yaml) on a few of its sets.

    python -m bench.lpft_defaults [--sets ETTh1 Gesture ECG5000] [--seeds 0] [--published DIR]
    python -m bench.lpft_defaults --probe      # the linear probe's learning rate, for both inits alike
"""
from __future__ import annotations

import argparse
import time
from itertools import product

from bench.results_io import write_result
from trainer.config import REPO_ROOT, load_config
from trainer.finetune import FinetuneConfig, classify_data, finetune, forecast_data
from trainer.suite import REGIMES, SuiteConfig, _published

SETTINGS = {
    "plain: no warm-up, one rate (lr 5e-4)": ["task.head_warmup_epochs=0", "task.encoder_lr_mult=1.0"],
    "LP-FT: 1 head epoch, one rate (lr 5e-4)": ["task.head_warmup_epochs=1", "task.encoder_lr_mult=1.0"],
    "LP-FT: 1 head epoch, head 2e-3, encoder x0.25": ["task.head_warmup_epochs=1", "optim.lr=2e-3",
                                                      "task.encoder_lr_mult=0.25"],
    "no warm-up, head 2e-3, encoder x0.25": ["task.head_warmup_epochs=0", "optim.lr=2e-3",
                                             "task.encoder_lr_mult=0.25"],
    "the authors' schedule (lr 5e-4)": ["task.schedule=authors", "task.head_warmup_epochs=0",
                                        "task.encoder_lr_mult=1.0"],
}

PROBE_SETTINGS = {f"probe lr {lr}": [f"optim.lr={lr}"] for lr in ("5e-4", "2e-3", "5e-3")}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/eval_foundation.yaml")
    ap.add_argument("--sets", nargs="*", default=["ETTh1", "Gesture", "ECG5000"])
    ap.add_argument("--seeds", nargs="*", type=int, default=[0])
    ap.add_argument("--regimes", nargs="*", default=["full", "label10"])
    ap.add_argument("--published", default="")
    ap.add_argument("--probe", action="store_true")
    ap.add_argument("--inits", nargs="*", default=["simmtm", "random"])
    a = ap.parse_args()
    suite = load_config(str(REPO_ROOT / a.config), [f"published={a.published}"] if a.published else [],
                        cls=SuiteConfig)
    published = _published(suite)
    settings = PROBE_SETTINGS if a.probe else SETTINGS
    regimes = ["linear_probe"] if a.probe else a.regimes
    inits = a.inits
    rows = []
    for task in [t for t in suite.tasks if t.name in a.sets]:
        h = task.horizons[0] if task.kind == "forecast" else None
        for regime in regimes:
            mode, frac = REGIMES[regime]
            for seed in a.seeds:
                data = None
                for init, (name, extra) in product(inits, settings.items()):
                    ov = [*suite.finetune_overrides, *task.overrides, f"task.kind={task.kind}",
                          f"data.source={task.source}", f"task.mode={mode}", f"task.label_fraction={frac}",
                          f"train.seed={seed}", "task.evaluate_test=false",
                          *([f"init={published}"] if init == "simmtm" else ["init=random", f"arch={published}"]),
                          *([f"task.horizon={h}"] if h else []), *extra]
                    cfg = load_config(str(REPO_ROOT / suite.finetune_config), ov, cls=FinetuneConfig)
                    if data is None:
                        from models.hub import load_state
                        data = (forecast_data(cfg, load_state(published)[0].seq_len) if task.kind == "forecast"
                                else classify_data(cfg))
                    t0 = time.perf_counter()
                    r = finetune(cfg, data=data)
                    val = r["best_val"]
                    score = val["val_mse"] if task.kind == "forecast" else val["val_accuracy"]
                    rows.append({"set": task.name, "horizon": h, "regime": regime, "seed": seed, "init": init,
                                 "setting": name,
                                 "val_metric": "mse" if task.kind == "forecast" else "accuracy", "val": score,
                                 "seconds": time.perf_counter() - t0})
                    print(f"{task.name} {regime} seed {seed} {init} {name}: val {rows[-1]['val_metric']} {score:.4f}",
                          flush=True)
    # rank settings within each (set, regime, seed, init): 1 = best validation score
    ranks: dict[str, list[int]] = {n: [] for n in settings}
    keys = {(r["set"], r["regime"], r["seed"], r["init"]) for r in rows}
    for k in keys:
        group = [r for r in rows if (r["set"], r["regime"], r["seed"], r["init"]) == k]
        lower = group[0]["val_metric"] == "mse"
        for i, r in enumerate(sorted(group, key=lambda r: r["val"] if lower else -r["val"])):
            ranks[r["setting"]].append(i + 1)
    mean_rank = {n: sum(v) / len(v) for n, v in ranks.items() if v}
    for n, v in sorted(mean_rank.items(), key=lambda kv: kv[1]):
        print(f"mean validation rank {v:.2f} (both inits): {n}")
    by_init = {}
    for init in inits:  # each init's own ranking: its recipe may be chosen separately
        r = {n: [] for n in settings}
        for k in {key for key in keys if key[3] == init}:
            group = [x for x in rows if (x["set"], x["regime"], x["seed"], x["init"]) == k]
            lower = group[0]["val_metric"] == "mse"
            for i, x in enumerate(sorted(group, key=lambda x: x["val"] if lower else -x["val"])):
                r[x["setting"]].append(i + 1)
        by_init[init] = {n: sum(v) / len(v) for n, v in r.items() if v}
        best = min(by_init[init].items(), key=lambda kv: kv[1])
        print(f"{init}: best mean validation rank {best[1]:.2f}: {best[0]}")
    mean_rank = {"both": mean_rank, **by_init}
    write_result("probe_lr" if a.probe else "lpft_defaults",
                 {"rows": rows, "mean_rank": mean_rank, "published": suite.published})


if __name__ == "__main__":
    main()
