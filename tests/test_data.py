"""The data loaders, their error messages, chat formatting with loss masking, and batching."""
import hashlib
import re

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoTokenizer

from peft_from_scratch import data
from peft_from_scratch.data import DataFormatError
from peft_from_scratch.models import ModelNotAvailable, local_path, tiny_llama


def _tokenizer(name):
    try:
        return AutoTokenizer.from_pretrained(local_path(name))
    except ModelNotAvailable as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def smol():
    return _tokenizer("smollm2-135m-instruct")


@pytest.fixture(scope="module")
def minilm():
    return _tokenizer("all-minilm-l6-v2")


# ----------------------------------------------------------------------------- the shipped files

@pytest.mark.parametrize("load, split, rows, columns", [
    (data.load_sst2, "train", 8000, {"text": "string", "label": "int64"}),
    (data.load_sst2, "validation", 872, {"text": "string", "label": "int64"}),
    (data.load_agnews, "train", 4000, {"text": "string", "label": "int64"}),
    (data.load_agnews, "test", 1000, {"text": "string", "label": "int64"}),
    (data.load_e2e, "train", 4672, {"mr": "string", "ref": "string"}),
    (data.load_e2e, "test", 630, {"mr": "string", "refs": None}),
    (data.load_gsm8k, "train", 2000, {"question": "string", "answer": "string", "final": "string"}),
    (data.load_gsm8k, "test", 1319, {"question": "string", "answer": "string", "final": "string"}),
    (data.load_rte, "train", 600, {"premise": "string", "hypothesis": "string", "label": "int64"}),
    (data.load_rte, "validation", 277, {"premise": "string", "hypothesis": "string", "label": "int64"}),
    (data.load_mrpc, "train", 600, {"sentence1": "string", "sentence2": "string", "label": "int64"}),
    (data.load_mrpc, "validation", 408, {"sentence1": "string", "sentence2": "string", "label": "int64"}),
    (data.load_arc_easy, "train", 2140, {"question": "string", "choices": None, "label": "int64"}),
    (data.load_arc_easy, "test", 2268, {"question": "string", "choices": None, "label": "int64"}),
])
def test_loaders_return_the_documented_columns_and_sizes(load, split, rows, columns):
    ds = load(split)
    assert len(ds) == rows and list(ds.column_names) == list(columns)
    for name, dtype in columns.items():
        if dtype:
            assert ds.features[name].dtype == dtype
    assert all(isinstance(v, str) and v and v == v.strip() for v in ds[ds.column_names[0]])


def test_label_values_and_balance():
    assert set(data.load_sst2("validation")["label"]) == {0, 1}
    for split, per_class in [("train", 1000), ("test", 250)]:  # stratified by make_subsets.py
        labels = data.load_agnews(split)["label"]
        assert [labels.count(i) for i in range(4)] == [per_class] * 4
    assert data.AGNEWS_LABELS == ["World", "Sports", "Business", "Sci/Tech"]
    rte = data.load_rte("validation")["label"]
    assert (rte.count(0), rte.count(1)) == (146, 131)            # SuperGLUE val: 146 entailment, 131 not
    mrpc = data.load_mrpc("validation")["label"]
    assert (mrpc.count(1), mrpc.count(0)) == (279, 129)           # GLUE dev: 279 paraphrases, 129 not
    arc = data.load_arc_easy("test")
    assert set(arc["label"]) == {0, 1, 2, 3} and all(len(c) == 4 and all(c) for c in arc["choices"])
    assert data.arc_example(arc[0]) == (arc[0]["question"], arc[0]["choices"][arc[0]["label"]])


def test_e2e_test_groups_every_reference_under_its_mr():
    test = data.load_e2e("test")
    assert len(set(test["mr"])) == 630 and sum(len(r) for r in test["refs"]) == 4693
    assert min(len(r) for r in test["refs"]) >= 1 and all(isinstance(r, str) for r in test[0]["refs"])


def test_gsm8k_final_is_the_number_after_the_marker():
    test = data.load_gsm8k("test")
    assert test[0]["final"] == "18" and test[0]["answer"].endswith("#### 18")
    assert all(re.fullmatch(r"-?\d+(\.\d+)?", f) for f in test["final"])  # "2,125" became "2125"


def test_text_is_the_documented_prefix():
    text = data.load_text("tinyshakespeare")
    assert len(text) == 200_000 and text.startswith("First Citizen:")
    with pytest.raises(ValueError, match="tinyshakespeare"):
        data.load_text("wikitext")


