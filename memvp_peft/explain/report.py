"""`index.html`: every explained answer on one page -- its image(s), the question, the answer and the read maps --
that opens offline from the folder it is in (relative links only, no script, no stylesheet from elsewhere).

Written next to the pictures by `write_report`, which `memvp-infer --explain DIR` calls; every text that came from a
user (questions, answers, sources) is escaped.
"""

from __future__ import annotations

import html
import os
from typing import Any, Sequence

STYLE = """
body { font-family: sans-serif; margin: 1.5em; color: #222; }
.answer { border-top: 1px solid #ccc; padding: 1em 0; }
.maps { display: flex; flex-wrap: wrap; gap: 0.5em; align-items: flex-start; }
.maps figure { margin: 0; }
figcaption { font-size: 0.8em; color: #555; }
img { max-height: 300px; }
.meta { font-size: 0.9em; color: #444; }
"""


def _figure(src: str, caption: str) -> str:
    return (f'<figure><img src="{html.escape(src, quote=True)}" alt="{html.escape(caption, quote=True)}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def answer_section(index: int, entry: dict[str, Any]) -> str:
    """One answer's section: `entry` holds `source`, `question`, `answer` and the `pictures` of
    `pictures.save_answer_maps`."""
    pictures = entry["pictures"]
    figures = [_figure(pictures["image"], "the image"), _figure(pictures["mean"], "mean over the answer's tokens")]
    figures += [_figure(token["picture"], f"token {k + 1}: {token['text']!r}")
                for k, token in enumerate(pictures["tokens"])]
    return (
        f'<section class="answer" id="answer-{index}">\n'
        f"<h2>{index + 1}. {html.escape(str(entry['question']))}</h2>\n"
        f'<p>Answer: <b>{html.escape(str(entry["answer"]))}</b> '
        f'<span class="meta">({html.escape(str(entry.get("source", "")))}; answer log-probability '
        f"{entry.get('log_prob', float('nan')):.3f})</span></p>\n"
        f'<div class="maps">{"".join(figures)}</div>\n</section>'
    )


def render_report(entries: Sequence[dict[str, Any]], title: str, note: str = "") -> str:
    """The whole page as a string."""
    sections = "\n".join(answer_section(index, entry) for index, entry in enumerate(entries))
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        f"<title>{html.escape(title)}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n"
        f"<h1>{html.escape(title)}</h1>\n<p class=\"meta\">{html.escape(note)}</p>\n{sections}\n</body>\n</html>\n"
    )


def write_report(folder: str, entries: Sequence[dict[str, Any]], title: str = "MemVP read maps",
                 note: str = "") -> str:
    """Write `folder/index.html` (through a staged file: an interrupted write leaves the previous page whole);
    returns its path. Every picture an entry names must be in `folder`."""
    missing = [name for entry in entries for name in _pictures_of(entry)
               if not os.path.isfile(os.path.join(folder, name))]
    if missing:
        raise ValueError(f"write_report: the pictures {missing[:3]} are not in {folder}.")
    path = os.path.join(folder, "index.html")
    staged = f"{path}.tmp-{os.getpid()}"
    with open(staged, "w", encoding="utf-8") as handle:
        handle.write(render_report(entries, title, note))
    os.replace(staged, path)
    return path


def _pictures_of(entry: dict[str, Any]) -> list[str]:
    pictures = entry["pictures"]
    return [pictures["image"], pictures["mean"], *(token["picture"] for token in pictures["tokens"])]
