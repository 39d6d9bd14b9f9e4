"""The two tasks most notebooks train on, sized per profile, and the full fine-tuning baseline on each.

* ``SST2``: all-MiniLM-L6-v2 as a sentence classifier on SST-2; accuracy on the 872 GLUE validation
  sentences (fewer in smoke runs).
* ``E2E``: SmolLM2-135M-Instruct on E2E NLG (meaning representation -> restaurant description);
  multi-reference BLEU on the official test MRs, and held-out loss.

Two more pose a classification task to SmolLM2 as one answer word: ``LabelWords`` (prompt tuning's
setting, notebook 08) and ``FewShot`` (T-Few's protocol, notebook 15: k examples, fixed settings,
no selection split, in-context learning as the baseline).

A task fixes the data, the number of optimizer steps and the batch, so that every method a notebook
compares (and the baseline) trains on the same examples for the same steps. The learning rate is
picked for each method the same way: a small sweep, scored on a *selection* split that is disjoint
from the training examples and from the test set (``pick_lr``); the test numbers are then those of
the picked learning rate.

``full_finetuning(task, run)`` is that sweep for full fine-tuning. Its result is cached in the run's
results folder under a key of its whole configuration and of the library's source, so within one
run of the suite (and for the committed run) notebook 01 computes it and the later notebooks read
the same numbers; a notebook run on its own, or in another profile, computes its own.

Per-example scores (correct or not, per-MR hypotheses) are kept, so that differences between
methods get paired bootstrap intervals (``verdicts.py``).
"""
from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, ClassVar

import numpy as np
import torch
from torch import nn

from . import data, evaluate, models
from .core import count_parameters
from .training import History, TrainConfig, evaluate_loss, train
from .training.multiple_choice import TFewObjective, choice_logprobs, multiple_choice_batch
from .training.memory import LiveTensors  # noqa: F401 (notebook 05 names it tasks.LiveTensors)
from .verdicts import Interval, bootstrap

# The learning-rate grids each profile sweeps (smoke: one value, only to run the code path).
SWEEPS = {"smoke": {"full": (5e-5,), "adapter": (1e-3,)},
          "cpu": {"full": (2e-5, 1e-4), "adapter": (3e-4, 1e-3, 3e-3)},
          "gpu": {"full": (1e-5, 3e-5, 1e-4), "adapter": (1e-4, 3e-4, 1e-3, 3e-3)}}


def cached(results_dir: str | Path, name: str, spec: dict, compute: Callable[[], dict]) -> dict:
    """``compute()`` once per configuration: read from / written to ``results_dir/baselines``.

    The key covers ``spec`` and the library's source (``notebook.inputs_hash`` without a notebook),
    so a change of either recomputes; the file records the spec it was computed for.
    """
    from .notebook import inputs_hash
    key = hashlib.sha256((json.dumps(spec, sort_keys=True) + inputs_hash("")).encode()).hexdigest()[:12]
    path = Path(results_dir) / "baselines" / f"{name}-{key}.json"
    if path.exists():
        return {**json.loads(path.read_text())["result"], "cached_from": path.name}
    result = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"spec": spec, "result": result}, indent=1) + "\n")
    return {**result, "cached_from": None}


def pick_lr(fit_and_score: Callable[[float], tuple[float, object]], lrs, higher_is_better: bool = True):
    """Run ``fit_and_score(lr) -> (selection score, payload)`` for each lr; return (best lr, payload, {lr: score})."""
    scores, payloads = {}, {}
    for lr in lrs:
        scores[lr], payloads[lr] = fit_and_score(lr)
    best = (max if higher_is_better else min)(scores, key=scores.get)
    return best, payloads[best], scores


# ----------------------------------------------------------------------------- SST-2 with MiniLM

