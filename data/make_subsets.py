"""Regenerate the small data subsets in this folder from the raw files, and write README.md.

    python data/make_subsets.py /path/to/raw/data      # e.g. ../shared/data, laid out as in its SOURCES.md

The raw folder holds the public files unchanged (see the provenance table this script writes into
README.md). Every subset is a plain copy of whole raw lines: we never edit a row, we only choose
rows. Sampling uses Python's ``random.Random(SEED)`` (same draws on any recent Python 3) and keeps the
chosen rows in their original file order. Raw rows that are malformed, or that would leak test data
into training, are dropped here and counted in README.md -- never silently.
"""
from __future__ import annotations

import csv
import hashlib
import json
import platform
import random
import shutil
import sys
from pathlib import Path

SEED = 0
OUT = Path(__file__).resolve().parent
AGNEWS_LABELS = ["World", "Sports", "Business", "Sci/Tech"]  # the standard AG News class order
N_SST2_TRAIN, N_AGNEWS_TRAIN, N_AGNEWS_TEST, N_GSM8K_TRAIN, N_SHAKESPEARE_CHARS = 8000, 4000, 1000, 2000, 200_000
N_RTE_TRAIN = 600
N_MRPC_TRAIN = 600
MRPC_LICENSE = "Microsoft Shared Source License.htm"


def read_lines(path: Path) -> list[str]:
    """The file's lines without their '\\n' (split on '\\n' only: text may hold other line breaks)."""
    lines = path.read_text(encoding="utf-8").split("\n")
    return lines[:-1] if lines and lines[-1] == "" else lines


