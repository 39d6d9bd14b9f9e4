"""The project's bibliography: look up, cite and display the papers the notebooks reproduce.

Everything comes from one BibTeX file, ``references/peft_from_scratch.bib``. Besides the usual
fields, each entry has ``group`` (the reading list it first appears in) and may have ``also_in``
(other reading lists), ``arxiv`` (its arXiv id), and for datasets and models ``resource`` (what it
stands for) and ``license``.

Titles are shown as the paper writes them: BibTeX braces (``{LoRA}``) protect capitals from
bibliography styles and are dropped for display, nothing is re-cased. Citation labels follow
author-year rules: when two entries would read the same ("Lv et al. (2023)"), they get a, b, ...
in the order of the .bib file ("Lv et al. (2023a)", "Lv et al. (2023b)"), wherever ``cite`` is used.

A notebook declares the paper it covers by calling ``paper_card("key", claim=...)`` in a code
cell. ``render_reading_list`` finds those calls and builds ``references/README.md``, which links
every paper to the notebooks that cover it::

    python -m peft_from_scratch.bib --write   # regenerate references/README.md
    python -m peft_from_scratch.bib --check   # exit 1 if it is out of date
"""

from __future__ import annotations

import argparse
import difflib
import functools
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import bibtexparser
from bibtexparser.model import Entry

REPO = Path(__file__).resolve().parents[1]
BIB_PATH = REPO / "references" / "peft_from_scratch.bib"
CLAIMS_PATH = REPO / "references" / "claims.toml"
CLAIM_FIELDS = ("paper", "where", "says", "quantity", "checked")
CHECKED = ("paper", "official README", "unchecked")
README_PATH = REPO / "references" / "README.md"
NOTEBOOK_DIR = REPO / "notebooks"
DATA_GROUP = "Datasets and models"
BACKGROUND_GROUP = "Background (beyond the reading lists)"   # papers a notebook needs that no list names
NOT_READING_LIST = (DATA_GROUP, BACKGROUND_GROUP)
CUSTOM_FIELDS = ("group", "also_in", "resource", "license")  # ours, not BibTeX's: bibtex() leaves them out


class UnknownKeyError(KeyError):
    """A citation key that is not in the bibliography; the message names close keys."""

    def __str__(self) -> str:  # KeyError would print the message in quotes
        return str(self.args[0])


@dataclass(frozen=True)
class Card:
    """Markdown that Jupyter renders (``_repr_markdown_``) and tests read (``.markdown``)."""

    markdown: str

    def _repr_markdown_(self) -> str:
        return self.markdown

    __str__ = _repr_markdown_


@functools.lru_cache(maxsize=None)
def _load(path: str) -> dict[str, Entry]:
    library = bibtexparser.parse_file(path)
    if library.failed_blocks:  # syntax errors and duplicate keys both land here
        where = ", ".join(f"line {b.start_line} ({type(b).__name__})" for b in library.failed_blocks)
        raise ValueError(f"{path}: blocks failed to parse at {where}")
    return {e.key: e for e in library.entries}


def load_bib(path: str | Path | None = None) -> dict[str, Entry]:
    """Parse the bibliography (cached) into {key: bibtexparser Entry}, in file order."""
    return _load(str(Path(path or BIB_PATH).resolve()))


def entry(key: str) -> Entry:
    """The entry for `key`; an unknown key raises UnknownKeyError naming the closest keys."""
    bib = load_bib()
    if key not in bib:
        close = difflib.get_close_matches(key, bib, n=5, cutoff=0.5)
        close += [k for k in bib if key.lower() in k and k not in close][: 5 - len(close)]
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise UnknownKeyError(f"Unknown citation key {key!r}.{hint} (see {BIB_PATH.name})")
    return bib[key]


def _field(e: Entry, name: str) -> str:
    field = e.get(name)
    return field.value if field is not None else ""


def _plain(text: str) -> str:
    """For display: drop BibTeX's protecting braces (keeping what they protect, case untouched),
    turn ``--`` into an en dash, collapse whitespace."""
    text = text.replace("{", "").replace("}", "").replace("---", "\u2014").replace("--", "\u2013")
    return " ".join(text.split())