@dataclass
class SST2:
    n_train: int
    n_select: int
    n_val: int
    steps: int
    batch: int = 32
    max_length: int = 64
    seed: int = 0
    profile: str = "cpu"
    prefix: str = ""      # put before the (first) text, e.g. "rte: ": the task's name, for multi-task training

    PROFILES = {"smoke": dict(n_train=32, n_select=16, n_val=32, steps=2, batch=16),
                "cpu": dict(n_train=2000, n_select=256, n_val=872, steps=40, batch=16),   # 01 trains 7 of these in 10 min
                "gpu": dict(n_train=16000, n_select=1000, n_val=872, steps=1500)}

    @classmethod
    def for_run(cls, run, **overrides) -> "SST2":
        return cls(**{**cls.PROFILES[run.profile], "seed": run.seed, "profile": run.profile, **overrides})

    text: ClassVar = "text"                       # the column(s) tokenize_classification reads
    load: ClassVar = staticmethod(data.load_sst2)

    def __post_init__(self):
        self.model, self.tokenizer = None, None

    def base(self) -> nn.Module:
        """A fresh MiniLM classifier; the new head is drawn under the task's seed, so it is the same every time."""
        if self.model is None:
            with torch.random.fork_rng():
                torch.manual_seed(self.seed)
                self.model, self.tokenizer = models.load_model(models.MINILM, num_labels=2)
            rows = self.load("train", n=self.n_train + self.n_select, seed=self.seed)
            first = self.text if isinstance(self.text, str) else self.text[0]

            def tok(ds):
                if self.prefix:
                    ds = ds.map(lambda r: {first: self.prefix + r[first]})
                return data.tokenize_classification(ds, self.tokenizer, max_length=self.max_length, text=self.text)
            if len(rows) < self.n_train + self.n_select:
                raise ValueError(f"{type(self).__name__}: {len(rows)} training rows, fewer than n_train + n_select = "
                                 f"{self.n_train + self.n_select}")
            self.train_set = tok(rows.select(range(self.n_train)))
            self.select_set = tok(rows.select(range(self.n_train, self.n_train + self.n_select)))
            self.val_rows = self.load("validation", n=self.n_val, seed=self.seed)
            self.val_set = tok(self.val_rows)
        return copy.deepcopy(self.model)

    def loader(self, dataset, shuffle: bool = False):
        return data.make_loader(dataset, self.batch if shuffle else 64, shuffle=shuffle, seed=self.seed,
                                pad_token_id=self.tokenizer.pad_token_id)

    def fit(self, model: nn.Module, lr: float, desc: str | None = None, **kw) -> History:
        self.base()
        return train(model, self.loader(self.train_set, shuffle=True),
                     TrainConfig(lr=lr, max_steps=self.steps, seed=self.seed), desc=desc, **kw)

    @torch.no_grad()
    def correct(self, model: nn.Module, split: str = "val") -> list[int]:
        """1/0 per sentence of the validation (or selection) split."""
        was = model.training
        model.eval()
        out = []
        for batch in self.loader(self.val_set if split == "val" else self.select_set):
            labels = batch.pop("labels")
            out += (model(**batch).logits.argmax(-1) == labels).int().tolist()
        model.train(was)
        return out

    def majority(self) -> float:
        labels = list(self.val_rows["label"])
        return max(labels.count(0), labels.count(1)) / len(labels)


@dataclass
class RTE(SST2):
    """RTE entailment pairs (premise, hypothesis) with MiniLM, as SST2: our 600-pair training subset is
    split into train and selection, the 277 SuperGLUE validation pairs are the test. The median pair
    is 56 MiniLM tokens, 14% exceed 128; the cpu profile truncates at 64 (the premise loses its end),
    the gpu profile at 128."""
    max_length: int = 128

    PROFILES = {"smoke": dict(n_train=32, n_select=16, n_val=32, steps=2, batch=16, max_length=64),
                "cpu": dict(n_train=472, n_select=128, n_val=277, steps=40, batch=16, max_length=64),
                "gpu": dict(n_train=472, n_select=128, n_val=277, steps=600, max_length=128)}
    text: ClassVar = ("premise", "hypothesis")
    load: ClassVar = staticmethod(data.load_rte)


@dataclass
class MRPC(SST2):
    """MRPC paraphrase pairs (sentence1, sentence2) with MiniLM, as RTE: our 600-pair training subset split
    into train and selection, the 408 GLUE dev pairs as the test. Pairs are short (under 64 MiniLM
    tokens but for a few)."""
    PROFILES = {"smoke": dict(n_train=32, n_select=16, n_val=32, steps=2, batch=16, max_length=64),
                "cpu": dict(n_train=472, n_select=128, n_val=408, steps=40, batch=16, max_length=64),
                "gpu": dict(n_train=472, n_select=128, n_val=408, steps=600, max_length=128)}
    text: ClassVar = ("sentence1", "sentence2")
    load: ClassVar = staticmethod(data.load_mrpc)


def lrs(task, kind: str = "adapter") -> tuple[float, ...]:
    """The learning rates a ``kind`` ("full" or "adapter") of method sweeps on ``task``'s profile."""
    return SWEEPS[task.profile][kind]


def full_finetuning_sst2(task: SST2, results_dir, lrs_: tuple[float, ...] | None = None) -> dict:
    """Full fine-tuning of MiniLM on ``task`` (an ``SST2`` or ``RTE``) at each learning rate of the sweep,
    the best by selection accuracy."""
    lrs_ = lrs_ or lrs(task, "full")

    def compute():
        def fit(lr):
            model = task.base()
            task.fit(model, lr, desc=f"{type(task).__name__} full fine-tuning, lr {lr:g}")
            return sum(task.correct(model, "select")) / task.n_select, task.correct(model)
        best, correct, sweep = pick_lr(fit, lrs_)
        return {"lr": best, "select_accuracy": sweep, "correct": correct, "accuracy": sum(correct) / len(correct),
                "steps": task.steps, "trainable_params": count_parameters(task.base())[0]}
    return cached(results_dir, "full_ft_sst2", {**_spec(task), "lrs": list(lrs_)}, compute)


# ----------------------------------------------------------------------------- E2E NLG with SmolLM2