def test_files_match_the_sha256_in_the_readme():
    readme = (data.DATA_DIR / "README.md").read_text()
    sums = re.findall(r"\| `([\w/. ]+)` \|[^|]+\|[^|]+\| `([0-9a-f]{64})` \|", readme)
    assert len(sums) == 16                                       # MRPC: train, dev and its license; ARC-Easy: 2
    for rel, digest in sums:
        assert hashlib.sha256((data.DATA_DIR / rel).read_bytes()).hexdigest() == digest, rel


def test_n_is_a_seeded_deterministic_sample():
    a, b, c = data.load_sst2(n=50, seed=0), data.load_sst2(n=50, seed=0), data.load_sst2(n=50, seed=1)
    assert len(a) == 50 and a["text"] == b["text"] and a["text"] != c["text"]
    full = dict(zip(data.load_sst2()["text"], data.load_sst2()["label"]))
    assert all(full[t] == lab for t, lab in zip(a["text"], a["label"]))  # rows stay intact
    assert data.load_e2e("test", n=5)["mr"] == data.load_e2e("test", n=5)["mr"]
    with pytest.raises(ValueError, match="n must be between 1 and 872"):
        data.load_sst2("validation", n=10_000)
    with pytest.raises(ValueError, match=r"split must be one of \['train', 'validation'\]"):
        data.load_sst2("test")


# ----------------------------------------------------------------------------- malformed and missing files

BAD_FILES = [  # (file, content, loader, split, bad line, message)
    ("sst2/train.tsv", "sentence\tlabel\ngood movie \t1\nno label here\n", data.load_sst2, "train", 3,
     "expected 2 tab-separated fields, found 1"),
    ("sst2/train.tsv", "sentence\tlabel\ngood\t1\nbad\tpositive\n", data.load_sst2, "train", 3,
     "unknown label 'positive'; expected one of ['0', '1']"),
    ("sst2/validation.tsv", "text\tlabel\ngood\t1\n", data.load_sst2, "validation", 1, "expected the header"),
    ("sst2/train.tsv", "sentence\tlabel\ngood\t1\n\nbad\t0\n", data.load_sst2, "train", 3, "found 1"),
    ("agnews/test.tsv", "text\tlabel\nStocks fell.\tBusiness\nA vote.\tPolitics\n", data.load_agnews, "test", 3,
     "unknown label 'Politics'"),
    ("agnews/train.tsv", "text\tlabel\nA\tB\tWorld\n", data.load_agnews, "train", 2, "found 3"),
    ("gsm8k/train.jsonl", '{"question": "1+1?", "answer": "2\\n#### 2"}\n{"question": "2+2?", "answer": \n',
     data.load_gsm8k, "train", 2, "invalid JSON"),
    ("gsm8k/test.jsonl", '{"question": "1+1?", "answer": "it is 2"}\n', data.load_gsm8k, "test", 1,
     "no '####'"),
    ("gsm8k/test.jsonl", '{"question": "1+1?"}\n', data.load_gsm8k, "test", 1, "'question' and 'answer'"),
    ("e2e/devset.csv", 'mr,ref\r\n"name[A]",A is nice.\r\n"name[B]",B,is nice\r\n', data.load_e2e, "train", 3,
     "expected 2 comma-separated fields, found 3"),
    ("e2e/testset_w_refs.csv", '"mr","text"\n"name[A]","A."\n', data.load_e2e, "test", 1, "expected the header"),
    ("rte/val.jsonl", '{"premise": "A.", "hypothesis": "B.", "label": "entailment"}\n{"premise": "C.", "hypothesis": "D.", '
     '"label": "contradiction"}\n', data.load_rte, "validation", 2, "label must be one of ['entailment', 'not_entailment']"),
    ("rte/train.jsonl", '{"premise": "", "hypothesis": "B.", "label": "entailment"}\n', data.load_rte, "train", 1,
     "non-empty string fields 'premise' and 'hypothesis'"),
    ("mrpc/dev.tsv", "\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n2\t1\t2\tA.\tB.\n", data.load_mrpc,
     "validation", 2, "expected Quality 0 or 1"),
    ("mrpc/train.tsv", "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\n", data.load_mrpc, "train", 1,
     "expected the header"),
    ("arc_easy/test.jsonl", '{"question": {"stem": "Q?", "choices": [{"text": "a", "label": "A"}, {"text": "b", "label": "B"}, '
     '{"text": "c", "label": "C"}, {"text": "d", "label": "D"}]}, "answerKey": "E"}\n', data.load_arc_easy, "test", 1,
     "an answerKey among them"),
    ("arc_easy/train.jsonl", '{"question": "Q?", "answerKey": "A"}\n', data.load_arc_easy, "train", 1, "'stem': str"),
]


