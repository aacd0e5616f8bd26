"""`align eval`'s engine: run benchmarks on one or two checkpoints and write a report folder.

    results = run_suite([Checkpoint("A", "base", sampler_a), Checkpoint("B", "lora", sampler_b)],
                        ["geneval", "dense"], "reports/x", geneval_items=..., dense_items=...)
    write_report("reports/x", results)

Report folder: ``metrics.json`` (everything), ``summary.md`` (tables + monitor warnings),
``index.html`` (the same tables and captioned grids, two checkpoints side by side),
``tables/*.csv`` (one per table) and ``grids/*.png``. Samples live in ``model_a/<benchmark>/``
and ``model_b/<benchmark>/`` and are kept on interruption: rerunning the same command resumes.
"""

from __future__ import annotations

import csv
import html
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .dense import run_dense
from .geneval import Sampler, run_geneval
from .grid import save_caption_grid
from .monitor import HackingMonitor, corrected_score, quality_to_likert
from .score import ScoreInputError, list_media, load_image, score_media

BENCHMARKS = ("geneval", "dense")
CONFIG_FILE = "eval_config.json"


@dataclass
class Checkpoint:
    """One model to evaluate: label ("A"/"B"), a readable name (model + LoRA) and its sampler."""

    label: str
    name: str
    sampler: Sampler

    @property
    def folder(self) -> str:
        return f"model_{self.label.lower()}"


def _check_resume(out: Path, config: dict) -> None:
    """An output folder is reused only for the same checkpoints and settings (so it resumes)."""
    path = out / CONFIG_FILE
    if path.is_file():
        previous = json.loads(path.read_text())
        changed = [k for k in config if k in previous and previous[k] != config[k]]
        if changed:
            raise ScoreInputError(f"{out} holds an evaluation with other settings ({', '.join(changed)} differ); "
                                  "use a fresh --out or the same arguments to resume")
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(config, indent=1))


def score_rewards(folder: Path, rewards: dict, verifier_rows: list[dict] | None = None) -> dict[str, list]:
    """Per-sample scores of each reward on a sample folder (None = not scored), plus the verifier's."""
    items = list_media(folder)
    scores = {name: [row["score"] for row in score_media(folder, items, reward)] for name, reward in rewards.items()}
    if verifier_rows is not None:
        scores["verifier_strict"] = [float(r["strict"]) for r in verifier_rows]
        scores["verifier_partial"] = [r["partial"] for r in verifier_rows]
    return scores


def _mean(values) -> float:
    finite = [v for v in values if v is not None and np.isfinite(v)]
    return float(np.mean(finite)) if finite else float("nan")


def reward_summary(scores: dict[str, list], optimised: str | None, quality: str | None) -> dict:
    """Means of every reward and GDRO's corrected score (per sample, then averaged)."""
    out = {"means": {name: _mean(v) for name, v in scores.items()}}
    task = optimised if optimised in scores else "verifier_partial" if "verifier_partial" in scores else None
    if task and quality in scores:
        pairs = [(r, q) for r, q in zip(scores[task], scores[quality]) if r is not None and q is not None]
        if pairs:
            r, q = map(np.array, zip(*pairs))
            out["corrected_score"] = float(corrected_score(r, quality_to_likert(q)).mean())
            out["corrected_score_of"] = f"{task} x {quality}"
    return out