@dataclass
class E2E:
    n_train: int
    n_select: int
    n_test: int
    steps: int
    batch: int = 8
    new_tokens: int = 48
    max_length: int = 160
    seed: int = 0
    profile: str = "cpu"
    layers: int | None = None      # keep only the first layers of SmolLM2 (the smoke profile: the code path, fast)

    PROFILES = {"smoke": dict(n_train=4, n_select=2, n_test=2, steps=2, batch=2, new_tokens=8, max_length=128, layers=2),
                "cpu": dict(n_train=192, n_select=32, n_test=40, steps=8),      # 01: its sweep in 4 of its 10 min
                "gpu": dict(n_train=4000, n_select=300, n_test=630, steps=1000, batch=16, new_tokens=64)}

    @classmethod
    def for_run(cls, run, **overrides) -> "E2E":
        return cls(**{**cls.PROFILES[run.profile], "seed": run.seed, "profile": run.profile, **overrides})

    def __post_init__(self):
        self.model, self.tokenizer = None, None

    def base(self) -> nn.Module:
        if self.model is None:
            self.model, self.tokenizer = models.load_model(models.SMOLLM2)
            if self.layers:
                models.keep_layers(self.model, self.layers)
            rows = data.load_e2e("train", n=self.n_train + self.n_select, seed=self.seed)
            tok = lambda ds: data.tokenize_causal(ds, self.tokenizer, data.e2e_example, max_length=self.max_length)  # noqa: E731
            self.train_set = tok(rows.select(range(self.n_train)))
            self.select_set = tok(rows.select(range(self.n_train, self.n_train + self.n_select)))
            self.test_rows = data.load_e2e("test", n=self.n_test, seed=self.seed)
            self.test_set = tok(self.test_rows.map(lambda r: {"ref": r["refs"][0]}))
        return copy.deepcopy(self.model)

    def loader(self, dataset, shuffle: bool = False):
        return data.make_loader(dataset, self.batch if shuffle else 16, shuffle=shuffle, seed=self.seed,
                                pad_token_id=self.tokenizer.pad_token_id)

    def fit(self, model: nn.Module, lr: float, desc: str | None = None, curve: bool = False, **kw) -> History:
        """``curve=True`` also takes the test loss halfway and at the end (``History.eval``; the
        training time before each is in ``History.elapsed_s``): quality against wall time, see
        ``time_curve`` and ``loss_at_time``. The last checkpoint is ``test_loss`` of the trained model."""
        self.base()
        every = max(1, self.steps // 2) if curve else None
        if curve:
            kw["eval_fn"] = lambda m: {"test_loss": self.test_loss(m)}
        return train(model, self.loader(self.train_set, shuffle=True),
                     TrainConfig(lr=lr, max_steps=self.steps, seed=self.seed, eval_every=every), desc=desc, **kw)

    def select_loss(self, model: nn.Module) -> float:
        return evaluate_loss(model, self.loader(self.select_set))

    def test_loss(self, model: nn.Module) -> float:
        return evaluate_loss(model, self.loader(self.test_set))

    def generate(self, model: nn.Module) -> list[str]:
        prompts = [data.e2e_example(r)[0] for r in self.test_rows]
        return evaluate.generate(model, self.tokenizer, prompts, max_new_tokens=self.new_tokens)

    def bleu(self, hyps: list[str], idx: list[int] | None = None) -> float:
        idx = range(len(hyps)) if idx is None else idx
        refs = list(self.test_rows["refs"])
        return evaluate.corpus_bleu([hyps[i] for i in idx], [refs[i] for i in idx])

    def bleu_difference(self, hyps_a: list[str], hyps_b: list[str], resamples: int = 1000) -> Interval:
        """BLEU(a) - BLEU(b), with a paired bootstrap over the test MRs."""
        return bootstrap(lambda idx: self.bleu(hyps_a, idx) - self.bleu(hyps_b, idx), len(hyps_a), resamples,
                         self.seed, what="test MRs")


def full_finetuning_e2e(task: E2E, results_dir, lrs_: tuple[float, ...] | None = None) -> dict:
    """Full fine-tuning of SmolLM2 on ``task`` at each learning rate of the sweep, the best by selection loss."""
    lrs_ = lrs_ or lrs(task, "full")

    def compute():
        def fit(lr):
            model = task.base()
            hist = task.fit(model, lr, desc=f"E2E full fine-tuning, lr {lr:g}", curve=True)
            return task.select_loss(model), (model, time_curve(hist))
        best, (model, curve), sweep = pick_lr(fit, lrs_, higher_is_better=False)
        hyps = task.generate(model)
        return {"lr": best, "select_loss": sweep, "hyps": hyps, "bleu": task.bleu(hyps),
                "test_loss": curve["test_loss"][-1], "steps": task.steps, "curve": curve,
                "trainable_params": count_parameters(model)[0]}
    return cached(results_dir, "full_ft_e2e", {**_spec(task), "lrs": list(lrs_)}, compute)


def time_curve(hist: History) -> dict:
    """The checkpoints of a ``fit(..., curve=True)``: steps, training seconds before each, test losses."""
    return {"step": [e["step"] for e in hist.eval], "elapsed_s": [hist.elapsed_s[e["step"] - 1] for e in hist.eval],
            "test_loss": [e["test_loss"] for e in hist.eval]}


def loss_at_time(curve: dict, seconds: float, start_loss: float) -> float:
    """The test loss a run had reached after ``seconds`` of training: linear between its checkpoints,
    from ``start_loss`` at 0 s (the untrained model). Beyond the last checkpoint: an error, not a guess."""
    ts, ys = [0.0, *curve["elapsed_s"]], [start_loss, *curve["test_loss"]]
    if not 0 <= seconds <= ts[-1]:
        raise ValueError(f"{seconds:.1f} s is outside this run's 0-{ts[-1]:.1f} s of training")
    return float(np.interp(seconds, ts, ys))


def _spec(task) -> dict:
    return {"task": type(task).__name__, **{k: v for k, v in asdict(task).items()}}


# ----------------------------------------------------------------------------- per-example scores (notebooks 07, 08)

@torch.no_grad()
def example_losses(model: nn.Module, loader) -> list[float]:
    """Each example's mean next-token loss over its response (labels != -100), in the loader's order:
    the per-example scores a paired bootstrap of held-out loss needs. Soft prompts and prefixes are
    fine: the real tokens' logits are the last T positions, whatever virtual tokens come first."""
    was, device = model.training, next(model.parameters()).device
    model.eval()
    out = []
    for batch in loader:
        batch = {k: v.to(device) for k, v in batch.items()}
        labels = batch.pop("labels")
        logits = model(**batch).logits[:, -labels.shape[1]:]                   # (B, T, vocab)
        targets = labels[:, 1:]                                                 # token t predicts t + 1
        nll = nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2).float(), targets, ignore_index=-100,
                                          reduction="none")                    # (B, T - 1)
        out += (nll.sum(1) / (targets != -100).sum(1).clamp(min=1)).tolist()
    model.train(was)
    return out


