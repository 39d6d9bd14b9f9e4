"""The data the notebooks fine-tune on, and how it becomes model inputs.

Three steps, top to bottom:

1. Loaders read the small subsets in ``data/`` (provenance, sampling and licenses: data/README.md)
   into ``datasets.Dataset`` objects. They parse strictly: a malformed row raises
   ``DataFormatError`` naming the file and the line, instead of training on garbage.
2. Formatting. A causal LM (SmolLM2) sees a chat: the task input is the user turn, the target is the
   assistant turn, and the loss is masked (label -100) on every prompt token, so the model learns to
   answer, not to repeat questions. An encoder (MiniLM) just gets tokenized text and an int label.
3. Batching: ``Collator`` right-pads a list of examples into tensors, ``make_loader`` wraps it in a
   DataLoader with a seeded order, and ``lm_chunks`` cuts plain text into blocks for perplexity.
"""
from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Callable

import torch
from datasets import Dataset
from torch.utils.data import DataLoader

DATA_DIR = Path(__file__).resolve().parent.parent / "data"  # the repository's data/ folder
AGNEWS_LABELS = ["World", "Sports", "Business", "Sci/Tech"]  # label ids 0..3, the standard order
SST2_WORDS = ["negative", "positive"]                          # label 0 / 1 as an LM answers it
AGNEWS_WORDS = ["World", "Sports", "Business", "Science"]       # AG News labels as one-token answers
RTE_WORDS = ["yes", "no"]                                      # RTE label 0 (entailment) / 1 (not) as answers
ARC_WORDS = ["A", "B", "C", "D"]                               # ARC-Easy: the letter of the right choice
IGNORE_INDEX = -100                                            # labels the loss skips


class DataFormatError(ValueError):
    """A malformed row in a data file; ``path`` and the 1-based ``line`` say where."""

    def __init__(self, path: Path, line: int, problem: str):
        super().__init__(f"{path}, line {line}: {problem}")
        self.path, self.line = Path(path), line


# ----------------------------------------------------------------------------- 1. loaders

def data_dir() -> Path:
    """``$PFS_DATA`` if set, else the repository's ``data/`` folder."""
    return Path(os.environ.get("PFS_DATA") or DATA_DIR)


def _path(folder: str, split: str, files: dict[str, str]) -> Path:
    if split not in files:
        raise ValueError(f"split must be one of {list(files)}, got {split!r}")
    path = data_dir() / folder / files[split]
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist. Create the data subsets from the repository root with "
                                f"`python data/make_subsets.py ../shared/data` (the argument is the folder of raw "
                                f"files), or set PFS_DATA to a folder that has them.")
    return path


def _lines(path: Path) -> list[str]:
    """Lines without their '\\n'; split on '\\n' only, since texts may hold other line breaks."""
    lines = path.read_text(encoding="utf-8").split("\n")
    return lines[:-1] if lines[-1] == "" else lines


def _tsv(path: Path, header: list[str]) -> list[tuple[int, list[str]]]:
    """(line number, fields) for each data row, after checking the header and the field count."""
    lines, expected = _lines(path), "\t".join(header)
    if not lines or lines[0] != expected:
        raise DataFormatError(path, 1, f"expected the header {expected!r}, found {(lines or [''])[0][:80]!r}")
    rows = []
    for number, line in enumerate(lines[1:], start=2):
        fields = line.split("\t")
        if len(fields) != len(header):
            raise DataFormatError(path, number, f"expected {len(header)} tab-separated fields, found {len(fields)}")
        if not fields[0].strip():
            raise DataFormatError(path, number, "the text is empty")
        rows.append((number, fields))
    return rows


def _finish(columns: dict[str, list], n: int | None, seed: int) -> Dataset:
    """The whole file in file order, or its first n rows after a shuffle seeded by ``seed``."""
    dataset = Dataset.from_dict(columns)
    if n is None:
        return dataset
    if not 0 < n <= len(dataset):
        raise ValueError(f"n must be between 1 and {len(dataset)}, got {n}")
    return dataset.shuffle(seed=seed).select(range(n))


def _json_lines(path: Path):
    """(1-based line number, parsed row) for each line of a JSON-lines file; bad JSON names the line."""
    for number, line in enumerate(_lines(path), start=1):
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as e:
            raise DataFormatError(path, number, f"invalid JSON: {e.msg} (column {e.colno})") from None