def title(key: str) -> str:
    """The entry's title as the paper writes it: "LoRA: Low-Rank Adaptation of Large Language Models"."""
    return _plain(_field(entry(key), "title"))


def _names(e: Entry) -> list[str]:
    return re.split(r"\s+and\s+", _plain(_field(e, "author")))


def _author_year(e: Entry) -> tuple[str, str]:
    names = _names(e)
    last = [n.split(",")[0] if "," in n else n.split()[-1] for n in names if n != "others"]
    who = f"{last[0]} et al." if len(last) > 2 or "others" in names else " and ".join(last)
    return who, _field(e, "year")


@functools.lru_cache(maxsize=None)
def _suffixes(path: str) -> dict[str, str]:
    """{key: "a" | "b" | ...} for the entries whose author-year label another entry shares, in file order."""
    shared: dict[tuple[str, str], list[str]] = {}
    for key, e in _load(path).items():
        shared.setdefault(_author_year(e), []).append(key)
    return {k: "abcdefghijklmnopqrstuvwxyz"[i] for keys in shared.values() if len(keys) > 1
            for i, k in enumerate(keys)}


def cite(key: str) -> str:
    """Short citation: "Hu et al. (2021)", "Reimers and Gurevych (2019)", "Karpathy (2015)"; labels
    that two entries share get a/b in file order: "Lv et al. (2023a)", "Lv et al. (2023b)"."""
    who, year = _author_year(entry(key))
    return f"{who} ({year}{_suffixes(str(BIB_PATH.resolve())).get(key, '')})"


def papers() -> list[str]:
    """The keys of the reading lists' papers (every entry but the datasets, models and background
    papers), in file order."""
    return [k for k, e in load_bib().items() if _field(e, "group") not in NOT_READING_LIST]


def bibtex(key: str) -> str:
    """The entry's BibTeX text as written in the .bib file, without our custom fields."""
    text = entry(key).raw
    for name in CUSTOM_FIELDS:
        text = re.sub(rf"\n[ \t]*{name}\s*=\s*\{{[^\n]*\}},?[ \t]*(?=\n)", "", text)
    return re.sub(r",(\s*)\}$", r"\1}", text.strip())


def link(key: str) -> str:
    """The arXiv abstract page when there is one, else the entry's url."""
    e = entry(key)
    return f"https://arxiv.org/abs/{_field(e, 'arxiv')}" if _field(e, "arxiv") else _field(e, "url")


def venue(key: str) -> str:
    """Where and when it appeared, e.g. "arXiv preprint arXiv:2106.09685, 2021"."""
    e = entry(key)
    arxiv = _field(e, "arxiv") and f"arXiv preprint arXiv:{_field(e, 'arxiv')}"
    where = _field(e, "journal") or _field(e, "booktitle") or arxiv or ""
    return ", ".join(p for p in (_plain(where), _field(e, "year")) if p)


def paper_card(key: str, claim: str, notebook_profile=None) -> Card:
    """A Markdown card for the top of a notebook: the paper, the claim it tests, its BibTeX.

    `notebook_profile` (optional) says how the notebook runs, e.g. "cpu-fast" or a dict such as
    {"model": "SmolLM2-135M", "steps": 200}; it is shown as one line.
    """
    e = entry(key)
    authors = [" ".join(reversed(n.split(", ", 1))) if n != "others" else "et al." for n in _names(e)]
    label = f"arXiv:{_field(e, 'arxiv')}" if _field(e, "arxiv") else link(key)
    lines = [f"### 📄 {title(key)}", "",
             f"**{cite(key)}**: {', '.join(authors).rstrip('.')}.  ", f"*{venue(key)}* · [{label}]({link(key)})", "",
             f"**Claim tested:** {claim}"]
    if notebook_profile:
        if isinstance(notebook_profile, dict):
            notebook_profile = ", ".join(f"{k}={v}" for k, v in notebook_profile.items())
        lines += ["", f"**Notebook profile:** {notebook_profile}"]
    lines += ["", "<details><summary>BibTeX</summary>", "", "```bibtex", bibtex(key), "```", "", "</details>"]
    return Card("\n".join(lines) + "\n")