def label_word_correct(model: nn.Module, tokenizer, rows, example_fn, words: list[str], batch_size: int = 16,
                       demonstrations: str = "", cache_demonstrations: bool = True) -> list[int]:
    """1/0 per row: is the largest of ``label_word_scores`` the row's label?"""
    scores = label_word_scores(model, tokenizer, rows, example_fn, words, batch_size, demonstrations, cache_demonstrations)
    return [int(p == label) for p, label in zip(scores.argmax(-1).tolist(), rows["label"])]


@torch.no_grad()
def label_word_scores(model: nn.Module, tokenizer, rows, example_fn, words: list[str], batch_size: int = 16,
                      demonstrations: str = "", cache_demonstrations: bool = True) -> torch.Tensor:
    """(rows, words) logits of the label ``words`` at the answer position: rank classification, the rule of
    ``evaluate.label_word_accuracy``, kept per sentence (for paired intervals) and cheaper: rows go
    in order of length (little padding) and only the label words' logits are computed, from the
    last hidden state (the output head runs on one position per batch, ``logits_to_keep=1``).

    ``demonstrations``: text put in front of every question, inside the same user turn (in-context
    learning). Its tokens are the same for every row, so by default they run through the model once
    and every batch reads their keys and values from that cache; ``cache_demonstrations=False`` runs
    them again for every row (the same ids, the same answer up to float rounding; the tests compare).
    The templated prompt is tokenized in two pieces, up to the end of the demonstrations and the rest."""
    label_ids = evaluate.label_token_ids(tokenizer, words)
    head = model.get_output_embeddings().weight[label_ids]                     # (classes, d)
    mark = "\x00"                                                              # where the question starts
    opening = data.chat_prompt(tokenizer, demonstrations + mark).split(mark)[0] if demonstrations else ""
    prefix = tokenizer(opening, add_special_tokens=False)["input_ids"] if opening else []
    ids = []
    for r in rows:
        text = data.chat_prompt(tokenizer, demonstrations + example_fn(r)[0])
        ids.append(tokenizer(text[len(opening):], add_special_tokens=False)["input_ids"])
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    was, device = model.training, head.device
    model.eval()
    cache = None
    if prefix and cache_demonstrations:
        cache = model(input_ids=torch.tensor([prefix], device=device), use_cache=True, logits_to_keep=1).past_key_values
    scores = torch.zeros(len(ids), len(words))
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        rows_ids = [ids[i] if cache is not None else prefix + ids[i] for i in chunk]
        T = max(map(len, rows_ids))
        input_ids = torch.tensor([r + [tokenizer.pad_token_id] * (T - len(r)) for r in rows_ids], device=device)
        mask = torch.tensor([[1] * len(r) + [0] * (T - len(r)) for r in rows_ids], device=device)
        kw = {}
        if cache is not None:             # the demonstrations' keys and values, one copy per row of the batch
            kw["past_key_values"] = copy.deepcopy(cache)
            kw["past_key_values"].batch_repeat_interleave(len(chunk))
            mask = torch.cat([torch.ones(len(chunk), len(prefix), dtype=mask.dtype, device=device), mask], 1)
        h = model(input_ids=input_ids, attention_mask=mask, output_hidden_states=True, logits_to_keep=1, **kw).hidden_states[-1]
        last = mask[:, -T:].sum(1) - 1 + (h.shape[1] - T)     # right padding: virtual tokens in front shift by n
        scores[chunk] = (h[torch.arange(len(chunk)), last] @ head.T).float().cpu()
    model.train(was)
    return scores