def write_lines(path: Path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def sample(indices: list[int], k: int, rng: random.Random) -> list[int]:
    if k > len(indices):
        raise ValueError(f"asked for {k} rows but only {len(indices)} are available")
    return rng.sample(indices, k)


def stratified(labels: list[str], k: int, rng: random.Random) -> list[int]:
    """k // 4 row indices per AG News class, in the original order."""
    chosen = []
    for name in AGNEWS_LABELS:
        chosen += sample([i for i, lab in enumerate(labels) if lab == name], k // len(AGNEWS_LABELS), rng)
    return sorted(chosen)


def repeats_and_conflicts(rows: list[tuple[str, str]]) -> tuple[int, int]:
    """How many rows repeat an earlier text, and how many texts carry more than one label."""
    labels: dict[str, set] = {}
    for text, label in rows:
        labels.setdefault(text, set()).add(label)
    return len(rows) - len(labels), sum(len(v) > 1 for v in labels.values())


def tsv_rows(lines: list[str], valid_label) -> tuple[list[tuple[str, str]], int]:
    """(text, label) for well-formed lines, and how many lines were malformed."""
    rows = [tuple(line.split("\t")) for line in lines]
    good = [r for r in rows if len(r) == 2 and r[0].strip() and valid_label(r[1])]
    return good, len(rows) - len(good)


def make_sst2(raw: Path, notes: dict) -> None:
    lines = read_lines(raw / "sst2" / "train.tsv")
    assert lines[0] == "sentence\tlabel", lines[0]
    rows, bad = tsv_rows(lines[1:], lambda lab: lab in ("0", "1"))
    keep = sorted(sample(list(range(len(rows))), N_SST2_TRAIN, random.Random(SEED)))
    write_lines(OUT / "sst2" / "train.tsv", ["sentence\tlabel"] + ["\t".join(rows[i]) for i in keep])
    shutil.copyfile(raw / "sst2" / "test.tsv", OUT / "sst2" / "validation.tsv")
    pool_repeats, conflicts = repeats_and_conflicts(rows)
    notes["sst2"] = dict(pool=len(lines) - 1, malformed=bad, pool_repeats=pool_repeats, conflicts=conflicts,
                         repeats=repeats_and_conflicts([rows[i] for i in keep])[0])


def make_agnews(raw: Path, notes: dict) -> None:
    test_lines = read_lines(raw / "agnews" / "test.tsv")
    test, bad_test = tsv_rows(test_lines, lambda lab: lab in AGNEWS_LABELS)
    pool_lines = read_lines(raw / "agnews" / "dev.tsv")
    pool, bad_pool = tsv_rows(pool_lines, lambda lab: lab in AGNEWS_LABELS)
    # Drop training rows whose text is also a test row (leakage), then repeated texts (keep the first).
    test_texts, seen, clean, in_test, repeats = {t for t, _ in test}, set(), [], 0, 0
    for text, label in pool:
        if text in test_texts:
            in_test += 1
        elif text in seen:
            repeats += 1
        else:
            clean.append((text, label))
        seen.add(text)
    rng = random.Random(SEED)
    train_idx = stratified([lab for _, lab in clean], N_AGNEWS_TRAIN, rng)
    test_idx = stratified([lab for _, lab in test], N_AGNEWS_TEST, rng)
    write_lines(OUT / "agnews" / "train.tsv", ["text\tlabel"] + ["\t".join(clean[i]) for i in train_idx])
    write_lines(OUT / "agnews" / "test.tsv", ["text\tlabel"] + ["\t".join(test[i]) for i in test_idx])
    notes["agnews"] = dict(pool=len(pool_lines), malformed=bad_pool, conflicts=repeats_and_conflicts(pool)[1], in_test=in_test, repeats=repeats,
                           clean=len(clean), test_pool=len(test_lines), test_malformed=bad_test)


def make_e2e(raw: Path, notes: dict) -> None:
    for name in ("devset.csv", "testset_w_refs.csv"):
        with open(raw / "e2e" / name, encoding="utf-8", newline="") as f:
            rows = list(csv.reader(f))
        assert rows[0] == ["mr", "ref"] and all(len(r) == 2 and r[0] and r[1] for r in rows[1:]), name
        (OUT / "e2e").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(raw / "e2e" / name, OUT / "e2e" / name)  # byte for byte (devset.csv has CRLF ends)
        notes[name] = dict(rows=len(rows) - 1, mrs=len({r[0] for r in rows[1:]}))


def make_gsm8k(raw: Path, notes: dict) -> None:
    lines = read_lines(raw / "gsm8k" / "train.jsonl")

    def well_formed(line: str) -> bool:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            return False
        return isinstance(row.get("question"), str) and "####" in str(row.get("answer", ""))

    good = [i for i, line in enumerate(lines) if well_formed(line)]
    keep = sorted(sample(good, N_GSM8K_TRAIN, random.Random(SEED)))
    write_lines(OUT / "gsm8k" / "train.jsonl", [lines[i] for i in keep])
    shutil.copyfile(raw / "gsm8k" / "test.jsonl", OUT / "gsm8k" / "test.jsonl")
    notes["gsm8k"] = dict(pool=len(lines), malformed=len(lines) - len(good))


def make_rte(raw: Path, notes: dict) -> None:
    def well_formed(line: str) -> bool:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            return False
        return (all(isinstance(row.get(k), str) and row[k].strip() for k in ("premise", "hypothesis"))
                and row.get("label") in ("entailment", "not_entailment"))

    lines = read_lines(raw / "rte" / "train.jsonl")
    val_lines = read_lines(raw / "rte" / "val.jsonl")
    assert all(well_formed(line) for line in val_lines), "rte/val.jsonl"
    val_pairs = {(json.loads(v)["premise"], json.loads(v)["hypothesis"]) for v in val_lines}
    good = [i for i, line in enumerate(lines) if well_formed(line)]
    clean = [i for i in good if (json.loads(lines[i])["premise"], json.loads(lines[i])["hypothesis"]) not in val_pairs]
    keep = sorted(sample(clean, N_RTE_TRAIN, random.Random(SEED)))
    write_lines(OUT / "rte" / "train.jsonl", [lines[i] for i in keep])
    shutil.copyfile(raw / "rte" / "val.jsonl", OUT / "rte" / "val.jsonl")
    labels = [json.loads(lines[i])["label"] for i in keep]
    notes["rte"] = dict(pool=len(lines), malformed=len(lines) - len(good), in_val=len(good) - len(clean),
                        entailment=labels.count("entailment"), val=len(val_lines))


def make_mrpc(raw: Path, notes: dict) -> None:
    """MRPC (GLUE's TSV, a UTF-8 BOM before the header): 600 training pairs sampled, dev whole, and the
    Microsoft Research Shared Source License copied beside them (it must travel with the data)."""
    def well_formed(line: str) -> bool:
        fields = line.split("\t")
        return len(fields) == 5 and fields[0] in ("0", "1") and fields[3].strip() != "" and fields[4].strip() != ""

    lines = read_lines(raw / "mrpc" / "train.tsv")
    dev_lines = read_lines(raw / "mrpc" / "dev.tsv")
    assert all(well_formed(line) for line in dev_lines[1:]), "mrpc/dev.tsv"
    dev_pairs = {tuple(line.split("\t")[3:5]) for line in dev_lines[1:]}
    good = [i for i in range(1, len(lines)) if well_formed(lines[i])]
    clean = [i for i in good if tuple(lines[i].split("\t")[3:5]) not in dev_pairs]
    keep = sorted(sample(clean, N_MRPC_TRAIN, random.Random(SEED)))
    write_lines(OUT / "mrpc" / "train.tsv", [lines[0]] + [lines[i] for i in keep])
    shutil.copyfile(raw / "mrpc" / "dev.tsv", OUT / "mrpc" / "dev.tsv")
    shutil.copyfile(raw / "mrpc" / MRPC_LICENSE, OUT / "mrpc" / MRPC_LICENSE)
    notes["mrpc"] = dict(pool=len(lines) - 1, malformed=len(lines) - 1 - len(good), in_dev=len(good) - len(clean),
                         paraphrase=sum(lines[i].startswith("1\t") for i in keep), dev=len(dev_lines) - 1)


def make_arc_easy(raw: Path, notes: dict) -> None:
    """ARC-Easy train and test: the questions with exactly four choices labelled A-D (most of them), so
    every question is answered by one of the same four letters; the others are counted, not edited."""
    def four_lettered(line: str) -> bool:
        row = json.loads(line)
        labels = [c["label"] for c in row["question"]["choices"]]
        return labels == ["A", "B", "C", "D"] and row["answerKey"] in labels and row["question"]["stem"].strip() != ""

    for split in ("Train", "Test"):
        lines = read_lines(raw / "arc_easy" / f"ARC-Easy-{split}.jsonl")
        keep = [line for line in lines if four_lettered(line)]
        write_lines(OUT / "arc_easy" / f"{split.lower()}.jsonl", keep)
        notes[f"arc_easy_{split.lower()}"] = dict(pool=len(lines), kept=len(keep), other=len(lines) - len(keep))


def make_tinyshakespeare(raw: Path, notes: dict) -> None:
    text = (raw / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8")
    (OUT / "tinyshakespeare").mkdir(parents=True, exist_ok=True)
    (OUT / "tinyshakespeare" / "input.txt").write_text(text[:N_SHAKESPEARE_CHARS], encoding="utf-8")
    notes["tinyshakespeare"] = dict(pool=len(text))


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def file_rows(rel: str) -> str:
    """One markdown table row per file: path, rows, bytes, sha256."""
    path = OUT / rel
    if rel.endswith(".txt"):
        count = f"{len(path.read_text(encoding='utf-8')):,} chars"
    elif rel.endswith(".htm"):
        count = "license"
    elif rel.endswith(".csv"):
        with open(path, encoding="utf-8", newline="") as f:
            count = f"{sum(1 for _ in csv.reader(f)) - 1:,} rows"
    else:
        count = f"{len(read_lines(path)) - (0 if rel.endswith('.jsonl') else 1):,} rows"
    return f"| `{rel}` | {count} | {path.stat().st_size:,} | `{sha256(path)}` |"


README = """\
# Data

<!-- Generated by `python data/make_subsets.py RAW_DIR`: edit the script, not this file. -->

Small, fixed subsets of six public datasets, so every notebook runs offline on a laptop. Each file
is a plain copy of whole lines of the raw public file (we choose rows, we never edit them), except
that the AG News files gain a `text\\tlabel` header row and Tiny Shakespeare is a prefix.
Regenerate everything, this README included, with `python data/make_subsets.py ../shared/data`
(the raw files, laid out as below). Sampling uses Python's `random.Random({seed})` (these files:
Python {python}) and keeps the chosen rows in their original order; the sha256 sums below let you
check a regenerated copy. `peft_from_scratch/data.py` loads these files.

Total: {total:,} bytes ({total_mb:.2f} MiB).

## SST-2 (binary sentiment)

| | |
|---|---|
| source | [forest-snow/alps](https://github.com/forest-snow/alps) @ `3c7ef2c98249fc975a897b27f275695f97d5b7a9`, `data/SST-2/` |
| license / terms | GLUE SST-2 (Stanford Sentiment Treebank); the alps repository is MIT |
| cite | `socher2013recursive`, `wang2018glue` |
| splits | alps re-split GLUE: its `train.tsv` ({sst2[pool]:,} rows) + `dev.tsv` are the GLUE train set (67,349 phrases); its labelled `test.tsv` (872 sentences) is the GLUE **dev** set that papers report on |
| `train.tsv` | {n_sst2:,} rows sampled uniformly without replacement from alps `train.tsv` (seed {seed}); {sst2[malformed]} malformed raw rows dropped before sampling. GLUE train repeats phrases ({sst2[pool_repeats]} repeated rows in the pool, {sst2[conflicts]} phrases with both labels); we keep them as in GLUE: {sst2[repeats]} sampled rows repeat an earlier sampled phrase |
| `validation.tsv` | alps `test.tsv` (= GLUE dev), whole, byte for byte |
| format | TSV, header `sentence\\tlabel`, label 1 = positive, 0 = negative; sentences are tokenized lower-case text with a trailing space (the loader strips it) |

{files_sst2}

## AG News (4-way topic classification)

| | |
|---|---|
| source | [forest-snow/alps](https://github.com/forest-snow/alps) @ `3c7ef2c98249fc975a897b27f275695f97d5b7a9`, `data/agnews/` |
| license / terms | AG News (Zhang et al. 2015): for research use |
| cite | `zhang2015character` |
| splits | no official train file was available; alps `dev.tsv` ({ag[pool]:,} rows; SOURCES.md says 10,000) is our training pool, alps `test.tsv` ({ag[test_pool]:,} rows, the official AG News test set) our test pool |
| `train.tsv` | {n_ag_train:,} rows, stratified ({n_ag_train_per:,} per class), from the pool after dropping {ag[malformed]} malformed rows, {ag[in_test]} rows whose text is also in the test set (leakage), and {ag[repeats]} repeated texts (first kept; {ag[conflicts]} repeated text carries two labels): {ag[clean]:,} rows left |
| `test.tsv` | {n_ag_test:,} rows, stratified ({n_ag_test_per} per class), from the test pool ({ag[test_malformed]} malformed rows dropped) |
| format | TSV with a header row `text\\tlabel` we added; label is the class name: {labels}. The text is raw AG News: HTML entities such as `#39;` (an apostrophe) and `\\` line breaks are left as they are |

{files_agnews}

## E2E NLG (data-to-text)

| | |
|---|---|
| source | [tuetschek/e2e-dataset](https://github.com/tuetschek/e2e-dataset) @ `ab0d967dd5729ce455ef14ba9ffafc456a335264` |
| license / terms | CC BY-SA 4.0 (Novikova et al. 2017); these copies are under the same license |
| cite | `novikova2017e2e` |
| splits | the official `trainset.csv` was **not** available: we train on the official dev set and evaluate on the official test set with its multiple references (multi-reference BLEU), so our scores are not comparable with papers that train on the 42k-row train set |
| `devset.csv` | whole, byte for byte: {dev[rows]:,} (mr, ref) rows over {dev[mrs]} meaning representations |
| `testset_w_refs.csv` | whole, byte for byte: {test[rows]:,} (mr, ref) rows over {test[mrs]} meaning representations (1 to 45 references each) |
| format | CSV with header `mr,ref` (quoted fields; `devset.csv` has CRLF line ends, as upstream) |

{files_e2e}

## GSM8K (grade-school math word problems)

| | |
|---|---|
| source | [openai/grade-school-math](https://github.com/openai/grade-school-math) @ `3101c7d5072418e28b9008a6636bde82a006892c`, `grade_school_math/data/` |
| license / terms | MIT (Cobbe et al. 2021) |
| cite | `cobbe2021training` |
| `train.jsonl` | {n_gsm:,} rows sampled uniformly without replacement from `train.jsonl` ({gsm[pool]:,} rows; {gsm[malformed]} malformed rows -- bad JSON, no question, or no `####` answer -- dropped before sampling), seed {seed} |
| `test.jsonl` | whole, byte for byte (1,319 rows) |
| format | JSON lines with `question` and `answer`; the answer is a worked solution with `<<calculator>>` annotations ending in `#### <final answer>` (some finals have thousands commas, e.g. `2,125`) |

{files_gsm8k}

## RTE (recognising textual entailment)

| | |
|---|---|
| source | [nyu-mll/jiant](https://github.com/nyu-mll/jiant) @ `789e1c0aafa03bf12342be176228e25152bc6a50`, `data/RTE/` (reachable only from the pull-request ref `refs/pull/923/head`) |
| license / terms | RTE 1, 2, 3 and 5 (the PASCAL RTE challenges, Dagan et al. 2006 ff.) as packaged by SuperGLUE (Wang et al. 2019); no license is stated for the data: research use only, terms unclear. We ship a small subset for teaching and research, as the GLUE/SuperGLUE copies are shared |
| cite | `dagan2006pascal`, `wang2019superglue` |
| splits | SuperGLUE train ({rte[pool]:,} pairs) and val ({rte[val]} pairs, labelled; SuperGLUE's test set has no labels, so val is our evaluation set) |
| `train.jsonl` | {n_rte:,} pairs sampled uniformly without replacement from `train.jsonl` (seed {seed}; {rte[entailment]} of them entailment), after dropping {rte[malformed]} malformed rows and {rte[in_val]} pairs that are also in val |
| `val.jsonl` | whole, byte for byte |
| format | JSON lines with `premise`, `hypothesis`, `label` (`entailment` / `not_entailment`), `idx` |

{files_rte}

## MRPC (paraphrase)

| | |
|---|---|
| source | Nstats/my_bert @ `733d79335044b1b7eabb5b47a0eae0cd621dadc0`, `data/MRPC/` (GLUE's MRPC as written by GLUE's `download_glue_data.py`) |
| license / terms | Microsoft Research Shared Source License Agreement (MSR-SSLA), copied here as `Microsoft Shared Source License.htm`: copying and distribution for non-commercial purposes (teaching and academic research included); no commercial use; the license travels with the data (Dolan & Brockett 2005) |
| change notice | the MSR-SSLA asks derivative works to say what changed: `train.tsv` is a selection of whole rows of GLUE's `train.tsv` (header kept, rows unchanged, original order); `dev.tsv` is unchanged |
| cite | `dolan2005automatically` |
| splits | GLUE train ({mrpc[pool]:,} pairs) and dev ({mrpc[dev]} pairs, labelled; our evaluation set) |
| `train.tsv` | {n_mrpc:,} pairs sampled uniformly without replacement (seed {seed}; {mrpc[paraphrase]} of them paraphrases), after dropping {mrpc[malformed]} malformed rows and {mrpc[in_dev]} pairs that are also in dev |
| `dev.tsv` | whole, byte for byte |
| format | tab-separated with a UTF-8 BOM before the header `Quality`, `#1 ID`, `#2 ID`, `#1 String`, `#2 String` (Quality 1 = paraphrase); read with `quoting=csv.QUOTE_NONE` |

{files_mrpc}

## ARC-Easy (grade-school science questions, four choices)

| | |
|---|---|
| source | RazvanDu/TemporalRNNs @ `979116de476dc3b1d98198707a2da2caa64c83db`, `ARC-Easy/` (the AI2 Reasoning Challenge's Easy set; dev and test are byte-identical to the OpenCompass data release's copies) |
| license / terms | CC BY-SA 4.0 (AI2 Reasoning Challenge, Clark et al. 2018) |
| cite | `clark2018think` |
| `train.jsonl` | the {arc_train[kept]:,} of the {arc_train[pool]:,} rows of `ARC-Easy-Train.jsonl` whose choices are exactly A, B, C, D ({arc_train[other]} rows with 3 or 5 choices, or labelled 1-4, left out), whole lines in the original order |
| `test.jsonl` | the same selection of `ARC-Easy-Test.jsonl`: {arc_test[kept]:,} of {arc_test[pool]:,} rows ({arc_test[other]} left out) |
| format | JSON lines with `id`, `question.stem`, `question.choices` (list of `text`, `label`), `answerKey` |

{files_arc}

## Tiny Shakespeare (held-out general text)

| | |
|---|---|
| source | [karpathy/char-rnn](https://github.com/karpathy/char-rnn) @ `6f9487a6fe5b420b7ca9afb0d7c078e37c1d1b4e`, `data/tinyshakespeare/` |
| license / terms | Shakespeare's text is public domain |
| cite | `karpathy2015charrnn` |
| `input.txt` | the first {n_chars:,} characters of `input.txt` ({shakes[pool]:,} characters), for perplexity before/after fine-tuning (forgetting) |

{files_shakespeare}

## License and terms (from the raw data's SOURCES.md)

- SST-2: GLUE SST-2 (Stanford Sentiment Treebank, Socher et al. 2013); the alps repository is MIT.
- AG News: Zhang et al. 2015, research use.
- E2E: CC BY-SA 4.0 (Novikova et al. 2017).
- GSM8K: MIT (Cobbe et al. 2021).
- RTE: PASCAL RTE via SuperGLUE; no license stated, research use only, terms unclear.
- MRPC: Microsoft Research Shared Source License (non-commercial; included as `mrpc/Microsoft Shared Source License.htm`).
- ARC-Easy: CC BY-SA 4.0 (Clark et al. 2018); the subset here is shared under the same license.
- Tiny Shakespeare: Shakespeare's text is public domain.
"""


def files_table(rels: list[str]) -> str:
    return "\n".join(["| file | size | bytes | sha256 |", "|---|---|---|---|"] + [file_rows(r) for r in rels])


def main(raw: Path) -> None:
    notes: dict = {}
    for make in (make_sst2, make_agnews, make_e2e, make_gsm8k, make_rte, make_mrpc, make_arc_easy, make_tinyshakespeare):
        make(raw, notes)
    groups = {"files_sst2": ["sst2/train.tsv", "sst2/validation.tsv"],
              "files_agnews": ["agnews/train.tsv", "agnews/test.tsv"],
              "files_e2e": ["e2e/devset.csv", "e2e/testset_w_refs.csv"],
              "files_gsm8k": ["gsm8k/train.jsonl", "gsm8k/test.jsonl"],
              "files_rte": ["rte/train.jsonl", "rte/val.jsonl"],
              "files_mrpc": ["mrpc/train.tsv", "mrpc/dev.tsv", f"mrpc/{MRPC_LICENSE}"],
              "files_arc": ["arc_easy/train.jsonl", "arc_easy/test.jsonl"],
              "files_shakespeare": ["tinyshakespeare/input.txt"]}
    total = sum((OUT / r).stat().st_size for rels in groups.values() for r in rels)
    text = README.format(
        seed=SEED, python=platform.python_version(), total=total, total_mb=total / 2**20, sst2=notes["sst2"], ag=notes["agnews"],
        dev=notes["devset.csv"], test=notes["testset_w_refs.csv"], gsm=notes["gsm8k"],
        shakes=notes["tinyshakespeare"], n_sst2=N_SST2_TRAIN, n_ag_train=N_AGNEWS_TRAIN,
        n_ag_train_per=N_AGNEWS_TRAIN // 4, n_ag_test=N_AGNEWS_TEST, n_ag_test_per=N_AGNEWS_TEST // 4,
        n_gsm=N_GSM8K_TRAIN, rte=notes["rte"], n_rte=N_RTE_TRAIN, mrpc=notes["mrpc"], n_mrpc=N_MRPC_TRAIN,
        arc_train=notes["arc_easy_train"], arc_test=notes["arc_easy_test"], n_chars=N_SHAKESPEARE_CHARS,
        labels=", ".join(f"`{name}` ({i})" for i, name in enumerate(AGNEWS_LABELS)),
        **{k: files_table(v) for k, v in groups.items()})
    (OUT / "README.md").write_text(text, encoding="utf-8")
    print(f"wrote {total:,} bytes ({total / 2**20:.2f} MiB) of data and README.md to {OUT}")
    print(json.dumps(notes, indent=1))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(Path(sys.argv[1]))
