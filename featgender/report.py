"""An evaluation written for people: metrics.json, report.md, a contact sheet of the surest
mistakes, and (with the ``plots`` extra) ROC, confusion, subgroup and group x gender plots;
the one-line summaries the command line and the web page print.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
from sklearn import metrics as skm

from featgender.metrics import METRICS, public_result

logger = logging.getLogger(__name__)


def audit_sentence(audit: dict, shown: int = 12) -> str:
    """:func:`label_audit`'s finding in one sentence (the first ``shown`` images named), for
    reports and the command line."""
    images = audit["conflicting_images"]
    listed = ", ".join(images[:shown]) + (f" and {len(images) - shown} more" if len(images) > shown else "")
    sentence = (
        f"{audit['conflicting_identities']} of {audit['identities']} people have images labelled both "
        f"female and male ({len(images)} images{': ' + listed if images else ''}); "
        "one label at least of each is wrong."
    )
    if audit["accuracy_consistent"] is None:
        return sentence
    low, high = audit["ci95_consistent"]
    return (
        sentence + f" Accuracy on the other {audit['n_consistent']} images: "
        f"{audit['accuracy_consistent']:.4f} (95% CI {low:.4f} - {high:.4f})."
    )


def write_report(result: dict, folder: str | Path, *, title: str = "featgender evaluation") -> list[Path]:
    """metrics.json, report.md, mistakes.png (a contact sheet of the worst mistakes) and
    (with matplotlib) roc.png, confusion.png, subgroups.png."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    plain = public_result(result)
    written = [folder / "metrics.json", folder / "report.md"]
    written[0].write_text(json.dumps(plain, indent=2))
    written[1].write_text(markdown_summary(plain, title))
    if plain.get("worst_mistakes"):
        written.append(contact_sheet(plain["worst_mistakes"], folder / "mistakes.png"))
    try:
        import matplotlib

        matplotlib.use("Agg")
    except ImportError:
        logger.warning("matplotlib is not installed (pip install 'featgender[plots]'): no PNG plots")
        return written
    written += _plots(result, folder)
    return written


def markdown_summary(result: dict, title: str) -> str:
    """A markdown table of the metrics with CIs, the confusion matrix and subgroup gaps."""
    lines = [
        f"# {title}",
        "",
        f"Split: {result.get('split', '?')}, {result['n']} images.",
        "",
        "| metric | value | 95% CI |",
        "|---|---|---|",
    ]
    for name in METRICS:
        if name in result:
            low, high = result["ci95"].get(name, [float("nan")] * 2)
            lines.append(f"| {name} | {result[name]:.4f} | {low:.4f} – {high:.4f} |")
    (tn, fp), (fn, tp) = result["confusion_matrix"]
    lines += [
        "",
        "Confusion matrix (rows: true female, male; columns: predicted female, male):",
        "",
        "| | female | male |",
        "|---|---|---|",
        f"| female | {tn} | {fp} |",
        f"| male | {fn} | {tp} |",
    ]
    for name, slices in result.get("subgroups", {}).items():
        lines += [
            "",
            f"## {name} (largest accuracy gap {slices['accuracy_gap']:.4f})",
            "",
            "| group | n | accuracy | women called men | men called women |",
            "|---|---|---|---|---|",
        ]
        for group, row in slices["groups"].items():
            rates = [f"{row[k]:.4f}" if row[k] is not None else "–" for k in ("female_error", "male_error")]
            lines.append(f"| {group} | {row['n']} | {row['accuracy']:.4f} | {rates[0]} | {rates[1]} |")
    for name, table in result.get("group_gender", {}).items():
        lines += [
            "",
            f"## Errors per {name} x gender ({group_gender_headline(table)})",
            "",
            "| group | gender | n | errors | error rate | 95% CI | faces not found |",
            "|---|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {cell['group']} | {cell['gender']} | {cell['n']} | {cell['errors']} | {cell['error_rate']:.2%} | "
            f"{cell['ci95'][0]:.2%} – {cell['ci95'][1]:.2%} | {cell['failed']} |"
            for cell in table["cells"]
        ]
    audit = result.get("label_audit")
    if audit is not None:
        lines += ["", "## Labels checked by identity", "", audit_sentence(audit)]
    if result.get("worst_mistakes"):
        lines += [
            "",
            "## Worst mistakes (the surest wrong answers; mistakes.png shows them)",
            "",
            "| image | true | P(male) | label contradicted by the same person's images |",
            "|---|---|---|---|",
        ]
        lines += [
            f"| {Path(m['image']).name} | {m['label']} | {m['p_male']:.4f} | "
            f"{'yes' if m.get('label_contradicted') else ''} |"
            for m in result["worst_mistakes"]
        ]
    return "\n".join(lines) + "\n"


def group_gender_headline(table: dict) -> str:
    """One attribute's table of :func:`group_gender_errors` in a phrase: its worst cell and gaps."""
    worst = table["worst"]
    if worst is None:
        return "no cell of 10 faces or more"
    return (
        f"worst: {worst['group']} {worst['gender']} {worst['error_rate']:.1%} wrong of {worst['n']}; "
        f"largest gap {table['error_gap']:.1%}, equalized-odds gap {table['equalized_odds_gap']:.1%}"
    )