class _SmolLM2Answers:
    """What ``LabelWords`` and ``FewShot`` share: built from a run's profile, SmolLM2 loaded once (cut
    to its first ``layers`` in the smoke profile), and the majority class of the evaluation rows."""

    @classmethod
    def for_run(cls, run, **overrides):
        return cls(**{**cls.PROFILES[run.profile], "seed": run.seed, "profile": run.profile, **overrides})

    def _load_smollm2(self) -> None:
        self.model, self.tokenizer = models.load_model(models.SMOLLM2)
        if self.layers:
            models.keep_layers(self.model, self.layers)

    def majority(self) -> float:
        labels = list(self.val_rows["label"])
        return max(labels.count(c) for c in set(labels)) / len(labels)


@dataclass
class LabelWords(_SmolLM2Answers):
    """SmolLM2 answering a classification task with one label word, the way prompt tuning poses it.

    ``dataset``: "sst2" (the review -> "negative" / "positive"; the 872 GLUE validation sentences)
    or "agnews" (the article -> "World" / "Sports" / "Business" / "Science"; the test articles).
    Training is the causal-LM loss on the answer; scoring is rank classification of the label
    words (``label_word_correct``). A selection split, disjoint from training and evaluation, picks
    learning rates."""
    n_train: int
    n_select: int
    n_val: int
    steps: int
    batch: int = 8
    dataset: str = "sst2"
    seed: int = 0
    profile: str = "cpu"
    layers: int | None = None      # keep only the first layers of SmolLM2 (the smoke profile: the code path, fast)

    PROFILES = {"smoke": dict(n_train=4, n_select=4, n_val=8, steps=2, batch=2, layers=2),
                "cpu": dict(n_train=64, n_select=32, n_val=128, steps=16, batch=4),
                "gpu": dict(n_train=4000, n_select=256, n_val=872, steps=500, batch=16)}
    SOURCES = {"sst2": ("load_sst2", "validation", "sst2_generation_example", "SST2_WORDS", 128),
               "agnews": ("load_agnews", "test", "agnews_generation_example", "AGNEWS_WORDS", 384)}

    def __post_init__(self):
        if self.dataset not in self.SOURCES:
            raise ValueError(f"dataset must be one of {sorted(self.SOURCES)}, got {self.dataset!r}")
        load, self.eval_split, example, words, self.max_length = self.SOURCES[self.dataset]
        self._load, self.example_fn, self.words = getattr(data, load), getattr(data, example), getattr(data, words)
        self.model, self.tokenizer = None, None

    def base(self) -> nn.Module:
        """A fresh copy of the frozen SmolLM2 (loaded once), with the task's data tokenized."""
        if self.model is None:
            self._load_smollm2()
            rows = self._load("train", n=self.n_train + self.n_select, seed=self.seed)
            self.train_set = data.tokenize_causal(rows.select(range(self.n_train)), self.tokenizer, self.example_fn,
                                                  max_length=self.max_length)
            self.select_rows = rows.select(range(self.n_train, self.n_train + self.n_select))
            self.val_rows = self._load(self.eval_split, n=self.n_val, seed=self.seed)
        return copy.deepcopy(self.model)

    def fit(self, model: nn.Module, lr: float, desc: str | None = None, **kw) -> History:
        self.base()
        loader = data.make_loader(self.train_set, self.batch, shuffle=True, seed=self.seed,
                                  pad_token_id=self.tokenizer.pad_token_id)
        return train(model, loader, TrainConfig(lr=lr, max_steps=self.steps, seed=self.seed), desc=desc, **kw)

    def correct(self, model: nn.Module, split: str = "val") -> list[int]:
        """1/0 per sentence of the evaluation (or selection) split."""
        self.base()
        rows = self.val_rows if split == "val" else self.select_rows
        return label_word_correct(model, self.tokenizer, rows, self.example_fn, self.words)


def tfew_adafactor(params, config: TrainConfig) -> torch.optim.Optimizer:
    """T-Few's optimizer (r-three/t-few ``src/utils/get_optimizer.py``): transformers' Adafactor with
    ``scale_parameter`` (each step is relative to the tensor's RMS, so a vector of ones moves by lr),
    no relative step and no momentum; the loop's schedule sets the lr."""
    from transformers.optimization import Adafactor
    return Adafactor(params, lr=config.lr, weight_decay=config.weight_decay, scale_parameter=True,
                     relative_step=False, warmup_init=False)


