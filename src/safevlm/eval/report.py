"""Run reports: ``report.md`` and a self-contained ``report.html`` from a run folder.

:func:`write_report` reads what a run folder holds — ``manifest.json``, ``metrics.json``,
``results.sqlite`` and, when ``safevlm eval sweep`` wrote into it, ``sweep.json`` /
``sweep.png`` — and writes

* ``report.md``: the run (model, adapter, policy, judges, decoding), a summary table, per
  task its metrics (groups as sub-rows), judge agreement, skipped items, per-group bar
  charts (PNG files under ``report_files/``), a sample of answers with their verdicts, and
  the threshold sweep;
* ``report.html``: the same from a jinja2 template (``templates/report.html.j2``), with
  every chart inlined as a base64 PNG, so the one file can be mailed or archived.

Both are rebuilt from the stored results each time (``safevlm eval report RUN_DIR``).
"""

from __future__ import annotations

import base64
import io
import json
import os
from pathlib import Path

from safevlm.eval.compare import _fmt
from safevlm.eval.manifest import read_manifest
from safevlm.eval.metrics import META_KEYS, flatten, metric_info
from safevlm.eval.runner import METRICS_NAME, RESULTS_NAME

TEMPLATE_DIR = Path(__file__).with_name("templates")
REPORT_MD = "report.md"
REPORT_HTML = "report.html"
FILES_DIR = "report_files"
SWEEP_JSON = "sweep.json"
SWEEP_PNG = "sweep.png"
ANSWER_CHARS = 600


def _bar_chart(title: str, labels: list[str], values: list[float | None], unit: str) -> bytes:
    """A horizontal bar chart as PNG bytes (rates in %)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [(lab, v) for lab, v in zip(labels, values) if v is not None]
    scale = 100.0 if unit == "rate" else 1.0
    fig, ax = plt.subplots(figsize=(6.4, 0.35 * len(shown) + 1.2), dpi=100)
    ax.barh([lab for lab, _ in shown][::-1], [v * scale for _, v in shown][::-1], color="#4c72b0")
    ax.set_xlabel("%" if unit == "rate" else unit)
    if unit == "rate":
        ax.set_xlim(0, 100)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def _metric_rows(metrics: dict) -> list[dict]:
    """One row per flat metric key (groups as ``metric/group``): key, value text, direction, depth."""
    info = metric_info(metrics)
    rows = []
    for key, value in flatten(metrics).items():
        unit = info.get(key, {}).get("unit", "number")
        hib = info.get(key, {}).get("higher_is_better")
        base = key.split("/")[0].split(".")[0]
        rows.append({
            "key": key, "value": _fmt(value, unit), "raw": value, "unit": unit, "group": "/" in key,
            "direction": {True: "↑", False: "↓", None: ""}[hib],
            "n": metrics.get(base, {}).get("n"), "unjudged": metrics.get(base, {}).get("unjudged"),
            "note": metrics.get(base, {}).get("note") if "/" not in key else None,
        })
    return rows


def _charts(task: str, metrics: dict) -> list[dict]:
    """A bar chart per metric value that has groups (per category / subset)."""
    info = metric_info(metrics)
    charts = []
    for name, result in metrics.items():
        groups = result.get("groups") or {}
        if len(groups) < 2:
            continue
        value_keys = [k for k in result if k not in META_KEYS]
        for vk in value_keys[:3]:
            labels = list(groups)
            values = [groups[g].get(vk) for g in labels]
            if all(v is None for v in values):
                continue
            flat = name if vk == "value" else f"{name}.{vk}"
            unit = info.get(flat, {}).get("unit", "number")
            title = f"{task}: {flat}"
            charts.append({"title": title, "file": f"{task}__{flat}.png".replace("/", "_"),
                           "png": _bar_chart(title, labels, values, unit)})
    return charts


def _samples(run_dir: Path, run: dict, task: str, k: int) -> list[dict]:
    """Up to ``k`` stored answers of ``task`` spread over its subsets, with every judge's verdicts."""
    from safevlm.eval.store import ResultsStore, RunKey

    path = run_dir / RESULTS_NAME
    if not path.is_file() or k <= 0:
        return []
    key = RunKey(run.get("model") or "?", run.get("adapter") or "", run.get("policy") or "")
    with ResultsStore(path) as store:
        answers = store.answers(key, task)
        verdicts = {j: store.judgements(key, task, j) for j in store.judges(key, task)}
    by_subset: dict[str, list] = {}
    for item_id in sorted(answers):
        by_subset.setdefault(answers[item_id].item.subset, []).append(item_id)
    picked: list[str] = []
    while len(picked) < min(k, len(answers)):
        for ids in by_subset.values():
            if ids and len(picked) < k:
                picked.append(ids.pop(0))
    out = []
    for item_id in picked:
        a = answers[item_id]
        text = a.answer if a.answer is not None else f"(no answer: {a.error})"
        judged = []
        for judge, table in verdicts.items():
            for (iid, rubric), v in sorted(table.items()):
                if iid == item_id:
                    judged.append({"judge": judge, "rubric": rubric, "status": v.status,
                                   "verdict": v.label if v.status == "ok" else f"unjudged: {v.reason}"})
        head = a.head or {}
        out.append({
            "id": item_id, "subset": a.item.subset, "category": a.item.category, "prompt": a.prompt,
            "answer": text if len(text) <= ANSWER_CHARS else text[:ANSWER_CHARS] + " …",
            "head": (f"{head.get('action')} (type {head.get('risk_type')}, level {head.get('risk_level')})"
                     if head else None),
            "labels": a.item.labels, "judgements": judged,
        })
    return out