def _labelled(path: Path, header: list[str], names: list[str]) -> dict[str, list]:
    """``text`` and ``label`` columns from a two-column TSV; label i is written ``names[i]`` in the file."""
    texts, labels = [], []
    for number, (text, name) in _tsv(path, header):
        if name not in names:
            raise DataFormatError(path, number, f"unknown label {name!r}; expected one of {names}")
        texts.append(text.strip())  # SST-2 sentences end with a space
        labels.append(names.index(name))
    return {"text": texts, "label": labels}


def load_sst2(split: str = "train", n: int | None = None, seed: int = 0) -> Dataset:
    """SST-2 movie-review sentiment: ``text``, ``label`` (1 = positive). validation = GLUE dev."""
    path = _path("sst2", split, {"train": "train.tsv", "validation": "validation.tsv"})
    return _finish(_labelled(path, ["sentence", "label"], ["0", "1"]), n, seed)


def load_agnews(split: str = "train", n: int | None = None, seed: int = 0) -> Dataset:
    """AG News topics: ``text``, ``label`` (an index into ``AGNEWS_LABELS``)."""
    path = _path("agnews", split, {"train": "train.tsv", "test": "test.tsv"})
    return _finish(_labelled(path, ["text", "label"], AGNEWS_LABELS), n, seed)


def load_e2e(split: str = "train", n: int | None = None, seed: int = 0) -> Dataset:
    """E2E restaurant descriptions. We train on the official dev set (the train set was unavailable).

    train: one row per (``mr``, ``ref``) pair. test: one row per unique ``mr``, with all its
    references in ``refs`` (a list of strings), for multi-reference BLEU.
    """
    path = _path("e2e", split, {"train": "devset.csv", "test": "testset_w_refs.csv"})
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f)
        try:  # line_num: the line each row ends on, 1-based
            rows = [(reader.line_num, fields) for fields in reader]
        except csv.Error as e:
            raise DataFormatError(path, reader.line_num, f"bad CSV: {e}") from None
    if not rows or rows[0][1] != ["mr", "ref"]:
        raise DataFormatError(path, 1, f"expected the header 'mr,ref', found {','.join(rows[0][1] if rows else [])!r}")
    pairs = []
    for number, fields in rows[1:]:
        if len(fields) != 2:
            raise DataFormatError(path, number, f"expected 2 comma-separated fields, found {len(fields)}")
        if not (fields[0].strip() and fields[1].strip()):
            raise DataFormatError(path, number, "the mr or the ref is empty")
        pairs.append((fields[0].strip(), fields[1].strip()))
    if split == "train":
        return _finish({"mr": [m for m, _ in pairs], "ref": [r for _, r in pairs]}, n, seed)
    refs: dict[str, list[str]] = {}  # dicts keep insertion order: MRs stay in file order
    for mr, ref in pairs:
        refs.setdefault(mr, []).append(ref)
    return _finish({"mr": list(refs), "refs": list(refs.values())}, n, seed)


def load_gsm8k(split: str = "train", n: int | None = None, seed: int = 0) -> Dataset:
    """GSM8K math word problems: ``question``, ``answer`` (the worked solution, with its
    ``<<calculator>>`` notes and the closing ``#### N``), and ``final``: N as a string, thousands
    commas removed ("2,125" -> "2125") so it compares with a number parsed from a model's answer."""
    path = _path("gsm8k", split, {"train": "train.jsonl", "test": "test.jsonl"})
    columns: dict[str, list] = {"question": [], "answer": [], "final": []}
    for number, row in _json_lines(path):
        if not (isinstance(row, dict) and isinstance(row.get("question"), str) and isinstance(row.get("answer"), str)):
            raise DataFormatError(path, number, "expected an object with string fields 'question' and 'answer'")
        if "####" not in row["answer"]:
            raise DataFormatError(path, number, "the answer has no '####' before its final answer")
        final = row["answer"].rsplit("####", 1)[1].strip().replace(",", "")
        if not final:
            raise DataFormatError(path, number, "nothing follows '####' in the answer")
        columns["question"].append(row["question"])
        columns["answer"].append(row["answer"])
        columns["final"].append(final)
    return _finish(columns, n, seed)