@dataclass
class FewShot(_SmolLM2Answers):
    """T-Few's few-shot protocol (Liu et al. 2022, Section 4) for SmolLM2 on a task with one-token answers.

    ``k`` training examples drawn once (``seed``) and nothing else labelled: no validation split to
    tune on, so every hyper-parameter is fixed beforehand (T-Few's own: its configs' learning rates,
    batch 8, Adafactor, 6% warm-up then linear decay, clipping at 1). Training is a multiple-choice
    batch (``training.multiple_choice``) with T-Few's loss, or a selection of its terms; scoring is
    rank classification of the label words on the evaluation split (``label_word_correct``), which
    for one-token choices is the argmax of beta. ``demonstrations()`` are the same k examples as an
    in-context prompt, the baseline the paper compares against.

    ``dataset``: "sst2" (a review -> "negative" / "positive"; GLUE's validation sentences) or "rte"
    (premise and hypothesis -> "yes" / "no"; SuperGLUE's 277 validation pairs)."""
    k: int
    n_val: int | None
    steps: int
    batch: int = 8
    dataset: str = "sst2"
    seed: int = 0
    profile: str = "cpu"
    layers: int | None = None      # keep only the first layers of SmolLM2 (the smoke profile)

    PROFILES = {"smoke": dict(k=4, n_val=8, steps=2, batch=2, layers=2),
                "cpu": dict(k=32, n_val=128, steps=32),
                "gpu": dict(k=32, n_val=None, steps=1000)}          # T-Few: 32 examples, 1000 steps of 8
    SOURCES = {"sst2": ("load_sst2", "sst2_generation_example", "SST2_WORDS"),
               "rte": ("load_rte", "rte_example", "RTE_WORDS")}

    def __post_init__(self):
        if self.dataset not in self.SOURCES:
            raise ValueError(f"dataset must be one of {sorted(self.SOURCES)}, got {self.dataset!r}")
        if not 2 <= self.batch <= self.k:
            raise ValueError(f"need 2 <= batch <= k, got batch {self.batch} and k = {self.k} training examples")
        load, example, words = self.SOURCES[self.dataset]
        self._load, self.example_fn, self.words = getattr(data, load), getattr(data, example), getattr(data, words)
        self.model, self.tokenizer = None, None

    def base(self) -> nn.Module:
        """A fresh copy of the frozen SmolLM2 (loaded once), with the task's examples drawn."""
        if self.model is None:
            self._load_smollm2()
            self.train_rows = self._load("train", n=self.k, seed=self.seed)
            self.val_rows = self._load("validation", n=self.n_val, seed=self.seed)
            self.label_ids = evaluate.label_token_ids(self.tokenizer, self.words)
        return copy.deepcopy(self.model)

    def prompt_ids(self, row: dict, demonstrations: str = "") -> list[int]:
        """The templated question (after ``demonstrations``, if any), as the model reads it."""
        text = data.chat_prompt(self.tokenizer, demonstrations + self.example_fn(row)[0])
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def loader(self) -> torch.utils.data.DataLoader:
        """Shuffled multiple-choice batches of the k examples: each prompt with every label word as a choice."""
        self.base()
        examples = [(self.prompt_ids(r), r["label"]) for r in self.train_rows]
        choices = [[i] for i in self.label_ids]

        def collate(items):
            return multiple_choice_batch([p for p, _ in items], [choices] * len(items), [y for _, y in items],
                                         self.tokenizer.pad_token_id)
        return torch.utils.data.DataLoader(examples, batch_size=self.batch, shuffle=True, collate_fn=collate,
                                           generator=torch.Generator().manual_seed(self.seed))

    def fit(self, model: nn.Module, lr: float, losses=TFewObjective.TERMS, official: bool = False,
            desc: str | None = None, make_optimizer=tfew_adafactor, **kw) -> History:
        """Train ``model`` (its trainable parameters) for ``steps`` steps with T-Few's loss, or the
        terms ``losses``; ``official``: the official code's unlikelihood term (``TFewObjective``)."""
        config = TrainConfig(lr=lr, max_steps=self.steps, warmup_ratio=0.06, max_grad_norm=1.0, seed=self.seed)
        return train(TFewObjective(model, official=official, losses=losses), self.loader(), config, desc=desc,
                     make_optimizer=make_optimizer, **kw)

    def demonstrations(self) -> str:
        """The k training examples as in-context demonstrations: each question, then its answer word."""
        self.base()
        return "".join(f"{q}\n{a}\n\n" for q, a in map(self.example_fn, self.train_rows))

    def correct(self, model: nn.Module, demonstrations: str = "") -> list[int]:
        """1/0 per evaluation example (rank classification of the label words)."""
        self.base()
        return label_word_correct(model, self.tokenizer, self.val_rows, self.example_fn, self.words,
                                  demonstrations=demonstrations)

    def prompt_tokens(self, demonstrations: str = "") -> list[int]:
        """The tokens the model reads to answer each evaluation example (demonstrations included)."""
        self.base()
        return [len(self.prompt_ids(r, demonstrations)) for r in self.val_rows]


