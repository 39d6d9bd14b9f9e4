"""Tests for the bibliography (references/peft_from_scratch.bib) and peft_from_scratch.bib."""

import json
import re
from collections import Counter
from pathlib import Path

import bibtexparser
import pytest

from peft_from_scratch import bib

SEEDS = Path(__file__).resolve().parents[1].parent / "shared" / "seeds"
ARXIV_ID = re.compile(r"arxiv(?:\.org/(?:abs|pdf)/(?:arxiv:)?|:)(\d{4}\.\d{4,5})", re.IGNORECASE)
NON_ARXIV_PAPERS = {"fu2023effectiveness", "peft"}  # the AAAI paper (linked from the AAAI site) and the library
DATASETS_AND_MODELS = {
    "socher2013recursive", "wang2018glue", "zhang2015character", "novikova2017e2e", "cobbe2021training",
    "karpathy2015charrnn", "allal2025smollm2", "wang2020minilm", "reimers2019sentencebert",
    "devlin2019bert", "touvron2023llama",
}


def seed_texts():
    if not SEEDS.is_dir():
        pytest.skip(f"the reading lists are not here ({SEEDS} is missing): nothing to compare the .bib against")
    return {p.name: p.read_text(encoding="utf-8") for p in sorted(SEEDS.iterdir()) if p.is_file()}


def seed_arxiv_ids():
    return {m.group(1) for text in seed_texts().values() for m in ARXIV_ID.finditer(text)}


def field(e, name):
    return e.get(name).value if e.get(name) is not None else None


def test_bib_parses_cleanly_without_duplicate_keys():
    library = bibtexparser.parse_file(str(bib.BIB_PATH))
    assert library.failed_blocks == [], [b.start_line for b in library.failed_blocks]
    keys = re.findall(r"^@\w+\{([^,\s]+),", bib.BIB_PATH.read_text(encoding="utf-8"), re.MULTILINE)
    assert [k for k, n in Counter(keys).items() if n > 1] == []
    assert len(keys) == len(library.entries) == len(bib.load_bib())


def test_every_seed_arxiv_id_has_exactly_one_entry():
    by_arxiv = Counter(field(e, "arxiv") for e in bib.load_bib().values())
    ids = seed_arxiv_ids()
    assert ids, "no arXiv ids found in the seeds"
    missing = sorted(i for i in ids if by_arxiv[i] == 0)
    assert missing == [], f"arXiv ids in the reading lists without a .bib entry: {missing}"
    assert [i for i in ids if by_arxiv[i] > 1] == []


def test_papers_are_exactly_the_seed_papers():
    ids = seed_arxiv_ids()
    papers = {k: e for k, e in bib.load_bib().items() if field(e, "group") != bib.DATA_GROUP}
    extra = sorted(k for k, e in papers.items() if field(e, "arxiv") not in ids and k not in NON_ARXIV_PAPERS)
    assert extra == [], f"paper entries that no reading list mentions: {extra}"
    assert len(papers) == len(ids) + len(NON_ARXIV_PAPERS)


def test_seed_bibtex_entries_are_copied_verbatim():
    text = seed_texts()
    blocks = [b for t in text.values() for b in re.findall(r"```bibtex\n(.*?)```", t, re.DOTALL)]
    assert blocks, "seed 001 should contain ```bibtex blocks"
    ours = bib.load_bib()
    for block in blocks:
        (seed_entry,) = bibtexparser.parse_string(block).entries
        assert seed_entry.key in ours, f"seed key {seed_entry.key} missing"
        mine = ours[seed_entry.key]
        assert field(mine, "title") == field(seed_entry, "title")
        for f in seed_entry.fields:
            assert field(mine, f.key) == f.value, f"{seed_entry.key}.{f.key} differs from the seed"


def test_named_papers_and_resources_are_present():
    entries = bib.load_bib()
    assert "AAAI" in field(entries["fu2023effectiveness"], "booktitle")
    assert field(entries["wei2021finetuned"], "arxiv") == "2109.01652"  # FLAN
    assert "huggingface/peft" in field(entries["peft"], "howpublished")
    for key in DATASETS_AND_MODELS:
        assert field(entries[key], "group") == bib.DATA_GROUP, key
        assert field(entries[key], "resource"), key


def test_every_entry_has_the_core_fields():
    for key, e in bib.load_bib().items():
        for name in ("title", "author", "year", "group"):
            assert field(e, name), f"{key} has no {name}"
        assert re.fullmatch(r"\d{4}", field(e, "year")), key
        assert bib.link(key).startswith("https://"), key