@functools.lru_cache(maxsize=None)
def claims(path: str | None = None) -> dict[str, dict]:
    """Every claim of ``references/claims.toml`` (the papers' numbers the notebooks quote), validated."""
    import tomllib
    path = Path(path or CLAIMS_PATH)
    try:
        table = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{path} is not valid TOML: {e}") from e
    keys = load_bib()
    for name, c in table.items():
        missing = [f for f in CLAIM_FIELDS if not c.get(f)]
        if missing:
            raise ValueError(f"{path}: claim {name!r} lacks {missing}")
        if c["paper"] not in keys:
            raise ValueError(f"{path}: claim {name!r} cites {c['paper']!r}, which is not in {BIB_PATH.name}")
        if c["checked"] not in CHECKED:
            raise ValueError(f"{path}: claim {name!r} has checked={c['checked']!r}; use one of {CHECKED}")
    return table


def claim(name: str) -> dict:
    """One claim of ``references/claims.toml``; an unknown name fails with the close ones."""
    table = claims()
    if name not in table:
        close = difflib.get_close_matches(name, list(table), n=3)
        raise KeyError(f"no claim {name!r} in {CLAIMS_PATH.name}" + (f"; did you mean {close}?" if close else ""))
    return table[name]


def notebooks_citing(nb_dir: str | Path | None = None, functions=("paper_card",)) -> dict[str, list[str]]:
    """{key: [notebook file names]} for each `paper_card("key"` call in the notebooks' code cells.

    `functions` widens the search to other calls, e.g. ("paper_card", "cite") for datasets.
    """
    call = re.compile(rf"""\b(?:{'|'.join(functions)})\(\s*(["'])([^"']+)\1""")
    found: dict[str, list[str]] = {}
    for path in sorted(Path(nb_dir or NOTEBOOK_DIR).glob("*.ipynb")):
        try:
            cells = json.loads(path.read_text(encoding="utf-8")).get("cells", [])
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid notebook JSON: {err}") from err
        for cell in (c for c in cells if c.get("cell_type") == "code"):
            source = cell.get("source", "")
            for match in call.finditer("".join(source) if isinstance(source, list) else source):
                names = found.setdefault(match.group(2), [])
                if path.name not in names:
                    names.append(path.name)
    return found


def _row(key: str, notebooks: list[str], is_data: bool) -> str:
    e = entry(key)
    paper = f"[{title(key)}]({link(key)})".replace("|", "\\|")
    paper += f" <br>*also in: {_field(e, 'also_in')}*" if _field(e, "also_in") else ""
    covered = ", ".join(f"[{Path(n).stem}](../notebooks/{n})" for n in notebooks)
    if is_data:
        terms = _plain(_field(e, "license")).replace("|", "\\|") or "\u2013"
        return f"| {_plain(_field(e, 'resource'))} | {paper} | {cite(key)} | {terms} | {covered or 'not yet used'} |"
    return f"| {cite(key)} | {paper} | {covered or 'not yet covered'} |"