@dataclass
class MathAndScience(_SmolLM2Answers):
    """SmolLM2 fine-tuned on GSM8K (math word problems) or on ARC-Easy (science multiple choice), the
    two kinds of task LLM-Adapters compares its adapters on (notebook 20).

    GSM8K: trained on the worked solutions (the question as the prompt, the loss on the solution and
    its "#### N"); scored by each test problem's teacher-forced loss on the reference solution
    (``gsm8k_losses``), since SmolLM2-135M gets few GSM8K answers right. ARC-Easy: trained to answer the
    question with the text of its right choice; scored by which of the four choices is the most likely
    continuation of the question (``arc_correct``, the way lm-evaluation-harness scores ARC). The recipe
    is LLM-Adapters' (``finetune.py``): AdamW, warm-up then linear decay, one learning rate for every
    method; ``warmup`` is its 100 steps scaled to our runs."""
    n_train: int
    n_test_math: int
    n_test_science: int
    steps: int
    batch: int = 2
    batch_science: int = 4
    max_length: int = 256
    warmup: float = 0.1
    seed: int = 0
    profile: str = "cpu"
    layers: int | None = None      # keep only the first layers of SmolLM2 (the smoke profile)

    PROFILES = {"smoke": dict(n_train=8, n_test_math=4, n_test_science=8, steps=2, batch=2, batch_science=2, layers=2),
                "cpu": dict(n_train=256, n_test_math=24, n_test_science=60, steps=16),
                "gpu": dict(n_train=2000, n_test_math=1319, n_test_science=2268, steps=1000, batch=8, batch_science=16,
                            max_length=512)}
    TASKS = ("gsm8k", "arc_easy")

    def base(self) -> nn.Module:
        """A fresh copy of the frozen SmolLM2 (loaded once), with both tasks' data tokenized."""
        if self.model is None:
            self._load_smollm2()
            tok = self.tokenizer
            math_train = data.load_gsm8k("train", n=self.n_train, seed=self.seed)
            self.train_sets = {
                "gsm8k": data.tokenize_causal(math_train, tok, data.gsm8k_example, max_length=self.max_length),
                "arc_easy": data.tokenize_causal(data.load_arc_easy("train", n=self.n_train, seed=self.seed), tok,
                                                 data.arc_example, max_length=self.max_length)}
            self.math_test = data.tokenize_causal(data.load_gsm8k("test", n=self.n_test_math, seed=self.seed), tok,
                                                  data.gsm8k_example, max_length=self.max_length)
            self.science_rows = data.load_arc_easy("test", n=self.n_test_science, seed=self.seed)
        return copy.deepcopy(self.model)

    def __post_init__(self):
        self.model, self.tokenizer = None, None

    def fit(self, model: nn.Module, task: str, lr: float, desc: str | None = None, **kw) -> History:
        """Train ``model``'s trainable parameters for ``steps`` steps on ``task`` ("gsm8k" or "arc_easy")."""
        if task not in self.TASKS:
            raise ValueError(f"task must be one of {self.TASKS}, got {task!r}")
        self.base()
        batch = self.batch if task == "gsm8k" else self.batch_science
        loader = data.make_loader(self.train_sets[task], batch, shuffle=True, seed=self.seed,
                                  pad_token_id=self.tokenizer.pad_token_id)
        return train(model, loader, TrainConfig(lr=lr, max_steps=self.steps, warmup_ratio=self.warmup, seed=self.seed),
                     desc=desc, **kw)

    def gsm8k_losses(self, model: nn.Module) -> list[float]:
        """Each GSM8K test problem's mean loss per token of its reference solution (teacher-forced)."""
        self.base()
        return example_losses(model, data.make_loader(self.math_test, 8, pad_token_id=self.tokenizer.pad_token_id))

    def arc_correct(self, model: nn.Module) -> list[int]:
        """1/0 per ARC-Easy test question: is the right choice the most likely continuation of the question?"""
        self.base()
        return choice_correct(model, self.tokenizer, self.science_rows, lambda row: row["question"], "choices")


@torch.no_grad()
def choice_correct(model: nn.Module, tokenizer, rows, prompt_fn, choices: str = "choices") -> list[int]:
    """1/0 per row: does the row's ``label`` choice have the largest summed log-probability, read after
    the templated prompt ``prompt_fn(row)``? (lm-evaluation-harness' "acc" for ARC, PIQA and the like;
    T-Few's ``beta`` would divide by the choice's length.) The prompt is read once per row and its
    KV cache shared by the choices, which continue it side by side (right-padded)."""
    was, device = model.training, next(model.parameters()).device
    model.eval()
    out, pad = [], tokenizer.pad_token_id
    for row in rows:
        prompt = tokenizer(data.chat_prompt(tokenizer, prompt_fn(row)), add_special_tokens=False)["input_ids"]
        options = [tokenizer(c, add_special_tokens=False)["input_ids"] for c in row[choices]]
        C, T = len(options), max(len(o) for o in options)
        ids = torch.tensor([o + [pad] * (T - len(o)) for o in options], device=device)
        real = torch.tensor([[1] * len(o) + [0] * (T - len(o)) for o in options], device=device)
        first = model(input_ids=torch.tensor([prompt], device=device), use_cache=True)
        first.past_key_values.batch_repeat_interleave(C)
        mask = torch.cat([torch.ones(C, len(prompt), dtype=real.dtype, device=device), real], 1)
        rest = model(input_ids=ids, attention_mask=mask, past_key_values=first.past_key_values).logits
        # choice token t is predicted at the position before it: the prompt's last one for t = 0
        logits = torch.cat([first.logits[:, -1:].expand(C, 1, -1), rest[:, :-1]], 1)
        logp = torch.log_softmax(logits.float(), -1).gather(-1, ids[..., None]).squeeze(-1) * real
        out.append(int(logp.sum(-1).argmax().item() == row["label"]))
    model.train(was)
    return out