def run_suite(checkpoints: Sequence[Checkpoint], benchmarks: Sequence[str], out: str | Path, *,
              geneval_items: list[dict] | None = None, dense_items: list[dict] | None = None,
              images_per_prompt: int = 1, seed: int = 0, detector=None, judge="verifier", both_orders: bool = False,
              rewards: dict | None = None, optimised: str | None = None, quality: str | None = "shapes_quality",
              batch_size: int = 32, config: dict | None = None, progress: Callable[[str, int], Callable] | None = None,
              run_monitor: dict | None = None) -> dict:
    """Runs every benchmark; returns the results dict that :func:`write_report` renders."""
    out = Path(out)
    unknown = [b for b in benchmarks if b not in BENCHMARKS]
    if unknown:
        raise ValueError(f"unknown benchmark {unknown[0]!r}; choose from {', '.join(BENCHMARKS)}")
    if "dense" in benchmarks and len(checkpoints) != 2:
        raise ValueError("the dense benchmark is pairwise: give a second checkpoint with --compare")
    _check_resume(out, {"checkpoints": [c.name for c in checkpoints], "benchmarks": list(benchmarks),
                        "seed": seed, "images_per_prompt": images_per_prompt, **(config or {})})
    advance = (lambda what, total: progress(what, total)) if progress else (lambda what, total: None)
    results: dict = {"checkpoints": [{"label": c.label, "name": c.name, "folder": c.folder} for c in checkpoints],
                     "benchmarks": {}}
    if "geneval" in benchmarks:
        per_model, rewards_by_model = {}, {}
        for c in checkpoints:
            folder = out / c.folder / "geneval"
            per_model[c.label] = run_geneval(c.sampler, geneval_items, folder, images_per_prompt=images_per_prompt,
                                             seed=seed, detector=detector, batch_size=batch_size,
                                             progress=advance(f"geneval {c.label}",
                                                              len(geneval_items) * images_per_prompt))
            rows = [json.loads(line) for line in (folder / "results.jsonl").read_text().splitlines()]
            rewards_by_model[c.label] = reward_summary(score_rewards(folder, rewards or {}, rows), optimised, quality)
        results["benchmarks"]["geneval"] = per_model
        results["rewards"] = rewards_by_model
        if len(checkpoints) == 2 and optimised:
            results["monitor"] = compare_checkpoints(rewards_by_model, checkpoints, optimised)
    if "dense" in benchmarks:
        results["benchmarks"]["dense"] = run_dense(
            checkpoints[0].sampler, checkpoints[1].sampler, dense_items, out, judge, seed=seed,
            images_per_prompt=images_per_prompt, both_orders=both_orders, batch_size=batch_size,
            folders=(f"{checkpoints[0].folder}/dense", f"{checkpoints[1].folder}/dense"),
            progress=advance("dense", 3 * len(dense_items) * images_per_prompt))
    if run_monitor is not None:
        results["run_monitor"] = run_monitor
    (out / "metrics.json").write_text(json.dumps(results, indent=1, default=str))
    return results


def compare_checkpoints(rewards_by_model: dict, checkpoints: Sequence[Checkpoint], optimised: str) -> dict:
    """The hacking monitor on the GenEval samples from B (the reference, e.g. the base model) to
    A (the checkpoint under test, e.g. the trained LoRA)."""
    means = [rewards_by_model[c.label]["means"] for c in reversed(checkpoints)]
    verifier = ("verifier_strict", "verifier_partial") if optimised == "shapes_geneval" else ()  # not held out then
    held_out = [k for k in means[0] if k != optimised and k not in verifier]
    monitor = HackingMonitor(optimised, held_out, quality_key=None)
    for step, m in enumerate(means):
        monitor.update(step, m)
    return monitor.summary()


# ----------------------------------------------------------------------------- rendering