def load_rte(split: str = "train", n: int | None = None, seed: int = 0) -> Dataset:
    """RTE textual entailment (SuperGLUE's copy): ``premise``, ``hypothesis``, ``label`` (0 =
    entailment, 1 = not entailment). validation = the 277 labelled SuperGLUE val pairs."""
    path = _path("rte", split, {"train": "train.jsonl", "validation": "val.jsonl"})
    names = ["entailment", "not_entailment"]
    columns: dict[str, list] = {"premise": [], "hypothesis": [], "label": []}
    for number, row in _json_lines(path):
        if not (isinstance(row, dict) and all(isinstance(row.get(k), str) and row[k].strip() for k in ("premise", "hypothesis"))):
            raise DataFormatError(path, number, "expected an object with non-empty string fields 'premise' and 'hypothesis'")
        if row.get("label") not in names:
            raise DataFormatError(path, number, f"label must be one of {names}, found {row.get('label')!r}")
        columns["premise"].append(row["premise"].strip())
        columns["hypothesis"].append(row["hypothesis"].strip())
        columns["label"].append(names.index(row["label"]))
    return _finish(columns, n, seed)


def load_mrpc(split: str = "train", n: int | None = None, seed: int = 0) -> Dataset:
    """MRPC paraphrase pairs: ``sentence1``, ``sentence2``, ``label`` (1 = paraphrase). validation = GLUE
    dev (408 pairs). Microsoft Research Shared Source License: non-commercial (data/README.md)."""
    path = _path("mrpc", split, {"train": "train.tsv", "validation": "dev.tsv"})
    columns: dict[str, list] = {"sentence1": [], "sentence2": [], "label": []}
    for number, (quality, _, _, a, b) in _tsv(path, ["\ufeffQuality", "#1 ID", "#2 ID", "#1 String", "#2 String"]):
        if quality not in ("0", "1") or not a.strip() or not b.strip():
            raise DataFormatError(path, number, "expected Quality 0 or 1 and two non-empty sentences")
        columns["sentence1"].append(a.strip())
        columns["sentence2"].append(b.strip())
        columns["label"].append(int(quality))
    return _finish(columns, n, seed)


def load_arc_easy(split: str = "train", n: int | None = None, seed: int = 0) -> Dataset:
    """ARC-Easy science questions with four choices: ``question``, ``choices`` (the four texts, for the
    letters A-D), ``label`` (0-3, the right one). train: 2,140 questions, test: 2,268 (data/README.md:
    the rows with exactly the choices A-D)."""
    path = _path("arc_easy", split, {"train": "train.jsonl", "test": "test.jsonl"})
    columns: dict[str, list] = {"question": [], "choices": [], "label": []}
    for number, row in _json_lines(path):
        q = row.get("question") if isinstance(row, dict) else None
        choices = q.get("choices") if isinstance(q, dict) else None
        if not (isinstance(q, dict) and isinstance(q.get("stem"), str) and q["stem"].strip() and isinstance(choices, list)
                and all(isinstance(c, dict) and isinstance(c.get("text"), str) for c in choices)):
            raise DataFormatError(path, number, "expected an object with 'question': {'stem': str, 'choices': [{'text', 'label'}]}")
        if [c.get("label") for c in choices] != ARC_WORDS or row.get("answerKey") not in ARC_WORDS:
            raise DataFormatError(path, number, f"expected the choices {ARC_WORDS} and an answerKey among them")
        columns["question"].append(q["stem"].strip())
        columns["choices"].append([c["text"].strip() for c in choices])
        columns["label"].append(ARC_WORDS.index(row["answerKey"]))
    return _finish(columns, n, seed)


def load_text(name: str = "tinyshakespeare") -> str:
    """A plain text for perplexity: "tinyshakespeare" (its first 200,000 characters)."""
    return _path(name, name, {"tinyshakespeare": "input.txt"}).read_text(encoding="utf-8")


# ----------------------------------------------------------------------------- 2. formatting

def _messages(prompt: str, system: str | None) -> list[dict]:
    # With no system message, SmolLM2's template inserts its own ("You are a helpful AI assistant...").
    return ([{"role": "system", "content": system}] if system is not None else []) + [{"role": "user", "content": prompt}]


def chat_prompt(tokenizer, prompt: str, system: str | None = None) -> str:
    """The templated prompt, ending with the assistant header: the text to generate from."""
    return tokenizer.apply_chat_template(_messages(prompt, system), tokenize=False, add_generation_prompt=True)