@pytest.mark.parametrize("rel, content, load, split, line, message", BAD_FILES)
def test_a_malformed_row_names_the_file_and_the_line(tmp_path, monkeypatch, rel, content, load, split, line, message):
    path = tmp_path / rel
    path.parent.mkdir(parents=True)
    path.write_bytes(content.encode())
    monkeypatch.setenv("PFS_DATA", str(tmp_path))
    with pytest.raises(DataFormatError, match=re.escape(message)) as info:
        load(split)
    assert isinstance(info.value, ValueError) and info.value.line == line and info.value.path == path
    assert str(info.value).startswith(f"{path}, line {line}: ")


def test_a_missing_file_says_how_to_make_it(tmp_path, monkeypatch):
    monkeypatch.setenv("PFS_DATA", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=re.escape("python data/make_subsets.py ../shared/data")) as info:
        data.load_gsm8k("test")
    assert str(tmp_path / "gsm8k" / "test.jsonl") in str(info.value)


# ----------------------------------------------------------------------------- chat formatting

def test_labels_mask_exactly_the_prompt(smol):
    prompt, response = data.e2e_example(data.load_e2e()[0])
    ex = data.format_chat(smol, prompt, response)
    prompt_ids = smol(data.chat_prompt(smol, prompt), add_special_tokens=False)["input_ids"]
    k = len(prompt_ids)
    assert ex["input_ids"][:k] == prompt_ids                   # the prompt is a prefix
    assert ex["labels"][:k] == [-100] * k                      # masked on every prompt token...
    assert ex["labels"][k:] == ex["input_ids"][k:]             # ...and on nothing else
    assert ex["attention_mask"] == [1] * len(ex["input_ids"])
    assert smol.decode(ex["labels"][k:]) == response + "<|im_end|>"  # learns the answer, then to stop
    assert data.chat_prompt(smol, prompt).endswith("<|im_start|>assistant\n")


def test_system_message_replaces_the_default(smol):
    with_default = smol.decode(data.format_chat(smol, "Hi", "Hello.")["input_ids"])
    custom = smol.decode(data.format_chat(smol, "Hi", "Hello.", system="Be brief.")["input_ids"])
    assert "named SmolLM" in with_default
    assert custom.startswith("<|im_start|>system\nBe brief.<|im_end|>") and "SmolLM" not in custom


def test_truncation_cuts_the_response_and_refuses_a_long_prompt(smol):
    full = data.format_chat(smol, "Count.", " ".join(["one"] * 200))
    short = data.format_chat(smol, "Count.", " ".join(["one"] * 200), max_length=40)
    assert len(short["input_ids"]) == 40 and short["input_ids"] == full["input_ids"][:40]
    assert short["labels"] == full["labels"][:40] and short["labels"][-1] != -100
    with pytest.raises(ValueError, match="the prompt alone is .* tokens"):
        data.format_chat(smol, " ".join(["word"] * 100), "ok", max_length=50)


def test_task_formatters():
    assert data.sst2_generation_example({"text": "a gem", "label": 1}) == (
        "Review: a gem\nIs this review positive or negative?", "positive")
    assert data.sst2_generation_example({"text": "dull", "label": 0})[1] == "negative"
    prompt, ref = data.e2e_example(data.load_e2e("test")[0])
    assert prompt == "Describe this restaurant in one sentence: name[Blue Spice], eatType[coffee shop], area[city centre]"
    assert ref == data.load_e2e("test")[0]["refs"][0]
    row = data.load_gsm8k("test")[0]
    assert data.gsm8k_example(row) == (row["question"], row["answer"])


def test_tokenize_causal_maps_every_row(smol):
    ds = data.tokenize_causal(data.load_sst2("validation", n=8), smol, data.sst2_generation_example)
    assert ds.column_names == ["input_ids", "attention_mask", "labels"] and len(ds) == 8
    for ex in ds:
        answer = smol.decode([t for t in ex["labels"] if t != -100])
        assert answer in ("positive<|im_end|>", "negative<|im_end|>")


def test_tokenize_classification(minilm):
    ds = data.tokenize_classification(data.load_agnews("test", n=6), minilm, max_length=16)
    assert ds.column_names == ["input_ids", "token_type_ids", "attention_mask", "labels"]
    assert all(len(ids) <= 16 and ids[0] == minilm.cls_token_id and ids[-1] == minilm.sep_token_id
               for ids in ds["input_ids"])
    assert ds["labels"] == data.load_agnews("test", n=6)["label"]
    batch = next(iter(data.make_loader(ds, 6, pad_token_id=minilm.pad_token_id)))
    assert batch["labels"].shape == (6,) and batch["input_ids"].shape == batch["token_type_ids"].shape


