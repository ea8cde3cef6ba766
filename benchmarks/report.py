"""Aggregate case results: medians with min/max over runs, pair-by-pair ratios, targets, Markdown.

A *run* of a training-step case is one process; its value is the median over its timed steps. Ratios
opsd/X are computed per pair (repeat i of opsd with repeat i of X, neighbours in the alternating
order) and then summarised, never as a ratio of medians.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from benchmarks.common import summary
from benchmarks.suites import Suite

# trl: TRL in the suite's precision (fp32 on CPU); trl_bf16: TRL at its default bf16 autocast
BASELINES = ("trl", "trl_bf16", "naive")
TRL_BASELINES = ("trl", "trl_bf16")
STEP_METRICS = [  # (key, label, higher is better)
    ("tok_s", "completion tok/s (whole step)", True),
    ("sample_tok_s", "sampling tok/s", True),
    ("score_tok_s", "scoring tok/s (teacher+student fwd/bwd+loss)", True),
    ("step_s", "step s", False),
    ("opt_s", "optimizer s", False),
    ("peak_mb", "peak memory MB (step)", False),
    ("peak_sample_mb", "peak memory MB (sampling)", False),
    ("peak_score_mb", "peak memory MB (scoring)", False),
    ("mfu", "achieved fraction of matmul FLOP/s", True),
]


def _median(values: list[float]) -> float | None:
    return summary(values)["median"]  # type: ignore[return-value]


def _process_values(result: dict[str, Any], matmul: float | None) -> dict[str, float | None]:
    """One step-case process → its per-metric value (median over its timed steps)."""
    steps = result["result"]["steps"]
    out: dict[str, float | None] = {}
    for key in ("tok_s", "sample_tok_s", "score_tok_s", "step_s", "opt_s", "flops_per_s", "tokens", "flops"):
        vals = [s[key] for s in steps if s.get(key) is not None]
        out[key] = _median(vals)
    for key in ("peak_sample_mb", "peak_score_mb", "peak_opt_mb"):
        out[key] = max(s[key] for s in steps)
    out["peak_mb"] = max(out["peak_sample_mb"], out["peak_score_mb"], out["peak_opt_mb"])  # type: ignore[type-var]
    out["mfu"] = out["flops_per_s"] / matmul if matmul and out["flops_per_s"] else None
    return out


def _pair_ratios(a: list[dict[str, Any]], b: list[dict[str, Any]], key: str) -> list[float]:
    by_rep = {r["repeat"]: r["values"][key] for r in b}
    return [r["values"][key] / by_rep[r["repeat"]] for r in a
            if r["values"].get(key) and by_rep.get(r["repeat"])]


def _steps(results: list[dict[str, Any]], matmul: float | None) -> dict[str, Any]:
    groups: dict[str, dict[str, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    models: dict[str, str] = {}
    roles: dict[str, str | None] = {}
    for r in results:
        if r["kind"] != "step" or not r.get("ok"):
            continue
        spec = r["spec"]
        gid = str(spec["group"])
        models[gid] = spec["model"] + (" (default profile)" if spec.get("profile") == "default" else "")
        roles[gid] = spec.get("role")
        groups[gid][spec["impl"]].append({"repeat": spec["repeat"], "values": _process_values(r, matmul),
                                          "settings": r["result"]["settings"]})
    out = {}
    for gid, impls in groups.items():
        entry: dict[str, Any] = {"model": models[gid], "role": roles[gid], "impls": {}, "ratios": {}}
        for impl, runs in impls.items():
            entry["impls"][impl] = {key: summary([x["values"][key] for x in runs if x["values"][key] is not None])
                                    for key, _l, _h in STEP_METRICS}
            entry["impls"][impl]["runs"] = [x["values"] for x in runs]
            entry["settings"] = runs[0]["settings"]
        for mine in [i for i in impls if i not in BASELINES]:
            for other in BASELINES:
                if other in impls:
                    entry["ratios"][f"{mine}/{other}"] = {
                        key: summary(_pair_ratios(impls[mine], impls[other], key)) for key, _l, _h in STEP_METRICS}
        out[gid] = entry
    return out


def _kernel_rows(results: list[dict[str, Any]], group_prefix: str) -> list[dict[str, Any]]:
    rows = []
    for r in results:
        if r["kind"] != "kernel" or not str(r["spec"].get("group", "")).startswith(group_prefix):
            continue
        res = r.get("result") or {}
        rows.append({
            "group": r["spec"].get("group"), "impl": r["spec"]["impl"], "rows": r["spec"]["rows"],
            "vocab": r["spec"]["vocab"], "hidden": r["spec"]["hidden"], "ok": r.get("ok", False),
            "skipped": res.get("skipped") or r.get("error"), "time_s": summary(res.get("times_s", [])),
            "times_s": res.get("times_s", []), "peak_extra_mb": res.get("peak_extra_mb"), "loss": res.get("loss"),
        })
    return rows


def _linear_fit(points: list[tuple[float, float]]) -> tuple[float, float] | None:
    """Least-squares (intercept, slope); one point: through the origin."""
    if not points:
        return None
    if len(points) == 1:
        return 0.0, points[0][1] / points[0][0]
    n = len(points)
    mx = sum(p[0] for p in points) / n
    my = sum(p[1] for p in points) / n
    sxx = sum((p[0] - mx) ** 2 for p in points)
    slope = sum((p[0] - mx) * (p[1] - my) for p in points) / sxx
    return my - slope * mx, slope


def _kernel(rows: list[dict[str, Any]]) -> dict[str, Any]:
    by_head: dict[tuple[int, int], dict[str, dict[int, dict[str, Any]]]] = defaultdict(lambda: defaultdict(dict))
    for row in rows:
        by_head[(row["vocab"], row["hidden"])][row["impl"]][row["rows"]] = row
    out = {}
    for (vocab, hidden), impls in by_head.items():
        naive = impls.get("naive", {})
        fit = _linear_fit([(t, r["peak_extra_mb"]) for t, r in naive.items() if r["ok"] and not r["skipped"]])
        for t, r in naive.items():
            if r["skipped"] and fit:
                r["projected_peak_extra_mb"] = fit[0] + fit[1] * t
        chunked = impls.get("chunked", {})
        compare = {}
        for t, c in chunked.items():
            n = naive.get(t)
            if not (c["ok"] and n):
                continue
            n_mem = n.get("projected_peak_extra_mb") if n["skipped"] else n["peak_extra_mb"]
            time_ratio = summary([nt / ct for nt, ct in zip(n["times_s"], c["times_s"], strict=False)]) if n["times_s"] else None
            compare[t] = {"memory_naive_over_chunked": (n_mem / c["peak_extra_mb"]) if n_mem and c["peak_extra_mb"]
                          else None, "naive_projected": bool(n["skipped"]), "time_naive_over_chunked": time_ratio}
        ts = sorted(t for t, c in chunked.items() if c["ok"])
        growth = None
        if len(ts) >= 2 and chunked[ts[0]]["peak_extra_mb"]:
            growth = {"rows": [ts[0], ts[-1]], "memory_ratio": chunked[ts[-1]]["peak_extra_mb"] /
                      chunked[ts[0]]["peak_extra_mb"], "rows_ratio": ts[-1] / ts[0]}
        out[f"{vocab}x{hidden}"] = {"vocab": vocab, "hidden": hidden, "compare": compare, "chunked_growth": growth,
                                    "naive_fit_mb": fit}
    return out


def aggregate(suite: Suite, results: list[dict[str, Any]]) -> dict[str, Any]:
    matmul_res = next((r for r in results if r["kind"] == "matmul" and r.get("ok")), None)
    matmul = matmul_res["result"]["flops_best"] if matmul_res else None
    machine = next((r["machine"] for r in results if r.get("machine")), {})
    steps = _steps(results, matmul)
    kernel_rows = _kernel_rows(results, "kernel")
    report = {
        "suite": suite.name, "smoke": suite.smoke, "machine": machine, "device": suite.device,
        "threads": suite.threads, "precision": suite.precision,
        "matmul": matmul_res["result"] if matmul_res else None, "steps": steps,
        "loss_only": _kernel_rows(results, "loss_only"), "kernel_rows": kernel_rows, "kernel": _kernel(kernel_rows),
        "failures": [{"kind": r["kind"], "spec": r["spec"], "error": r.get("error")} for r in results
                     if not r.get("ok")],
        "cases": results,
    }
    report["sampling"] = _sampling(results)
    report["breakdown"] = [{"spec": r["spec"], **r["result"]} for r in results if r["kind"] == "breakdown" and r.get("ok")]
    report["loadavg"] = summary([r["machine"]["loadavg_1m"] for r in results
                                 if r.get("machine", {}).get("loadavg_1m") is not None])
    report["targets"] = targets(report)
    return report


# transformers' compiled static-cache generate: the sampling baseline of issue 12
COMPILED = "generate, static cache, compiled"
# the rollout path `opsd train` takes by default on each device (opsd_core/backends/plan.py)
OPSD_SAMPLER = {"cuda": "opsd static sampler (row noise)", "cpu": "opsd engine"}
# issue 12's GPU targets: the whole step at 16 rollouts >= 5x the 424 tok/s measured on an H200 on
# 2026-11-30; at 256 rollouts >= 10x TRL; scoring >= 1.5x TRL
STEP16_TOK_S = 5 * 424


def _sampling(results: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """{batch: {path: {tok_s, seconds, first_call_s, vs_compiled}}} over every sampling case."""
    out: dict[str, dict[str, Any]] = {}
    for r in results:
        if r["kind"] != "sampling" or not r.get("ok"):
            continue
        for batch, paths in r["result"]["batches"].items():
            compiled = paths.get(COMPILED, {}).get("tok_s")
            out[str(batch)] = {name: {**row, "vs_compiled": row["tok_s"] / compiled if compiled else None}
                               for name, row in paths.items()}
    return out


def targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target met or not by the report's own numbers. The GPU targets apply on CUDA and to the GPU suites
    wherever they run (their rehearsal on a CPU checks the same rows; its values mean nothing)."""
    out = []
    device = report["device"]
    gpu = device == "cuda" or report.get("suite") in ("gpu", "gpu2")
    sampler = OPSD_SAMPLER["cuda"] if gpu else OPSD_SAMPLER.get(device)
    for batch, paths in report.get("sampling", {}).items():
        mine = paths.get(sampler or "", {}).get("vs_compiled")
        if mine is not None:
            out.append({"target": f"{sampler} >= 1.0x transformers' compiled static cache (batch {batch})",
                        "value": mine, "met": mine >= 1.0})
    for gid, entry in report["steps"].items():
        for name, ratios in entry["ratios"].items():
            mine, other = name.split("/")
            ratio = ratios.get("tok_s") if other in TRL_BASELINES else None
            if ratio and ratio["n"]:
                label = "TRL" if other == "trl" else "TRL bf16 autocast"
                out.append({"target": f"{mine} step tok/s >= 2x {label} ({entry['model']})",
                            "value": ratio, "met": ratio["median"] >= 2.0})
        rollouts = entry.get("settings", {}).get("rollouts_per_step")
        # the group's part in the targets: its role (the GPU suites name it, at any size), else its size
        role = entry.get("role") or {16: "step16", 256: "step256"}.get(rollouts)
        score = entry["ratios"].get("opsd/trl", {}).get("score_tok_s")
        if gpu and score and score["n"]:
            out.append({"target": f"opsd scoring tok/s >= 1.5x TRL ({entry['model']}, R={rollouts})",
                        "value": score, "met": score["median"] >= 1.5})
        opsd = entry["impls"].get("opsd", {}).get("tok_s")
        if gpu and role == "step16" and opsd and opsd["n"] and "smollm2" in entry["model"]:
            out.append({"target": f"opsd whole step >= {STEP16_TOK_S} tok/s at 16 rollouts (5x 2026-11-30's 424)",
                        "value": opsd, "met": opsd["median"] >= STEP16_TOK_S})
        step = entry["ratios"].get("opsd/trl", {}).get("tok_s")
        if gpu and role == "step256" and step and step["n"]:
            out.append({"target": "opsd whole step >= 10x TRL at 256 rollouts", "value": step,
                        "met": step["median"] >= 10.0})
        if "default" in gid and "opsd" in entry["impls"]:
            out.append({"target": "default-profile opsd train: share of matmul limit",
                        "value": entry["impls"]["opsd"]["mfu"], "met": None})
    big = [k for k in report["kernel"].values() if k["compare"]]
    if big:
        head = max(big, key=lambda k: k["vocab"])
        t = max(head["compare"])
        cmp = head["compare"][t]
        ratio = cmp["memory_naive_over_chunked"]
        out.append({"target": f"loss peak memory at T={t}, V={head['vocab']} <= 1/8 of naive"
                    + (" (naive projected)" if cmp["naive_projected"] else ""),
                    "value": ratio, "met": ratio is not None and ratio >= 8.0})
        growth = head["chunked_growth"]
        if growth:
            out.append({"target": f"chunked loss memory grows at most linearly in T (V={head['vocab']})",
                        "value": growth, "met": growth["memory_ratio"] <= growth["rows_ratio"] * 1.05})
    return out


