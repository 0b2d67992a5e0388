"""The benchmark suite: `python -m bench` runs every benchmark (each in its own process), then
prints one table of the measured figures against their targets. `python -m bench --table` only
prints the table from bench/results/*.json. Expect ~20-30 minutes on 2 CPU cores.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
SUITE = ["mask_gen", "step", "flops", "similarity", "data_stream", "stall", "scaling"]


def load(name: str):
    p = RESULTS / f"{name}.json"
    return json.loads(p.read_text()) if p.exists() else None


def rows() -> list[tuple[str, str, str, str]]:
    out = []
    m = load("mask_gen")
    if m:
        out.append(("mask generation vs per-element loop", f"{m['ratio']:.0f}x ({m['ours_s'] * 1e3:.2f} ms vs "
                    f"{m['loop_s'] * 1e3:.0f} ms per batch)", ">= 1000x", "met" if m["ratio"] >= 1000 else "not met"))
    s = load("step")
    if s:
        for r in s:
            sp = r.get("speedup_vs_authors_per_series", float("nan"))
            out.append((f"pre-training step, batch {r['batch']}", f"{r['step_s']:.2f} s, {r['peak_gb']:.2f} GB, "
                        f"{sp:.1f}x authors per series", ">= 5x per series" + (", < 8 GB" if r["batch"] == 16 else ""),
                        "met" if sp >= 5 and (r["batch"] != 16 or r["peak_gb"] < 8) else "not met"))
    f = load("flops")
    if f:
        frac = f["dominant_layers_gflops"] / f["peak_gflops"]
        out.append(("FLOP/s, dominant layers", f"{f['dominant_layers_gflops']:.0f} of {f['peak_gflops']:.0f} GFLOP/s "
                    f"({100 * frac:.0f}%); whole step {f['step_gflops']:.0f}", ">= 50% of peak",
                    "met" if frac >= 0.5 else "not met"))
    mem = load("memory")
    if mem:
        for r in mem:
            if r["path"] == "ours":
                peak = r.get("peak_gb")
                out.append((f"similarity+aggregation+loss, N={r['n']}, width {r['value_width']}",
                            f"{peak:.2f} GB, {r.get('fwd_bwd_s') or float('nan'):.2f} s" if peak is not None
                            else "not run", "< 2 GB at N=32768" if r["n"] == 32768 else "linear in N",
                            ("met" if peak is not None and peak < 2 else "not met") if r["n"] == 32768 else "-"))
    d = load("data_stream")
    if d:
        best = {}
        for r in d:
            if r.get("dataset", "ETTh1") == "ETTh1":
                best[(r["source"], r["workers"])] = r["windows_per_s"]
        pandas = max(v for (src, _), v in best.items() if src == "pandas-csv")
        pq = max(v for (src, _), v in best.items() if src == "parquet")
        out.append(("data stream (ETTh1, parquet vs pandas CSV)", f"{pq:,.0f} vs {pandas:,.0f} windows/s", "-", "-"))
    st = load("stall")
    if st:
        out.append(("trainer data-wait fraction", f"{100 * st['stall_fraction']:.2f}%", "< 2%",
                    "met" if st["stall_fraction"] < 0.02 else "not met"))
    sc = load("scaling")
    if sc:
        for zero in (0, 2):
            one = [r["series_per_s"] for r in sc["runs"] if r["ranks"] == 1 and r["zero"] == zero]
            two = [r["series_per_s"] for r in sc["runs"] if r["ranks"] == 2 and r["zero"] == zero]
            if one and two:
                out.append((f"2 ranks vs 1 rank, ZeRO {zero}", f"{two[0] / one[0]:.2f}x series/s", ">= 0.77x",
                            "met" if two[0] / one[0] >= 0.77 else "not met"))
    return out


def table() -> str:
    r = rows()
    w = [max(len(x[i]) for x in r + [("benchmark", "measured", "target", "status")]) for i in range(4)]
    lines = [" | ".join(h.ljust(w[i]) for i, h in enumerate(("benchmark", "measured", "target", "status"))),
             "-|-".join("-" * x for x in w)]
    lines += [" | ".join(c.ljust(w[i]) for i, c in enumerate(x)) for x in r]
    return "\n".join(lines)


def main(table_only: bool = False) -> None:
    if not table_only:
        for name in SUITE:
            print(f"== bench/{name}.py", flush=True)
            subprocess.run([sys.executable, str(ROOT / "bench" / f"{name}.py")], cwd=ROOT, check=True)
    print()
    print(table())


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--table", action="store_true", help="only print the table from bench/results/*.json")
    main(ap.parse_args().table)