def format_chat(tokenizer, prompt: str, response: str, system: str | None = None, max_length: int = 256) -> dict:
    """One training example: ``input_ids``, ``attention_mask``, and ``labels`` that are -100 on the
    prompt (system + user turn + assistant header) and equal to ``input_ids`` on the response.

    The response ends with the template's end-of-turn token (``<|im_end|>`` for SmolLM2) so the
    model learns to stop. A long example is cut from the right, inside the response (it then loses
    its end token); a prompt that alone fills ``max_length`` raises ValueError, since cutting the
    prompt would silently train on a question the model never fully saw.
    """
    messages = _messages(prompt, system)
    prompt_text = chat_prompt(tokenizer, prompt, system)
    full_text = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": response}], tokenize=False)
    # The template closes the reply with "<|im_end|>\n": drop the newline so the end-of-turn token is the last label.
    full_text = full_text.rstrip()
    # The template text already holds any special tokens, so the tokenizer must add none.
    prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    input_ids = tokenizer(full_text, add_special_tokens=False)["input_ids"]
    if input_ids[:len(prompt_ids)] != prompt_ids:
        raise ValueError("the tokenized prompt is not a prefix of the tokenized conversation (a token merges across "
                         f"the prompt/response boundary), so the loss mask would be wrong. Response: {response[:60]!r}")
    if len(prompt_ids) >= max_length:
        raise ValueError(f"the prompt alone is {len(prompt_ids)} tokens, which leaves no room for the response "
                         f"within max_length={max_length}: raise max_length or shorten the prompt")
    input_ids = input_ids[:max_length]
    labels = [IGNORE_INDEX] * len(prompt_ids) + input_ids[len(prompt_ids):]
    return {"input_ids": input_ids, "attention_mask": [1] * len(input_ids), "labels": labels}


# Task formatters: a dataset row -> (prompt, response). Prompts are short, since SmolLM2 is small.

def e2e_example(row: dict) -> tuple[str, str]:
    """("Describe this restaurant in one sentence: name[...], ...", a reference). On a test row
    (``refs``), the response is its first reference; generation only needs the prompt."""
    ref = row["ref"] if "ref" in row else row["refs"][0]
    return f"Describe this restaurant in one sentence: {row['mr']}", ref


def gsm8k_example(row: dict) -> tuple[str, str]:
    """(the question, the full worked solution ending in "#### N"). These are long: with SmolLM2's
    default system prompt the median example is ~200 tokens and 99% fit in ~415, so use max_length=512."""
    return row["question"], row["answer"]


def sst2_generation_example(row: dict) -> tuple[str, str]:
    """("Review: ...\\nIs this review positive or negative?", "positive" or "negative")."""
    return f"Review: {row['text']}\nIs this review positive or negative?", SST2_WORDS[row["label"]]


def agnews_generation_example(row: dict) -> tuple[str, str]:
    """("Article: ...\nIs this news about World, Sports, Business or Science?", one of ``AGNEWS_WORDS``)."""
    return (f"Article: {row['text']}\nIs this news about World, Sports, Business or Science?",
            AGNEWS_WORDS[row["label"]])


def rte_example(row: dict) -> tuple[str, str]:
    """("{premise}\nQuestion: Does this mean that "{hypothesis}" is true? Yes or no?", "yes" or "no"),
    a T0-style yes/no prompt, answered in lower case ("yes" and "no" are one SmolLM2 token each)."""
    return (f"{row['premise']}\nQuestion: Does this mean that \"{row['hypothesis']}\" is true? Yes or no?",
            RTE_WORDS[row["label"]])


def arc_example(row: dict) -> tuple[str, str]:
    """(the question, the text of its right choice): the form in which a language model is scored on
    ARC by the likelihood of each choice after the question (``tasks.choice_correct``)."""
    return row["question"], row["choices"][row["label"]]


def tokenize_causal(dataset: Dataset, tokenizer, example_fn: Callable[[dict], tuple[str, str]],
                    max_length: int = 256, system: str | None = None) -> Dataset:
    """Each row -> ``format_chat(tokenizer, *example_fn(row))``; the original columns are dropped."""
    def encode(row):
        prompt, response = example_fn(row)
        return format_chat(tokenizer, prompt, response, system=system, max_length=max_length)
    return dataset.map(encode, remove_columns=dataset.column_names)