def group_gender_lines(table: dict) -> list[str]:
    """One attribute's table of :func:`group_gender_errors` as aligned text, a line per group:
    each gender's error rate, its 95% CI and n (for the command line)."""
    width = max(len(cell["group"]) for cell in table["cells"]) if table["cells"] else 0
    by_group: dict[str, dict[str, str]] = {}
    for cell in table["cells"]:
        low, high = cell["ci95"]
        failed = f", {cell['failed']} not found" if cell["failed"] else ""
        by_group.setdefault(cell["group"], {})[cell["gender"]] = (
            f"{cell['error_rate']:6.1%} ({low:.1%}-{high:.1%}, n={cell['n']}{failed})"
        )
    return [
        f"{group:<{width}}  women {parts.get('women', '-'):<30} men {parts.get('men', '-')}"
        for group, parts in by_group.items()
    ]


def contact_sheet(mistakes: list[dict], out: Path, *, columns: int = 6, side: int = 128) -> Path:
    """A PNG grid of the mistakes' images, each captioned with its true label and P(male)
    (an image that cannot be read gets a grey tile)."""
    from PIL import Image, ImageDraw

    from featgender.images import decode_image

    caption = 30
    rows = -(-len(mistakes) // columns)
    sheet = Image.new("RGB", (columns * side, rows * (side + caption)), "white")
    draw = ImageDraw.Draw(sheet)
    for index, mistake in enumerate(mistakes):
        left, top = index % columns * side, index // columns * (side + caption)
        try:
            tile = Image.fromarray(decode_image(mistake["image"]))
            tile.thumbnail((side, side))
        except Exception:  # moved or unreadable: the caption still says what was wrong
            tile = Image.new("RGB", (side, side), (160, 160, 160))
        sheet.paste(tile, (left + (side - tile.width) // 2, top + (side - tile.height) // 2))
        doubt = " (label?)" if mistake.get("label_contradicted") else ""
        draw.text((left + 4, top + side + 2), f"true {mistake['label']}{doubt}", fill="black")
        draw.text((left + 4, top + side + 15), f"P(male) {mistake['p_male']:.3f}", fill="firebrick")
    sheet.save(out)
    return out


def _plots(result: dict, folder: Path) -> list[Path]:
    import matplotlib.pyplot as plt

    written = []
    curves = result.get("_curves")
    if curves is not None and "roc_auc" in result:
        false_pos, true_pos, _ = skm.roc_curve(curves["labels"], curves["scores"])
        figure, axes = plt.subplots(figsize=(4.5, 4.5))
        axes.plot(false_pos, true_pos, label=f"AUC {result['roc_auc']:.4f}")
        axes.plot([0, 1], [0, 1], "k:", linewidth=0.8)
        axes.set(xlabel="false positive rate (women called men)", ylabel="true positive rate (men)", title="ROC")
        axes.legend(loc="lower right")
        written.append(_save(figure, folder / "roc.png"))
    figure, axes = plt.subplots(figsize=(4, 3.5))
    skm.ConfusionMatrixDisplay(np.array(result["confusion_matrix"]), display_labels=["female", "male"]).plot(
        ax=axes, colorbar=False
    )
    written.append(_save(figure, folder / "confusion.png"))
    subgroups = result.get("subgroups", {})
    if subgroups:
        names, accuracies, colours = [], [], []
        for index, (attribute, slices) in enumerate(subgroups.items()):
            for group, row in slices["groups"].items():
                names.append(f"{attribute}: {group} (n={row['n']})")
                accuracies.append(row["accuracy"])
                colours.append(f"C{index % 10}")
        figure, axes = plt.subplots(figsize=(7, 0.3 * len(names) + 1))
        axes.barh(names, accuracies, color=colours)
        axes.axvline(result["accuracy"], color="k", linestyle=":", linewidth=0.8)
        axes.set(xlabel="accuracy", xlim=(max(0.0, min(accuracies) - 0.05), 1.0), title="Accuracy per group")
        axes.invert_yaxis()
        written.append(_save(figure, folder / "subgroups.png"))
    if result.get("group_gender"):
        written.append(_group_gender_plot(result["group_gender"], folder / "group_gender.png"))
    return written


def _group_gender_plot(tables: dict, path: Path) -> Path:
    """Error rate per group x gender with 95% CIs, one panel per attribute (Gender Shades' view)."""
    import matplotlib.pyplot as plt

    heights = [len(table["cells"]) for table in tables.values()]
    figure, panels = plt.subplots(
        len(tables),
        1,
        figsize=(7, 0.28 * sum(heights) + 1.2 * len(tables)),
        gridspec_kw={"height_ratios": [max(h, 1) for h in heights]},
        squeeze=False,
    )
    for axes, (name, table) in zip(panels[:, 0], tables.items(), strict=True):
        cells = table["cells"]
        rates = np.array([cell["error_rate"] for cell in cells]) * 100
        spans = (
            np.array([[cell["error_rate"] - cell["ci95"][0], cell["ci95"][1] - cell["error_rate"]] for cell in cells]).T
            * 100
        )
        axes.barh(
            [f"{cell['group']} {cell['gender']} (n={cell['n']})" for cell in cells],
            rates,
            xerr=spans if len(cells) else None,
            capsize=2,
            color=["firebrick" if cell["gender"] == "women" else "steelblue" for cell in cells],
        )
        axes.set(xlabel="error rate (%)", title=f"{name} x gender: {group_gender_headline(table)}")
        axes.title.set_fontsize(8)
        axes.invert_yaxis()
    return _save(figure, path)


def _save(figure, path: Path) -> Path:
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    import matplotlib.pyplot as plt

    plt.close(figure)
    return path
