"""Soft prompts: prompt tuning, P-tuning and prefix tuning, three ways to steer a frozen causal LM.

All three add n "virtual tokens" in front of the input and leave every model weight frozen:

* **Prompt tuning** (Lester, Al-Rfou & Constant 2021, arXiv 2104.08691): a matrix P (n x d) is
  prepended to the input embeddings, [P; E(x)]. P is the only parameter.
* **P-tuning** (Liu et al. 2021, "GPT Understands, Too", arXiv 2103.10385): the n prompt embeddings
  come out of a *prompt encoder* h_i = MLP([LSTM_fwd(e)_i ; LSTM_bwd(e)_i]) over trainable
  embeddings e_1..e_n (paper, §3.2, eq. 3), then are prepended like prompt tuning's.
* **Prefix tuning** (Li & Liang 2021, arXiv 2101.00190): every layer's attention gets n extra
  key/value vectors, P_k and P_v, that the input attends to (paper, §4.2: h_i = P_theta[i,:] for
  i in the prefix). They enter through the model's KV cache (a transformers ``DynamicCache``),
  as if the model had already read n tokens. During training P_theta = MLP_theta(P'_theta) (eq. 5,
  the reparameterisation, ``prefix_projection=True``); ``fold_prefix`` computes P_theta once and
  drops the MLP.

How the model sees them (what peft's ``PeftModelForCausalLM.forward`` does, and we do the same):
``add_adapter(model, config)`` attaches the encoder as ``model.prompt_encoder`` and a forward
pre-hook that rewrites the call ``model(input_ids, attention_mask, labels, ...)``:

* the attention mask gets n ones in front (the virtual tokens are always visible);
* prompt / P-tuning: ``inputs_embeds = [P; E(input_ids)]``, labels get n times -100 in front (no loss
  on virtual tokens), position ids are dropped (peft ignores them too), so positions run 0..n+T-1;
* prefix: ``past_key_values`` = the prefix cache, given position ids are shifted by n;
* in later generation steps (the cache already holds the prompt) only the mask is extended.

So ``model(...)``, a training loop and ``model.generate(...)`` work unchanged. (Calling
``model.forward`` directly skips the hook, and with it the prompt.)

Where peft departs from the papers (peft 0.21.2):

* prompt tuning RANDOM init is ``nn.Embedding``'s N(0, 1); the official code draws U(-0.5, 0.5).
  SAMPLE_VOCAB samples token ids uniformly from the whole vocabulary; the paper samples from the
  5,000 most common tokens. TEXT init (not in the paper) repeats the text's tokens to fill n, and
  *silently truncates* a longer text; we follow peft. The paper's best init, class labels, is not
  in peft: ``init="labels"`` here (a multi-token label gets the mean of its token embeddings; the
  rest of the prompt is sampled vocabulary, as in the paper).
* P-tuning: peft's LSTM encoder is LSTM(d -> h, bidirectional, 2 layers) then
  Linear(2h, 2h) -> ReLU -> Linear(2h, d), with h = ``encoder_hidden_size`` defaulting to d. The
  official code uses h = d/2, so the MLP is d -> d -> d; peft equals the paper only with
  ``encoder_hidden_size=d//2`` (our default). peft's default encoder is an MLP
  (d -> h -> h -> d, ReLUs), which the paper does not have: ``encoder="mlp"`` here.
* prefix tuning: peft's projection, Embedding(n, d) -> Linear(d, h) -> tanh -> Linear(h, 2Ld), is
  the official one, with h defaulting to d (the paper: 512 for GPT-2, 800 for BART). With grouped
  query attention (Llama) the prefix is as wide as the keys, n_kv_heads x head_dim, not d, and so
  is the projection's embedding. The paper's ``prefix_dropout`` is not in peft (nor here).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import ClassVar

import torch
from torch import nn
from transformers import Cache, DynamicCache

from .core import AdapterConfig, ModelAdapter

PREFIX_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")   # caches of (batch, kv_heads, seq, head_dim)


# ----------------------------------------------------------------------------- the shared hook

class SoftPrompt(ModelAdapter):
    """Base of the three: knows n and the model's limits, and rewrites the model's forward arguments."""
    kind: ClassVar[str] = "embeddings"   # "embeddings" (prepended to the input) or "prefix" (in the cache)

    def __init__(self, n: int, max_positions: int | None):
        super().__init__()
        self.num_virtual_tokens = n
        self.max_positions = max_positions
        self._hook = None

    def attach(self, model: nn.Module) -> None:
        super().attach(model)
        self._hook = model.register_forward_pre_hook(self._pre_forward, with_kwargs=True)

    def detach(self, model: nn.Module) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        super().detach(model)

    def _pre_forward(self, model, args, kwargs):
        if len(args) > 1:
            raise TypeError("with a soft prompt, call the model with keyword arguments (input_ids=..., "
                            "attention_mask=...); only input_ids may be positional")
        kwargs = dict(kwargs)
        if args:
            kwargs["input_ids"] = args[0]
        n = self.num_virtual_tokens
        ids, embeds = kwargs.get("input_ids"), kwargs.get("inputs_embeds")
        batch, length = (ids if ids is not None else embeds).shape[:2]
        cache = kwargs.get("past_key_values")
        prefill = cache is None or (isinstance(cache, Cache) and cache.get_seq_length() == 0)
        mask = kwargs.get("attention_mask")
        if mask is not None:
            if mask.dim() != 2:
                raise ValueError("soft prompts need a 2-D attention_mask (batch, tokens)")
            kwargs["attention_mask"] = torch.cat([mask.new_ones(batch, n), mask], dim=1)
        if prefill and self.max_positions is not None and n + length > self.max_positions:
            raise ValueError(f"{n} virtual tokens + {length} input tokens = {n + length} positions, more than the "
                             f"model's max_position_embeddings={self.max_positions}; shorten the input or the prompt")
        if self.kind == "prefix":
            if kwargs.get("position_ids") is not None:
                kwargs["position_ids"] = kwargs["position_ids"] + n
            if prefill:
                kwargs["past_key_values"] = self.prefix_cache(batch, cache)
            return (), kwargs
        kwargs["position_ids"] = None
        if prefill:
            if embeds is None:
                embeds = model.get_input_embeddings()(ids)
            prompts = self.prompts().to(embeds.dtype).unsqueeze(0).expand(batch, -1, -1)
            kwargs["inputs_embeds"] = torch.cat([prompts, embeds], dim=1)
            kwargs["input_ids"] = None
            if kwargs.get("labels") is not None:
                labels = kwargs["labels"]
                kwargs["labels"] = torch.cat([labels.new_full((batch, n), -100), labels], dim=1)
        return (), kwargs


def _max_positions(model: nn.Module, n: int) -> int | None:
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if limit is not None and n >= limit:
        raise ValueError(f"num_virtual_tokens={n} leaves no room for input: the model's max_position_embeddings "
                         f"is {limit}")
    return limit


def _check_n(n) -> None:
    if not isinstance(n, int) or n <= 0:
        raise ValueError(f"num_virtual_tokens must be a positive integer, got {n!r}")


def _load_tokenizer(name: str):
    from transformers import AutoTokenizer
    from .models import _resolve, local_path
    return AutoTokenizer.from_pretrained(local_path(name) if _resolve(name) else name)


# ----------------------------------------------------------------------------- prompt tuning

class PromptEmbedding(SoftPrompt):
    """The prompt P (n x d), stored as ``embedding`` (an nn.Embedding, float32, as peft keeps it)."""

    def __init__(self, n: int, d: int, max_positions: int | None = None):
        super().__init__(n, max_positions)
        self.embedding = nn.Embedding(n, d)   # N(0, 1) init: peft's RANDOM

    def prompts(self) -> torch.Tensor:        # (n, d)
        return self.embedding.weight


@dataclass
class PromptTuningConfig(AdapterConfig):
    """Prompt tuning (Lester et al. 2021).

    Args:
        num_virtual_tokens: n, the prompt length (the paper's default is 100).
        init: "random" (N(0, 1), peft's RANDOM), "vocab" (embeddings of uniformly sampled token ids,
            peft's SAMPLE_VOCAB), "text" (the embeddings of ``init_text``'s tokens, repeated or
            truncated to n, peft's TEXT) or "labels" (the paper's class-label init: the mean
            embedding of each of ``label_words``, then sampled vocabulary).
        init_text / label_words: for "text" / "labels".
        tokenizer_name_or_path: tokenizer for "text" and "labels" (an offline model name works).
    """
    target_modules: list[str] | str | None = None   # unused: a model-level method
    num_virtual_tokens: int = 20
    init: str = "random"
    init_text: str | None = None
    label_words: list[str] | None = None
    tokenizer_name_or_path: str | None = None

    method: ClassVar[str] = "prompts:prompt_tuning"

    def __post_init__(self):
        _check_n(self.num_virtual_tokens)
        if self.init not in ("random", "vocab", "text", "labels"):
            raise ValueError(f"init must be 'random', 'vocab', 'text' or 'labels', got {self.init!r}")
        if self.init == "text" and not self.init_text:
            raise ValueError("init='text' needs init_text, the text whose token embeddings start the prompt")
        if self.init == "labels" and not self.label_words:
            raise ValueError("init='labels' needs label_words, e.g. ['negative', 'positive']")
        if self.init in ("text", "labels") and not self.tokenizer_name_or_path:
            raise ValueError(f"init={self.init!r} needs tokenizer_name_or_path to turn words into token ids")
        if self.init == "labels" and len(self.label_words) > self.num_virtual_tokens:
            raise ValueError(f"{len(self.label_words)} label words do not fit {self.num_virtual_tokens} virtual tokens")

    def inject(self, model: nn.Module) -> None:
        n = self.num_virtual_tokens
        limit = _max_positions(model, n)
        words = model.get_input_embeddings()
        encoder = PromptEmbedding(n, words.embedding_dim, limit).to(words.weight.device)
        init = self.initial_prompt(words)
        if init is not None:
            encoder.embedding.weight.data.copy_(init)
        encoder.attach(model)

    @torch.no_grad()
    def initial_prompt(self, words: nn.Embedding) -> torch.Tensor | None:
        n, vocab = self.num_virtual_tokens, words.num_embeddings
        if self.init == "random":
            return None
        if self.init == "vocab":
            return words(torch.randint(0, vocab, (n,), device=words.weight.device)).float()
        tokenizer = _load_tokenizer(self.tokenizer_name_or_path)
        if self.init == "text":   # peft's rule: repeat to fill n, truncate a longer text
            ids = tokenizer(self.init_text)["input_ids"]
            ids = (ids * math.ceil(n / len(ids)))[:n]
            return words(torch.tensor(ids, device=words.weight.device)).float()
        rows = [words(torch.tensor(tokenizer(w, add_special_tokens=False)["input_ids"],
                                   device=words.weight.device)).mean(0) for w in self.label_words]
        rest = words(torch.randint(0, vocab, (n - len(rows),), device=words.weight.device))
        return torch.cat([torch.stack(rows), rest]).float()


# ----------------------------------------------------------------------------- P-tuning

class PromptEncoder(SoftPrompt):
    """P-tuning's encoder: h = MLP(BiLSTM(e)) over trainable embeddings e (n x d), or peft's MLP variant.

    LSTM: ``lstm_head`` = LSTM(d -> h, 2 layers, bidirectional), ``mlp_head`` = Linear(2h, 2h) ->
    ReLU -> Linear(2h, d). MLP: ``mlp_head`` = Linear(d, h) -> ReLU -> Linear(h, h) -> ReLU -> Linear(h, d).
    The names are the official code's (and peft's).
    """

    def __init__(self, n: int, d: int, encoder: str = "lstm", hidden: int | None = None, num_layers: int = 2,
                 dropout: float = 0.0, max_positions: int | None = None):
        super().__init__(n, max_positions)
        self.encoder = encoder
        self.embedding = nn.Embedding(n, d)
        if encoder == "lstm":
            h = hidden or d // 2
            self.lstm_head = nn.LSTM(d, h, num_layers=num_layers, dropout=dropout, bidirectional=True,
                                     batch_first=True)
            self.mlp_head = nn.Sequential(nn.Linear(2 * h, 2 * h), nn.ReLU(), nn.Linear(2 * h, d))
        else:
            h = hidden or d
            self.mlp_head = nn.Sequential(nn.Linear(d, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(), nn.Linear(h, d))

    def prompts(self) -> torch.Tensor:   # (n, d): the encoder runs once and is shared by the batch
        e = self.embedding.weight.unsqueeze(0)
        if self.encoder == "lstm":
            e = self.lstm_head(e)[0]
        return self.mlp_head(e)[0]


@dataclass
class PTuningConfig(AdapterConfig):
    """P-tuning (Liu et al. 2021).

    Args:
        num_virtual_tokens: n.
        encoder: "lstm" (the paper's) or "mlp" (peft's default, not in the paper).
        encoder_hidden_size: h; None means the paper's d/2 for "lstm" (so the MLP is d -> d -> d) and
            peft's d for "mlp". Pass d to match peft's LSTM default.
        encoder_num_layers: LSTM layers (2). encoder_dropout: dropout between LSTM layers.
    """
    target_modules: list[str] | str | None = None
    num_virtual_tokens: int = 20
    encoder: str = "lstm"
    encoder_hidden_size: int | None = None
    encoder_num_layers: int = 2
    encoder_dropout: float = 0.0

    method: ClassVar[str] = "prompts:p_tuning"

    def __post_init__(self):
        _check_n(self.num_virtual_tokens)
        if self.encoder not in ("lstm", "mlp"):
            raise ValueError(f"encoder must be 'lstm' (the paper's) or 'mlp' (peft's default), got {self.encoder!r}")

    def inject(self, model: nn.Module) -> None:
        limit = _max_positions(model, self.num_virtual_tokens)
        words = model.get_input_embeddings()
        PromptEncoder(self.num_virtual_tokens, words.embedding_dim, self.encoder, self.encoder_hidden_size,
                      self.encoder_num_layers, self.encoder_dropout, limit).to(words.weight.device).attach(model)


# ----------------------------------------------------------------------------- prefix tuning

class PrefixEncoder(SoftPrompt):
    """P_theta: n rows of L x 2 x (n_kv_heads * head_dim) numbers, the keys and values of every layer.

    Without projection ``embedding`` (n x 2L*w) is P_theta itself. With it, P_theta =
    ``transform``(``embedding``), transform = Linear(w, h) -> tanh -> Linear(h, 2Lw) (paper eq. 5).
    Row layout (peft's): [layer 0 keys | layer 0 values | layer 1 keys | ...], heads inside each.
    """
    kind = "prefix"

    def __init__(self, n: int, num_layers: int, kv_heads: int, head_dim: int, projection: bool = False,
                 hidden: int | None = None, max_positions: int | None = None):
        super().__init__(n, max_positions)
        self.num_layers, self.kv_heads, self.head_dim = num_layers, kv_heads, head_dim
        width = kv_heads * head_dim
        self.projection = projection
        if projection:
            self.embedding = nn.Embedding(n, width)
            h = hidden or width
            self.transform = nn.Sequential(nn.Linear(width, h), nn.Tanh(), nn.Linear(h, num_layers * 2 * width))
        else:
            self.embedding = nn.Embedding(n, num_layers * 2 * width)

    def prefix(self) -> torch.Tensor:   # (n, 2L * w)
        p = self.embedding.weight
        return self.transform(p) if self.projection else p

    def prefix_cache(self, batch: int, cache: Cache | None = None) -> Cache:
        """The prefix as a KV cache: layer l gets keys/values of shape (batch, kv_heads, n, head_dim)."""
        n = self.num_virtual_tokens
        kv = self.prefix().view(n, 2 * self.num_layers, self.kv_heads, self.head_dim).permute(1, 2, 0, 3)
        cache = DynamicCache() if cache is None else cache
        for layer in range(self.num_layers):
            k, v = (kv[2 * layer + i].unsqueeze(0).expand(batch, -1, -1, -1) for i in (0, 1))
            cache.update(k, v, layer)
        return cache

    @torch.no_grad()
    def fold(self) -> None:
        """Compute P_theta = MLP(P') once and keep only it (the paper keeps just the prefix after training)."""
        if not self.projection:
            return
        prefix = self.prefix().detach().clone()
        del self.transform
        self.embedding = nn.Embedding.from_pretrained(prefix, freeze=False)
        self.projection = False


@dataclass
class PrefixTuningConfig(AdapterConfig):
    """Prefix tuning (Li & Liang 2021).

    Args:
        num_virtual_tokens: n, the prefix length (the paper: 10 for table-to-text).
        prefix_projection: train through the reparameterisation MLP (paper eq. 5); ``fold_prefix``
            removes it afterwards.
        encoder_hidden_size: the MLP's hidden width; None means the key width (peft's default).
    """
    target_modules: list[str] | str | None = None
    num_virtual_tokens: int = 20
    prefix_projection: bool = False
    encoder_hidden_size: int | None = None

    method: ClassVar[str] = "prompts:prefix_tuning"

    def __post_init__(self):
        _check_n(self.num_virtual_tokens)

    def inject(self, model: nn.Module) -> None:
        config = model.config
        if config.model_type not in PREFIX_MODEL_TYPES:
            raise NotImplementedError(f"prefix tuning supports decoder models whose KV cache holds (batch, kv_heads, "
                                      f"tokens, head_dim) per layer: {', '.join(PREFIX_MODEL_TYPES)}; the model type "
                                      f"{config.model_type!r} is not supported")
        limit = _max_positions(model, self.num_virtual_tokens)
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        device = model.get_input_embeddings().weight.device
        PrefixEncoder(self.num_virtual_tokens, config.num_hidden_layers, kv_heads, head_dim, self.prefix_projection,
                      self.encoder_hidden_size, limit).to(device).attach(model)


def fold_prefix(model: nn.Module) -> None:
    """Replace the reparameterisation MLP by the prefix it computes; the config becomes prefix_projection=False."""
    config = getattr(model, "adapter_config", None)
    if not isinstance(config, PrefixTuningConfig):
        raise ValueError(f"fold_prefix needs a prefix-tuning model, this one has "
                         f"{'no adapter' if config is None else config.method}")
    model.prompt_encoder.fold()
    model.adapter_config = replace(config, prefix_projection=False, encoder_hidden_size=None)