def _fmt(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _ci(pair) -> str:
    return f"[{_fmt(pair[0])}, {_fmt(pair[1])}]"


def tables(results: dict) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, header, rows) of every table, shared by the markdown, HTML and CSV outputs."""
    labels = [c["label"] for c in results["checkpoints"]]
    out = [("Checkpoints", ["label", "checkpoint"], [[c["label"], c["name"]] for c in results["checkpoints"]])]
    geneval = results["benchmarks"].get("geneval")
    if geneval:
        header = ["category", "n"] + [f"{lab} {k}" for lab in labels for k in ("strict", "95% CI", "partial")]
        if len(labels) == 2:
            header.append("strict A - B")
        rows = []
        for tag in geneval[labels[0]]["per_tag"]:
            cells = [geneval[lab]["per_tag"][tag] for lab in labels]
            row = [tag, str(cells[0]["n"])]
            row += [x for v in cells for x in (_fmt(v["strict"]), _ci(v["ci"]), _fmt(v["partial"]))]
            if len(labels) == 2:
                row.append(f"{cells[0]['strict'] - cells[1]['strict']:+.3f}")
            rows.append(row)
        overall = ["overall (mean of categories)", str(geneval[labels[0]]["n"])]
        overall += [x for lab in labels for x in (_fmt(geneval[lab]["overall"]), _ci(geneval[lab]["overall_ci"]),
                                                   _fmt(geneval[lab]["overall_partial"]))]
        if len(labels) == 2:
            overall.append(f"{geneval[labels[0]]['overall'] - geneval[labels[1]]['overall']:+.3f}")
        out.append(("GenEval-style: strict accuracy per category", header, rows + [overall]))
    if results.get("rewards"):
        names = list(results["rewards"][labels[0]]["means"])
        rows = [[name] + [_fmt(results["rewards"][lab]["means"][name]) for lab in labels] for name in names]
        if any("corrected_score" in results["rewards"][lab] for lab in labels):
            of = next(results["rewards"][lab].get("corrected_score_of") for lab in labels)
            rows.append([f"GDRO corrected score ({of})"] + [_fmt(results["rewards"][lab].get("corrected_score"))
                                                            for lab in labels])
        out.append(("Rewards on the GenEval samples (means)", ["reward"] + labels, rows))
    dense = results["benchmarks"].get("dense")
    if dense:
        net, bias = dense["net"], dense["position_bias"]
        rows = [["net win rate of A over B", _fmt(net["net_win_rate"])], ["95% bootstrap CI", _ci(net["ci"])],
                ["win / loss / tie", f"{_fmt(net['win'])} / {_fmt(net['loss'])} / {_fmt(net['tie'])}"],
                ["pairs judged / not judged", f"{net['judged']} / {net['failed']}"],
                ["judge picks the first slot",
                 f"{_fmt(bias['overall']['first_slot_rate'])} {_ci(bias['overall']['ci'])}"],
                ["... when A is shown first", _fmt(bias["a_first"]["first_slot_rate"])],
                ["... when B is shown first (flipped)", _fmt(bias["b_first"]["first_slot_rate"])]]
        if "both_orders" in bias:
            rows.append(["verdict unchanged when the order is swapped", _fmt(bias["both_orders"]["consistent"])])
        for lab in ("A", "B"):
            clauses = dense["clauses"].get(lab)
            if clauses:
                rows.append([f"{lab} clause accuracy / all clauses right", f"{_fmt(clauses['clause_accuracy'])} / "
                             f"{_fmt(clauses['all_correct'])}"])
        rows.append(["words per prompt (median; CLIP reads 77 tokens)", _fmt(dense["words_per_prompt_median"], 0)])
        out.append((f"DenseAlignBench-style: {dense['prompts']} prompts, judge {dense['judge']}", ["", "value"], rows))
    return out


def _monitor_lines(results: dict) -> list[str]:
    lines = []
    for key, title in (("monitor", "reference B -> checkpoint A"), ("run_monitor", "training run")):
        summary = results.get(key)
        if summary is None:
            continue
        if summary["flagged"]:
            lines += [f"WARNING (reward hacking, {title}): {message}" for message in summary["alerts"]]
        else:
            lines.append(f"hacking monitor ({title}): no warning; optimised {summary['optimised']}, "
                         f"held out {', '.join(summary['held_out']) or 'none'}")
    return lines


def make_grids(out: Path, results: dict, per_tag: int = 4) -> dict[str, str]:
    """Captioned grids (same samples for every checkpoint) -> {name: relative path}."""
    grids = {}
    for c in results["checkpoints"]:
        folder = out / c["folder"] / "geneval"
        if not (folder / "results.jsonl").is_file():
            continue
        rows = [json.loads(line) for line in (folder / "results.jsonl").read_text().splitlines()]
        chosen, seen = [], {}
        for row in rows:  # the first per_tag samples of each category
            if seen.get(row["tag"], 0) < per_tag:
                seen[row["tag"]] = seen.get(row["tag"], 0) + 1
                chosen.append(row)
        images = [load_image(folder / r["file"], None) for r in chosen]
        captions = [f"{'OK' if r['strict'] else 'X'} {r['partial']:.2f}: {r['prompt'].removeprefix('a photo of ')}"
                    for r in chosen]
        name = f"geneval_{c['label']}"
        save_caption_grid(images, captions, out / "grids" / f"{name}.png", ncol=per_tag,
                          scale=max(1, 128 // images[0].shape[0]))
        grids[name] = f"grids/{name}.png"
    dense = out / "judgments.jsonl"
    if results["benchmarks"].get("dense") and dense.is_file() and len(results["checkpoints"]) == 2:
        records = [json.loads(line) for line in dense.read_text().splitlines()][:8]
        images, captions = [], []
        for r in records:
            outcome = {1: "A wins", -1: "B wins", 0: "tie"}.get(r["verdicts"][0]["outcome"], "not judged")
            for c in results["checkpoints"]:
                images.append(load_image(out / c["folder"] / "dense" / r["file"], None))
                captions.append(f"{c['label']}: {outcome}" if c["label"] == "A" else c["label"])
        save_caption_grid(images, captions, out / "grids" / "dense_pairs.png", ncol=8,
                          scale=max(1, 128 // images[0].shape[0]))
        grids["dense_pairs"] = "grids/dense_pairs.png"
    return grids


def _html_table(title: str, header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<h2>{html.escape(title)}</h2>\n<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>\n"


STYLE = ("body{font-family:sans-serif;margin:2em;max-width:1400px}table{border-collapse:collapse;margin-bottom:1em}"
         "td,th{border:1px solid #bbb;padding:3px 8px;text-align:right}td:first-child,th:first-child{text-align:left}"
         ".warn{background:#fde2e1;padding:.5em;border-left:4px solid #c00}.ok{color:#264}"
         ".side{display:flex;gap:2em;flex-wrap:wrap}figure{margin:0}img{image-rendering:pixelated;max-width:100%}")


def write_report(out: str | Path, results: dict, title: str = "genalign evaluation") -> dict[str, Path]:
    """Writes summary.md, index.html, tables/*.csv and grids/*.png into ``out``; returns their paths."""
    out = Path(out)
    grids = make_grids(out, results)
    all_tables = tables(results)
    monitor = _monitor_lines(results)
    (out / "tables").mkdir(parents=True, exist_ok=True)
    for index, (name, header, rows) in enumerate(all_tables):
        with open(out / "tables" / f"{index}_{name.split(':')[0].lower().replace(' ', '_')}.csv", "w", newline="") as f:
            csv.writer(f).writerows([header, *rows])
    md = [f"# {title}", ""] + [f"- {line}" for line in monitor] + [""]
    for name, header, rows in all_tables:
        md += [f"## {name}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        md += ["| " + " | ".join(row) + " |" for row in rows] + [""]
    md += [f"![{name}]({path})" for name, path in grids.items()]
    (out / "summary.md").write_text("\n".join(md) + "\n")
    body = [f"<h1>{html.escape(title)}</h1>"]
    body += [f'<p class="{"warn" if line.startswith("WARNING") else "ok"}">{html.escape(line)}</p>' for line in monitor]
    body += [_html_table(*t) for t in all_tables]
    figures = {"geneval": [n for n in grids if n.startswith("geneval_")],
               "dense": [n for n in grids if n == "dense_pairs"]}
    for section, names in figures.items():
        if names:
            body.append(f"<h2>{section} samples</h2><div class=\"side\">" + "".join(
                f'<figure><img src="{grids[n]}" alt="{n}"><figcaption>{html.escape(n)}</figcaption></figure>'
                for n in names) + "</div>")
    page = (f"<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{STYLE}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")
    (out / "index.html").write_text(page)
    return {"html": out / "index.html", "markdown": out / "summary.md", "metrics": out / "metrics.json"}