def test_cite():
    assert bib.cite("hu2021lora") == "Hu et al. (2021)"
    assert bib.cite("reimers2019sentencebert") == "Reimers and Gurevych (2019)"
    assert bib.cite("karpathy2015charrnn") == "Karpathy (2015)"
    assert bib.cite("nikdan2024rosa") == "Nikdan et al. (2024)"  # "First Last" author format


def test_bibtex_is_clean_and_parses():
    text = bib.bibtex("hu2021lora")
    assert text.startswith("@article{hu2021lora,") and text.endswith("}")
    assert "group" not in text and "also_in" not in text
    (parsed,) = bibtexparser.parse_string(text).entries
    assert parsed.key == "hu2021lora"


def test_paper_card():
    card = bib.paper_card("hu2021lora", claim="LoRA matches full fine-tuning.", notebook_profile="cpu-fast")
    md = card._repr_markdown_()
    assert md == card.markdown
    assert "Lora: Low-rank adaptation of large language models" in md
    assert "LoRA matches full fine-tuning." in md and "cpu-fast" in md
    assert "https://arxiv.org/abs/2106.09685" in md
    assert f"```bibtex\n{bib.bibtex('hu2021lora')}\n```" in md


def test_unknown_key_names_close_keys():
    with pytest.raises(KeyError) as err:
        bib.entry("hu2021loar")
    assert "hu2021lora" in str(err.value)
    with pytest.raises(bib.UnknownKeyError, match="hu2021lora"):
        bib.cite("lora")


def write_notebook(path, *sources, cell_type="code"):
    cells = [{"cell_type": cell_type, "metadata": {}, "source": s} for s in sources]
    path.write_text(json.dumps({"cells": cells, "metadata": {}, "nbformat": 4, "nbformat_minor": 5}))


def test_notebooks_citing_and_reading_list(tmp_path):
    write_notebook(tmp_path / "02_lora.ipynb", ["from peft_from_scratch.bib import paper_card\n",
                                                  'paper_card("hu2021lora", claim="...")\n'], 'cite("socher2013recursive")')
    write_notebook(tmp_path / "05_qlora.ipynb", "paper_card( 'dettmers2023qlora', claim='...')")
    write_notebook(tmp_path / "99_notes.ipynb", 'paper_card("liu2024dora")', cell_type="markdown")
    assert bib.notebooks_citing(tmp_path) == {"hu2021lora": ["02_lora.ipynb"], "dettmers2023qlora": ["05_qlora.ipynb"]}
    md = bib.render_reading_list(nb_dir=tmp_path)
    assert "[02_lora](../notebooks/02_lora.ipynb)" in md
    assert "**Coverage: 2 of" in md
    sst2 = next(line for line in md.splitlines() if line.startswith("| SST-2"))
    assert "../notebooks/02_lora.ipynb" in sst2
    dora = next(line for line in md.splitlines() if "DoRA" in line)
    assert dora.endswith("not yet covered |")


def test_notebooks_only_cite_known_keys():
    cited = bib.notebooks_citing(bib.NOTEBOOK_DIR, functions=("paper_card", "cite", "bibtex"))
    unknown = {k: v for k, v in cited.items() if k not in bib.load_bib()}
    assert unknown == {}, f"notebooks cite keys missing from {bib.BIB_PATH.name}: {unknown}"


def test_readme_is_in_sync():
    assert bib.README_PATH.exists(), "references/README.md is missing: run `python -m peft_from_scratch.bib --write`"
    assert bib.README_PATH.read_text(encoding="utf-8") == bib.render_reading_list(), (
        "references/README.md is out of date: run `python -m peft_from_scratch.bib --write`")


def test_the_readme_method_map_is_in_sync_and_lists_every_method():
    from peft_from_scratch.core import registry
    text = bib.ROOT_README.read_text(encoding="utf-8")
    assert text == bib.readme_with_map(text), "the README's method map is out of date: run `python -m peft_from_scratch.bib --write`"
    table = text.split(bib.MAP_START)[1].split(bib.MAP_END)[0]
    for m in registry.methods():
        assert f"`{m.name}`" in table and m.file in table and bib.cite(m.paper) in table


def test_main_check_and_write(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bib, "README_PATH", tmp_path / "README.md")
    monkeypatch.setattr(bib, "ROOT_README", tmp_path / "ROOT.md")
    (tmp_path / "ROOT.md").write_text(f"intro\n{bib.MAP_START}\nold\n{bib.MAP_END}\nrest\n")
    (tmp_path / "README.md").write_text("stale\n")
    assert bib.main(["--check"]) == 1
    assert "--write" in capsys.readouterr().out
    assert bib.main(["--write"]) == 0
    assert bib.main(["--check"]) == 0