def fit_with_checkpoints(task, model: nn.Module, lr: float, eval_fn: Callable[[nn.Module], dict], every: int,
                         desc: str | None = None) -> History:
    """``task.fit`` (same data, steps, batch and schedule) that also runs ``eval_fn(model)`` every
    ``every`` optimizer steps and at the end: for analyses of how the weights move while a method
    trains (notebook 03, the DoRA paper's Figure 2). Keep in step with ``SST2.fit`` / ``E2E.fit``."""
    task.base()
    return train(model, task.loader(task.train_set, shuffle=True),
                 TrainConfig(lr=lr, max_steps=task.steps, seed=task.seed, eval_every=every), eval_fn=eval_fn, desc=desc)


# ----------------------------------------------------------------------------- seeds (notebook 01)

def sst2_with_seed(task: SST2, seed: int) -> SST2:
    """``task`` (the same training, selection and validation sentences, steps and batch) under another
    training seed: a classification head drawn under ``seed`` (as ``SST2.base`` draws it), another
    data order and other dropout masks. What "several random seeds" of one recipe vary (Mosbach et
    al. 2020); ``sst2_with_seed(task, task.seed)`` trains exactly as ``task`` does."""
    task.base()
    other = copy.copy(task)
    other.seed = seed
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        other.model, _ = models.load_model(models.MINILM, num_labels=2)
    return other


def bleu_difference(task: E2E, hyps_a: list[str], hyps_b: list[str], resamples: int = 1000) -> Interval:
    """``task.bleu_difference`` (BLEU(a) - BLEU(b), paired bootstrap over the test MRs) from each MR's
    BLEU statistics: a resample's corpus BLEU is computed from the sums of its MRs' n-gram counts and
    lengths, which is what corpus BLEU is, instead of re-tokenising the corpus. The same resamples give
    the same numbers, some hundred times faster (sacrebleu's own paired bootstrap works this way; its
    two statistics methods are private API of the pinned sacrebleu 2.x)."""
    import sacrebleu
    refs = list(task.test_rows["refs"])
    streams = [[r[i] if i < len(r) else None for r in refs] for i in range(max(len(r) for r in refs))]
    metric = sacrebleu.metrics.BLEU()
    stats_a, stats_b = (metric._extract_corpus_statistics(h, streams) for h in (hyps_a, hyps_b))

    def score(stats, idx):   # stats per MR: [hyp length, ref length, matches of 1..4-grams, totals of 1..4-grams]
        return metric._compute_score_from_stats([sum(stats[i][k] for i in idx) for k in range(len(stats[0]))]).score
    return bootstrap(lambda idx: score(stats_a, idx) - score(stats_b, idx), len(hyps_a), resamples, task.seed,
                     what="test MRs")


# ----------------------------------------------------------------------------- memory of a training step (notebook 05)

def training_step_memory(model: nn.Module, batch: dict, optimizer: torch.optim.Optimizer) -> LiveTensors:
    """One training step of ``model`` on ``batch`` (forward, backward, ``optimizer.step()``, zero_grad)
    under ``LiveTensors``: the peak bytes of the tensors alive, split into the model's own tensors
    (weights and buffers, e.g. 4-bit codes), what the forward pass made and kept (activations saved
    for backward), what the backward pass made (gradients, recomputed activations under gradient
    checkpointing, temporaries) and what the optimizer step made (Adam's two moments on a first
    step, temporaries). ``.state`` adds the bytes of the training state per tensor name:
    "weights" (every parameter and buffer), "gradients" (after backward) and "optimizer state"
    (after the step). The model is trained by that step: pass a copy if it matters."""
    was = model.training
    model.train()
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items()}
    nbytes = lambda t: t.numel() * t.element_size()  # noqa: E731
    names = {p: n for n, p in model.named_parameters()}
    existing = [*model.parameters(), *model.buffers(), *batch.values()]
    existing += [t for s in optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    with LiveTensors(existing) as live:
        live.phase = "forward"
        loss = model(**batch).loss
        live.phase = "backward"
        loss.backward()
        del loss
        gradients = {names[p]: nbytes(p.grad) for p in names if p.grad is not None}
        live.phase = "optimizer step"
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    live.state = {"weights": {n: nbytes(t) for n, t in [*model.named_parameters(), *model.named_buffers()]},
                  "gradients": gradients,
                  "optimizer state": {names[p]: sum(nbytes(t) for t in s.values() if isinstance(t, torch.Tensor))
                                      for p, s in optimizer.state.items()}}
    model.train(was)
    return live