def _run_facts(manifest: dict) -> list[tuple[str, str]]:
    def path_of(entry):
        if not entry:
            return "—"
        digest = entry.get("sha256")
        return f"{entry.get('path')}" + (f" (sha256 {digest[:12]}…)" if digest else "")

    policy = manifest.get("policy")
    judges = ", ".join(
        j.get("id", j.get("name", "?")) + (f" @ {j['base_url']}" if j.get("base_url") else "")
        + (f" (rubric {j['rubric_hash'][:12]}…)" if j.get("rubric_hash") else "")
        for j in manifest.get("judges", [])
    ) or "none"
    packages = manifest.get("packages", {})
    return [
        ("system", str(manifest.get("extra", {}).get("mode", "?"))),
        ("model", path_of(manifest.get("model"))),
        ("adapter", path_of(manifest.get("adapter"))),
        ("policy", f"{policy.get('source')} (sha256 {policy['sha256'][:12]}…)" if policy else "— (none: every input answered)"),
        ("judges", judges),
        ("decoding", json.dumps(manifest.get("decoding", {}), sort_keys=True)),
        ("seeds", json.dumps(manifest.get("seeds", {}), sort_keys=True)),
        ("created", f"{manifest.get('created', '?')}" + (f", updated {manifest['updated']}" if manifest.get("updated") else "")),
        ("versions", ", ".join(f"{k} {v}" for k, v in packages.items() if v and k in ("safevlm", "torch", "transformers", "python"))),
    ]


def _sweep(run_dir: Path) -> dict | None:
    path = run_dir / SWEEP_JSON
    if not path.is_file():
        return None
    data = json.loads(path.read_text(encoding="utf-8"))
    png = run_dir / SWEEP_PNG
    data["png_b64"] = base64.b64encode(png.read_bytes()).decode() if png.is_file() else None
    data["png_file"] = SWEEP_PNG if png.is_file() else None
    return data


def build_context(run_dir: "str | os.PathLike", samples: int = 6) -> dict:
    """Everything both report formats show, from the run folder."""
    run_dir = Path(run_dir)
    manifest = read_manifest(run_dir)
    metrics_path = run_dir / METRICS_NAME
    if not metrics_path.is_file():
        raise FileNotFoundError(f"{run_dir}: no {METRICS_NAME} (the run has not finished a task yet)")
    payload = json.loads(metrics_path.read_text(encoding="utf-8"))
    run = payload.get("run") or {}
    tasks = []
    for name, result in payload.get("tasks", {}).items():
        metrics = result.get("metrics", {})
        charts = _charts(name, metrics)
        tasks.append({
            "name": name, "n": result.get("n"), "answered": result.get("answered"), "skipped": result.get("skipped"),
            "unjudged": result.get("unjudged"), "judges": result.get("judges", {}), "agreement": result.get("agreement", {}),
            "skipped_items": result.get("skipped_items", [])[:10], "rows": _metric_rows(metrics),
            "headline": [r for r in _metric_rows(metrics) if not r["group"]][:6],
            "charts": [{**c, "b64": base64.b64encode(c["png"]).decode()} for c in charts],
            "samples": _samples(run_dir, run, name, samples),
        })
    groups = [{"name": g, "tasks": s.get("tasks", []), "rows": _metric_rows(s.get("metrics", {}))}
              for g, s in (payload.get("groups") or {}).items()]
    return {"title": f"safevlm eval — {Path(run.get('model') or '?').name}"
                     + (f" + {Path(run['adapter']).name}" if run.get("adapter") else "")
                     + (f" + policy {Path(run['policy']).stem}" if run.get("policy") else ""),
            "facts": _run_facts(manifest), "tasks": tasks, "groups": groups, "sweep": _sweep(run_dir)}