def render_reading_list(bib_path: str | Path | None = None, nb_dir: str | Path | None = None) -> str:
    """The Markdown of references/README.md: every paper by reading list, with its notebooks."""
    bib, citing = load_bib(bib_path), notebooks_citing(nb_dir)
    using = notebooks_citing(nb_dir, functions=("paper_card", "cite", "bibtex"))
    groups: dict[str, list[str]] = {}
    for key, e in bib.items():  # file order, which follows the order of the seed reading lists
        groups.setdefault(_field(e, "group"), []).append(key)
    papers = [k for g, keys in groups.items() if g not in NOT_READING_LIST for k in keys]
    out = ["# Reading list", "",
           "<!-- Generated by `python -m peft_from_scratch.bib --write` from peft_from_scratch.bib and the "
           "notebooks' paper_card calls. Do not edit by hand. -->", "",
           "The papers behind this project, from four reading lists on parameter-efficient fine-tuning, grouped "
           "as those lists group them (a paper that several lists mention appears once, under the first). Each "
           "notebook opens with `paper_card(\"key\", claim=...)`, naming the paper it covers and the claim it "
           "reproduces; the tables link every paper to those notebooks. Cite with the keys in "
           "[`peft_from_scratch.bib`](peft_from_scratch.bib), or from Python with "
           "`peft_from_scratch.bib.cite(key)` and `bibtex(key)`.", "",
           f"**Coverage: {sum(k in citing for k in papers)} of {len(papers)} papers have a notebook.**"]
    for group, keys in groups.items():
        is_data = group == DATA_GROUP
        if is_data:
            out += ["", f"## {group}", "", "The datasets and pretrained models the notebooks use, with the paper "
                    "to cite for each and its license or terms (from the raw data's provenance notes; the subsets "
                    "in `data/` are described in [`data/README.md`](../data/README.md)). A notebook counts as "
                    "using one when a code cell calls `bib.cite(\"key\")` (or `paper_card`/`bibtex`) with its key.",
                    "", "| Resource | Reference | Citation | License / terms | Used in |", "|---|---|---|---|---|"]
        else:
            done = sum(k in citing for k in keys)
            out += ["", f"## {group} ({done}/{len(keys)} covered)", ""]
            if group == BACKGROUND_GROUP:
                out += ["Papers that no reading list names but a notebook tests, because a method of the lists "
                        "needs them (not counted in the coverage above).", ""]
            out += ["| Citation | Paper | Notebooks |", "|---|---|---|"]
        out += [_row(k, (using if is_data else citing).get(k, []), is_data) for k in keys]
    return "\n".join(out) + "\n"


MAP_START, MAP_END = "<!-- method map: start -->", "<!-- method map: end -->"
ROOT_README = REPO / "README.md"


def render_method_map(nb_dir: str | Path | None = None) -> str:
    """The README's map: every registered method by family, with its file, paper and notebooks."""
    from .core import registry   # lazily: the registry imports every method
    citing = notebooks_citing(nb_dir)
    lines = [MAP_START, "", "| family | method | kind | file | paper | notebooks |", "|---|---|---|---|---|---|"]
    for m in registry.methods():
        notebooks = ", ".join(f"[{Path(n).stem}](notebooks/{n})" for n in citing.get(m.paper, [])) or "not yet"
        parent = f" (extends {', '.join(f'`{p}`' for p in m.parents)})" if m.parents else ""
        lines.append(f"| {m.family} | `{m.name}`{parent} | {m.kind} | [{m.file}]({m.file}) | "
                     f"[{cite(m.paper)}]({link(m.paper)}) | {notebooks} |")
    return "\n".join(lines + ["", MAP_END])


def readme_with_map(text: str, nb_dir: str | Path | None = None) -> str:
    """``text`` (the README) with the block between the map markers replaced by ``render_method_map``."""
    if MAP_START not in text or MAP_END not in text:
        raise ValueError(f"the README has no {MAP_START} ... {MAP_END} block for the method map")
    head, rest = text.split(MAP_START, 1)
    return head + render_method_map(nb_dir) + rest.split(MAP_END, 1)[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m peft_from_scratch.bib", description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--write", action="store_true", help="write references/README.md and the README's method map")
    mode.add_argument("--check", action="store_true", help="exit 1 if either is out of date")
    args = parser.parse_args(argv)
    generated = {README_PATH: render_reading_list(),
                 ROOT_README: readme_with_map(ROOT_README.read_text(encoding="utf-8"))}
    if args.write:
        for path, text in generated.items():
            path.write_text(text, encoding="utf-8")
            print(f"wrote {path}")
    elif args.check:
        stale = 0
        for path, text in generated.items():
            current = path.read_text(encoding="utf-8") if path.exists() else ""
            if current != text:
                sys.stdout.writelines(difflib.unified_diff(current.splitlines(True), text.splitlines(True),
                                                           f"{path.name} (on disk)", f"{path.name} (generated)"))
                print(f"\n{path} is out of date: run `python -m peft_from_scratch.bib --write`.")
                stale += 1
        if stale:
            return 1
        print("references/README.md and the README's method map are up to date.")
    else:
        sys.stdout.write(generated[README_PATH])
    return 0


if __name__ == "__main__":
    sys.exit(main())