def tokenize_classification(dataset: Dataset, tokenizer, max_length: int = 128,
                            text: str | tuple[str, str] = "text") -> Dataset:
    """``text``/``label`` rows -> ``input_ids``, ``attention_mask`` (+ ``token_type_ids`` for BERT), ``labels``.

    ``text`` names the column, or two columns for a sentence pair (RTE: ``("premise", "hypothesis")``),
    encoded as the tokenizer joins pairs ([CLS] a [SEP] b [SEP] for BERT), the longer one truncated first."""
    columns = (text,) if isinstance(text, str) else tuple(text)
    missing = [c for c in columns if c not in dataset.column_names]
    if missing or len(columns) not in (1, 2):
        raise ValueError(f"text must name one or two of the dataset's columns {dataset.column_names}, got {text!r}")

    def encode(batch):
        encoded = dict(tokenizer(*(batch[c] for c in columns), truncation=True, max_length=max_length))
        return {**encoded, "labels": batch["label"]}
    return dataset.map(encode, batched=True, remove_columns=dataset.column_names)


# ----------------------------------------------------------------------------- 3. batching

class Collator:
    """A list of examples -> a dict of tensors. Sequences are right-padded to the longest one:
    ``input_ids`` with ``pad_token_id``, ``labels`` with -100 (no loss), anything else (the
    attention mask, token types) with 0. Scalars, like a classification label, are stacked."""

    def __init__(self, pad_token_id: int, label_pad: int = IGNORE_INDEX):
        if pad_token_id is None:
            raise ValueError("pad_token_id is None: set tokenizer.pad_token first")
        self.pad = {"input_ids": pad_token_id, "labels": label_pad}

    def __call__(self, batch: list[dict]) -> dict[str, torch.Tensor]:
        out = {}
        for key in batch[0]:
            values = [torch.as_tensor(example[key]) for example in batch]
            if values[0].dim() == 0:
                out[key] = torch.stack(values)
            else:
                out[key] = torch.nn.utils.rnn.pad_sequence(values, batch_first=True, padding_value=self.pad.get(key, 0))
        return out


class MultiTaskBatches:
    """Endless batches from several tasks, one task per batch, each batch carrying ``task`` (its name):
    HyperFormer's sampler (rabeehk/hyperformer ``data/multitask_sampler.py``). Task i is drawn with
    probability p_i proportional to (n_i / N)^(1/T), T the temperature (the official 10: near uniform;
    T = 1: proportional to size), and its examples with replacement. Deterministic under ``seed``."""

    def __init__(self, datasets: dict, batch_size: int, temperature: float = 10.0, seed: int = 0, *,
                 pad_token_id: int):
        if not datasets or any(len(ds) == 0 for ds in datasets.values()):
            raise ValueError("MultiTaskBatches needs at least one task, and examples in every task")
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature!r}")
        self.datasets, self.batch_size, self.seed = datasets, batch_size, seed
        sizes = torch.tensor([len(ds) for ds in datasets.values()], dtype=torch.float64)
        self.probabilities = (sizes / sizes.sum()) ** (1 / temperature)
        self.probabilities /= self.probabilities.sum()
        self.collate = Collator(pad_token_id)

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed)
        names = list(self.datasets)
        while True:
            task = names[torch.multinomial(self.probabilities, 1, generator=g).item()]
            ds = self.datasets[task]
            rows = torch.randint(len(ds), (self.batch_size,), generator=g).tolist()
            yield {**self.collate([ds[i] for i in rows]), "task": task}


def make_loader(dataset, batch_size: int, shuffle: bool = False, seed: int = 0, *, pad_token_id: int) -> DataLoader:
    """A DataLoader that pads with ``Collator``; with ``shuffle``, the order depends only on ``seed``."""
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, collate_fn=Collator(pad_token_id),
                      generator=torch.Generator().manual_seed(seed))


def lm_chunks(text: str, tokenizer, block_size: int = 256, n_blocks: int | None = None) -> torch.Tensor:
    """Consecutive, non-overlapping blocks of ``text``'s tokens, shape (n_blocks, block_size): all the
    whole blocks by default. The leftover tail shorter than a block is dropped."""
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    available = len(ids) // block_size
    n_blocks = available if n_blocks is None else n_blocks
    if not 0 < n_blocks <= available:
        raise ValueError(f"the text has {len(ids)} tokens: {available} whole blocks of {block_size}, "
                         f"but {n_blocks} were asked for")
    return torch.tensor(ids[:n_blocks * block_size]).view(n_blocks, block_size)