def _fmt_agreement(agreement: dict) -> list[str]:
    lines = []
    for pair, a in agreement.items():
        kappa = "–" if a.get("kappa") is None else f"{a['kappa']:.3f}"
        raw = "–" if a.get("raw_agreement") is None else f"{100 * a['raw_agreement']:.1f}%"
        lines.append(f"{pair}: agreement {raw}, Cohen's kappa {kappa} over {a.get('n')} item(s)"
                     f" ({a.get('excluded', 0)} excluded as unjudged)")
    return lines


def render_markdown(context: dict, files_dir: str = FILES_DIR) -> str:
    """``report.md`` (charts referenced as ``files_dir/<name>.png``)."""
    out = [f"# {context['title']}", ""]
    out += [f"- **{k}**: {v}" for k, v in context["facts"]]
    out += ["", "## Summary", "", "| task | n | answered | skipped | unjudged | metrics |", "|---|---:|---:|---:|---:|---|"]
    for t in context["tasks"]:
        head = "; ".join(f"{r['key']} {r['value']}" for r in t["headline"])
        out.append(f"| {t['name']} | {t['n']} | {t['answered']} | {t['skipped']} | {t['unjudged']} | {head} |")
    for g in context["groups"]:
        out += ["", f"**{g['name']}** (mean of {len(g['tasks'])} tasks): "
                + "; ".join(f"{r['key']} {r['value']}" for r in g["rows"])]
    for t in context["tasks"]:
        out += ["", f"## {t['name']}", "", "| metric | value | n | unjudged |", "|---|---:|---:|---:|"]
        for r in t["rows"]:
            name = ("&nbsp;&nbsp;" if r["group"] else "") + f"{r['key']} {r['direction']}".strip()
            out.append(f"| {name} | {r['value']} | {'' if r['group'] or r['n'] is None else r['n']} | "
                       f"{'' if r['group'] or not r['unjudged'] else r['unjudged']} |")
        notes = [f"{r['key']}: {r['note']}" for r in t["rows"] if r["note"]]
        if notes:
            out += [""] + [f"- note — {n}" for n in notes]
        if t["judges"]:
            out += ["", "Verdicts: " + ", ".join(f"{rubric} from {judge}" for rubric, judge in t["judges"].items()) + "."]
        for line in _fmt_agreement(t["agreement"]):
            out += ["", f"Judge the judge — {line}."]
        for c in t["charts"]:
            out += ["", f"![{c['title']}]({files_dir}/{c['file']})"]
        if t["skipped_items"]:
            out += ["", f"Skipped by the reader ({t['skipped']}; first {len(t['skipped_items'])}):", ""]
            out += [f"- `{s['location']}`: {s['reason']}" for s in t["skipped_items"]]
        if t["samples"]:
            out += ["", "Sample answers:", ""]
            for s in t["samples"]:
                verdicts = ", ".join(f"{j['judge']}/{j['rubric']}: {j['verdict']}" for j in s["judgements"]) or "not judged"
                head = f" — head: {s['head']}" if s["head"] else ""
                prompt = " ".join(s["prompt"].split())
                answer = " ".join(s["answer"].split())
                out += [f"- **{s['id']}** ({s['subset']}{', ' + s['category'] if s['category'] else ''}){head}",
                        f"  - prompt: {prompt}", f"  - answer: {answer}", f"  - verdicts: {verdicts}"]
    sweep = context.get("sweep")
    if sweep:
        out += ["", "## Threshold sweep", "", sweep.get("markdown", "")]
        if sweep.get("png_file"):
            out += ["", f"![threshold sweep]({sweep['png_file']})"]
    return "\n".join(out).rstrip() + "\n"


def render_html(context: dict) -> str:
    """``report.html`` from ``templates/report.html.j2`` (charts inline)."""
    import jinja2

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATE_DIR)), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters["agreement"] = _fmt_agreement
    return env.get_template("report.html.j2").render(**context)


def write_report(run_dir: "str | os.PathLike", samples: int = 6) -> dict[str, Path]:
    """Write ``report.md`` (+ ``report_files/*.png``) and ``report.html`` into ``run_dir``;
    returns their paths."""
    run_dir = Path(run_dir)
    context = build_context(run_dir, samples)
    files = run_dir / FILES_DIR
    charts = [c for t in context["tasks"] for c in t["charts"]]
    if charts:
        files.mkdir(exist_ok=True)
        for c in charts:
            (files / c["file"]).write_bytes(c["png"])
    paths = {"markdown": run_dir / REPORT_MD, "html": run_dir / REPORT_HTML}
    for kind, text in (("markdown", render_markdown(context)), ("html", render_html(context))):
        tmp = paths[kind].with_name(paths[kind].name + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, paths[kind])
    return paths


__all__ = ["REPORT_HTML", "REPORT_MD", "SWEEP_JSON", "SWEEP_PNG", "build_context", "render_html", "render_markdown",
           "write_report"]