def _fmt(x: Any) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:.3g}" if abs(x) < 1e5 else f"{x:.3e}"
    return str(x)


def _sfmt(s: dict[str, Any] | None) -> tuple[str, str, str, str]:
    if not s or not s.get("n"):
        return "–", "–", "–", "0"
    return _fmt(s["median"]), _fmt(s["min"]), _fmt(s["max"]), str(s["n"])


def markdown(report: dict[str, Any]) -> str:
    m = report.get("machine", {})
    mm = report.get("matmul") or {}
    load = report.get("loadavg") or {}
    lines = [
        f"# opsd benchmarks: suite `{report.get('suite')}`, {report.get('date')}", "",
        *([f"**Smoke rehearsal on {report['device']}** (toy sizes, the suite's case list): the numbers and "
           "targets below mean nothing; what counts is that every case ran.", ""] if report.get("smoke") else []),
        f"- machine: {m.get('hostname')} ({m.get('cpu_count')} CPUs{', ' + m['gpu'] if m.get('gpu') else ''}), "
        f"device {report['device']}, threads {report['threads']}, precision {report['precision']}",
        f"- versions: torch {m.get('torch')}, transformers {m.get('transformers')}, peft {m.get('peft')}, "
        f"trl {m.get('trl')}",
        f"- matmul limit: {_fmt(mm.get('flops_best'))} FLOP/s ({mm.get('dtype')} {mm.get('size')}³, best of "
        f"{len(mm.get('seconds', []))}, fastest kernel {mm.get('kernel', 'torch.mm')}; "
        + ", ".join(f"{k} {_fmt(v)}" for k, v in (mm.get("kernels") or {}).items()) + ")",
        f"- total wall time: {_fmt(report.get('total_wall_s'))} s; 1-minute load average over the cases "
        f"{_fmt(load.get('min'))} – {_fmt(load.get('max'))} (median {_fmt(load.get('median'))}) on "
        f"{m.get('cpu_count')} CPUs: other jobs share the machine, compare ratios (the load includes the case itself, about its thread count)", "",
        "## Training step (one process per run; ratio = opsd / other, pair by pair)", "",
        "| case | impl | metric | median | min | max | n | impl/TRL med [min, max] | impl/TRL bf16 med [min, max] "
        "| impl/naive med [min, max] |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for entry in report["steps"].values():
        s = entry["settings"]
        model = entry["model"].rstrip("/").rsplit("/", 1)[-1]  # a local model directory: its name
        case = (f"{model} R={s['rollouts_per_step']} mb={s['micro_batch_size']} "
                f"L={s['max_new_tokens']}")
        for key, label, _h in STEP_METRICS:
            for impl, vals in entry["impls"].items():
                cells = _sfmt(vals.get(key))
                ratios = []
                for other in BASELINES:
                    r = entry["ratios"].get(f"{impl}/{other}", {}).get(key)
                    ratios.append(f"{_fmt(r['median'])} [{_fmt(r['min'])}, {_fmt(r['max'])}]" if r and r["n"]
                                  else "")
                lines.append(f"| {case} | {impl} | {label} | {' | '.join(cells)} | {' | '.join(ratios)} |")
    if report["loss_only"]:
        lines += ["", "## Loss only at the step's shapes (hidden states → loss → gradient; in-process repeats)",
                  "", "| T×V×H | impl | time s median | min | max | tok/s | peak extra MB | loss |",
                  "|---|---|---|---|---|---|---|---|"]
    for row in report["loss_only"]:
        med, lo, hi, _n = _sfmt(row["time_s"])
        tok = _fmt(row["rows"] / row["time_s"]["median"]) if row["time_s"]["n"] else "–"
        lines.append(f"| {row['rows']}×{row['vocab']}×{row['hidden']} | {row['impl']} | {med} | {lo} | {hi} | "
                     f"{tok} | {_fmt(row['peak_extra_mb'])} | {_fmt(row['loss'])} |")
    if report["kernel_rows"]:  # a suite part without the kernel sweep (gpu part 1) prints no empty table
        lines += ["", "## Loss kernel: chunked vs naive as T and V grow", "",
                  "| V×H | T | impl | time s median | min | max | peak extra MB | naive/chunked memory | "
                  "naive/chunked time med [min, max] |", "|---|---|---|---|---|---|---|---|---|"]
    for row in sorted(report["kernel_rows"], key=lambda r: (r["vocab"], r["rows"], r["impl"])):
        med, lo, hi, _n = _sfmt(row["time_s"])
        key = f"{row['vocab']}x{row['hidden']}"
        cmp = report["kernel"].get(key, {}).get("compare", {}).get(row["rows"], {})
        mem = _fmt(row["peak_extra_mb"])
        if row["skipped"]:
            proj = row.get("projected_peak_extra_mb")
            mem = f"skipped: {row['skipped']}" + (f"; linear fit → {_fmt(proj)}" if proj else "")
        ratio_mem = _fmt(cmp.get("memory_naive_over_chunked")) if row["impl"] == "chunked" else ""
        if ratio_mem and cmp.get("naive_projected"):
            ratio_mem += " (projected)"
        t = cmp.get("time_naive_over_chunked") if row["impl"] == "chunked" else None
        t_s = f"{_fmt(t['median'])} [{_fmt(t['min'])}, {_fmt(t['max'])}]" if t and t.get("n") else ""
        lines.append(f"| {row['vocab']}×{row['hidden']} | {row['rows']} | {row['impl']} | {med} | {lo} | {hi} | "
                     f"{mem} | {ratio_mem} | {t_s} |")
    lines += _sampling_lines(report) + _breakdown_lines(report)
    lines += ["", "## Targets", "", "| target | value | met |", "|---|---|---|"]
    for t in report["targets"]:
        v = t["value"]
        if isinstance(v, dict) and "median" in v:
            v = f"median {_fmt(v['median'])} [min {_fmt(v['min'])}, max {_fmt(v['max'])}]"
        elif isinstance(v, dict):
            v = ", ".join(f"{k}={_fmt(x)}" for k, x in v.items())
        met = {True: "yes", False: "**no**", None: "(report)"}[t["met"]]
        lines.append(f"| {t['target']} | {_fmt(v) if not isinstance(v, str) else v} | {met} |")
    if report["failures"]:
        lines += ["", "## Failed or skipped cases", ""]
        lines += [f"- {f['kind']} {f['spec'].get('impl', '')} {f['spec'].get('model', '')}: {f['error']}"
                  for f in report["failures"]]
    return "\n".join(lines) + "\n"


def _sampling_lines(report: dict[str, Any]) -> list[str]:
    if not report.get("sampling"):
        return []
    lines = ["", "## Rollouts alone: opsd's paths beside transformers' generate (benchmarks.static_generate)", "",
             "| batch | path | tok/s | s per call | first call s | / compiled static |", "|---|---|---|---|---|---|"]
    for batch, paths in report["sampling"].items():
        for name, row in paths.items():
            lines.append(f"| {batch} | {name} | {_fmt(row['tok_s'])} | {_fmt(row['seconds'])} | "
                         f"{_fmt(row['first_call_s'])} | {_fmt(row['vs_compiled'])} |")
    return lines


def _breakdown_lines(report: dict[str, Any]) -> list[str]:
    lines = []
    for entry in report.get("breakdown", []):
        spec = entry["spec"]
        lines += ["", f"## One opsd step piece by piece ({spec['model']}, R={spec['rollouts']}, "
                  f"mb={spec['micro_batch']}, L={spec['new_tokens']}; benchmarks.breakdown)", "",
                  "| piece | s | how |", "|---|---|---|"]
        lines += [f"| {row['piece'].strip()} | {_fmt(row['seconds'])} | {row['how']} |" for row in entry["rows"]]
        prof = entry.get("profile")
        if prof:
            busy = "" if prof["device_busy_s"] is None else (
                f"; device busy {_fmt(prof['device_busy_s'])} s ({_fmt(prof['device_busy_fraction'])} of it), "
                f"{prof['kernel_launches']} kernel launches")
            lines += ["", f"One whole step under torch.profiler: {_fmt(prof['wall_s'])} s wall{busy}.", "",
                      f"| operator | {prof['ranked_by']} s | calls |", "|---|---|---|"]
            lines += [f"| `{row['op'][:80].replace('|', '/')}` | {_fmt(row['seconds'])} | {row['calls']} |" for row in prof["top"]]
    return lines
