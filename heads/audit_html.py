"""The audit's HTML gallery: each issue with thumbnails, duplicate groups side by side.

One self-contained file (thumbnails embedded as base64 JPEG); each thumbnail links to the
full image on disk, and each caption gives the full path, the split and the labels.
"""

from __future__ import annotations

import html
import os
import time
from pathlib import Path

from heads.report import CSS, _thumb

AUDIT_CSS = CSS + """
.grp{border:1px solid #ccc;border-radius:6px;padding:8px;margin:0 0 12px;display:inline-block;vertical-align:top}
.grp .g{flex-wrap:nowrap}.flag{background:#b00;color:#fff;border-radius:3px;padding:0 5px;font-size:12px;margin-right:4px}
.keep{outline:3px solid #2a7}figure{width:170px;word-break:normal}figcaption{margin-top:3px}figcaption .meta{word-break:break-all}h2 small{color:#555;font-weight:normal}"""


def dup_rule_text(nd: dict) -> str:
    """When two images count as near-duplicates, in words (the summary line and the gallery)."""
    text = f"cosine >= {nd['threshold']:.2f}"
    r = nd.get("pixel_rule")
    if r:
        text += f", or pixel hashes within {r['max_bits']}/{r['of_bits']} bits and cosine >= {r['min_cosine']:.2f}"
    return text


def _card(root: str, path: str, caption: str, keep: bool = False) -> str:
    full = os.path.join(root, path)  # index paths are relative to the dataset root
    b64 = _thumb(full)
    img = f'<img src="data:image/jpeg;base64,{b64}" alt="">' if b64 else '<div class="bad">(image missing)</div>'
    href = Path(full).resolve().as_uri() if os.path.isabs(full) or os.path.exists(full) else html.escape(full)
    return (f'<figure{" class=keep" if keep else ""}><a href="{href}" target="_blank">{img}</a>'
            f"<figcaption>{caption}<br><span class=meta>{html.escape(full)}</span></figcaption></figure>")


def _split(s: str) -> str:
    return f" &middot; {html.escape(s)}" if s else ""


def build_gallery(result: dict, path, max_items: int = 60) -> str:
    """Write the gallery of an :func:`heads.audit.audit` result to ``path``; returns the path."""
    root = result["dataset"]
    rows = result["rows"]
    label_rows = [r for r in rows if r["issue"] == "label"][:max_items]
    cards = [_card(root, r["path"], f"given <b class=bad>{html.escape(r['label'])}</b> &rarr; suggested "
                   f"<b>{html.escape(r['suggested'])}</b><br>label quality {1 - float(r['score']):.3f}"
                   f"{_split(r['split'])}") for r in label_rows]
    li = result["label_issues"]
    labels_html = (f"<div class=g>{''.join(cards)}</div>" if cards else "<p>No suspected label errors.</p>")

    nd = result["near_duplicates"]
    groups = sorted(nd["groups"], key=lambda g: (not g["cross_split"], not g["cross_label"], -g["max_cosine"]))
    boxes = []
    for g in groups[:max_items]:
        flags = ("<span class=flag>across splits</span>" if g["cross_split"] else "") + \
                ("<span class=flag>different labels</span>" if g["cross_label"] else "")
        members = "".join(_card(root, p, f"<b>{html.escape(lab)}</b>{_split(sp)}"
                                + (" &middot; kept" if p == g["keep"] else ""), keep=p == g["keep"])
                          for p, lab, sp in list(zip(g["members"], g["labels"], g["splits"]))[:6])
        more = f"<p class=meta>and {len(g['members']) - 6} more</p>" if len(g["members"]) > 6 else ""
        px = f" &middot; pixel hashes {g['min_pixel_bits']} bits apart" if g.get("min_pixel_bits", -1) >= 0 else ""
        boxes.append(f"<div class=grp><div>{flags}max cosine {g['max_cosine']:.3f}{px} &middot; {len(g['members'])} "
                     f"images</div><div class=g>{members}</div>{more}</div>")
    dups_html = "".join(boxes) if boxes else "<p>No near-duplicates.</p>"

    out = result["outliers"]
    out_rows = [r for r in rows if r["issue"] == "outlier"][:max_items]
    ocards = [_card(root, r["path"], f"<b>{html.escape(r['label'])}</b>{_split(r['split'])}<br>distance "
                    f"{float(r['score']):.3f}") for r in out_rows]
    outliers_html = f"<div class=g>{''.join(ocards)}</div>" if ocards else "<p>No outliers above the fence.</p>"

    title = f"featurize audit of {Path(root).name}"
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>{AUDIT_CSS}</style></head><body>
<h1>{html.escape(title)}</h1>
<p class=meta>dataset {html.escape(root)} &middot; backbone {html.escape(str(result['backbone']))}
({html.escape(result['space_id'])}) &middot; {result['n_images']} images, {len(result['classes'])} classes &middot;
head {html.escape(result['head'])}, out-of-sample probabilities by stratified {result['protocol'][3:]}-fold CV &middot;
written {time.strftime('%Y-%m-%d %H:%M')}. Click a thumbnail for the full image.</p>
<h2>Suspected label errors: {li['n']} <small>(cleanlab's estimated noise rate
{100 * li['estimated_noise_rate']:.1f} %; {len(label_rows)} shown, lowest label quality first)</small></h2>
{labels_html}
<h2>Near-duplicates: {nd['n_groups']} groups <small>({nd['n_pairs']} pairs: {html.escape(dup_rule_text(nd))};
{nd['cross_split_groups']} across splits, {nd['cross_label_groups']} with different labels, shown first;
the outlined image is the one kept, the others are listed in the CSV)</small></h2>
{dups_html}
<h2>Outliers: {out['n']} <small>(mean cosine distance to the {out['k']} nearest images above
{out['cutoff']:.3f}; farthest first)</small></h2>
{outliers_html}
</body></html>"""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page)
    return str(path)