def test_tokenize_classification_of_sentence_pairs(minilm):
    rows = data.load_rte("validation", n=4)
    ds = data.tokenize_classification(rows, minilm, max_length=32, text=("premise", "hypothesis"))
    for ids, types, row in zip(ds["input_ids"], ds["token_type_ids"], rows):
        assert len(ids) <= 32 and ids.count(minilm.sep_token_id) == 2        # [CLS] a [SEP] b [SEP]
        second = minilm.decode([t for t, k in zip(ids, types) if k == 1], skip_special_tokens=True)
        assert second == minilm.decode(minilm(row["hypothesis"], add_special_tokens=False)["input_ids"])
    assert ds["labels"] == rows["label"]
    with pytest.raises(ValueError, match="one or two of the dataset's columns"):
        data.tokenize_classification(rows, minilm, text=("premise", "question"))


# ----------------------------------------------------------------------------- batching

def test_collator_right_pads_each_field_with_its_own_value():
    batch = data.Collator(pad_token_id=7)([
        {"input_ids": [1, 2, 3], "attention_mask": [1, 1, 1], "labels": [-100, 2, 3]},
        {"input_ids": [4], "attention_mask": [1], "labels": [4]},
    ])
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 7, 7]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 2, 3], [4, -100, -100]]
    assert all(v.dtype == torch.int64 for v in batch.values())
    scalars = data.Collator(0)([{"input_ids": [5], "labels": 1}, {"input_ids": [5, 6], "labels": 0}])
    assert scalars["labels"].tolist() == [1, 0] and scalars["input_ids"].tolist() == [[5, 0], [5, 6]]


def test_make_loader_order_depends_only_on_the_seed():
    ds = [{"input_ids": [i], "labels": i} for i in range(20)]

    def order(seed, shuffle=True):
        return torch.cat([b["labels"] for b in data.make_loader(ds, 4, shuffle, seed, pad_token_id=0)]).tolist()
    assert order(0) == order(0) and order(0) != order(1) and sorted(order(0)) == list(range(20))
    assert order(0, shuffle=False) == list(range(20))


def test_right_padding_leaves_real_tokens_unchanged():
    model = tiny_llama()
    g = torch.Generator().manual_seed(0)
    examples = [torch.randint(1, 128, (n,), generator=g).tolist() for n in (9, 4, 6)]
    batch = data.Collator(pad_token_id=0)([{"input_ids": e, "attention_mask": [1] * len(e), "labels": e}
                                           for e in examples])
    with torch.no_grad():
        padded = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        for i, ids in enumerate(examples):
            alone = model(input_ids=torch.tensor([ids])).logits[0]
            torch.testing.assert_close(padded[i, :len(ids)], alone, atol=1e-5, rtol=1e-5)
            # ...so the per-example loss is the same: the padded labels (-100) add nothing.
            loss_padded = F.cross_entropy(padded[i, :-1], batch["labels"][i, 1:], ignore_index=-100)
            loss_alone = F.cross_entropy(alone[:-1], torch.tensor(ids[1:]))
            torch.testing.assert_close(loss_padded, loss_alone, atol=1e-5, rtol=1e-5)


def test_lm_chunks_are_consecutive_blocks(smol):
    text = data.load_text()[:5000]
    blocks = data.lm_chunks(text, smol, block_size=64)
    ids = smol(text, add_special_tokens=False)["input_ids"]
    assert blocks.shape == (len(ids) // 64, 64) and blocks.dtype == torch.int64
    assert blocks.flatten().tolist() == ids[:blocks.numel()]
    assert data.lm_chunks(text, smol, block_size=64, n_blocks=3).equal(blocks[:3])
    with pytest.raises(ValueError, match="whole blocks"):
        data.lm_chunks(text, smol, block_size=64, n_blocks=10_000)


def test_rte_prompt_asks_yes_or_no_and_answers_with_one_token(smol):
    row = data.load_rte("validation")[0]
    prompt, answer = data.rte_example(row)
    assert prompt.startswith(row["premise"]) and row["hypothesis"] in prompt and prompt.endswith("Yes or no?")
    assert answer == data.RTE_WORDS[row["label"]]
    assert all(len(smol(w, add_special_tokens=False)["input_ids"]) == 1 for w in data.RTE_WORDS)
