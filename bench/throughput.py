"""Sections 1 and 2: finetune and inference throughput, ours vs a plain HuggingFace loop.

Ours is the stage code itself: stages.multitask_model.build_model / make_batch / predict,
stages.batches.bucketed_batches over data_prep's Arrow splits, finetune's AdamW parameter
groups, gradient clipping and optimizer step, in the order stages.finetune.run calls them (the
default config: one task per step, no SMART/PCGrad). A cross-check times the real
stages.finetune.run for a fixed number of steps and reads the examples/s it reports itself.

The baseline is what the CS224N starter does, written with `transformers`: BertModel on the same
weights (attention "eager", the starter's own implementation; "sdpa" as a second line), the same
three heads (Linear(H, 5) on the [CLS] vector, Linear(2H, 1) on [u; v] for para and sts), AdamW,
random (unbucketed) batches of the same train rows, tokenized per batch by the same tokenizer
(tokenizer.json, truncation to the same max length) and padded to the batch's longest.

Both sides train the same step structure: the same sequence of tasks (proportional sampling,
one task per step, same seed), the same batch size, max length and torch threads. The sides
take turns in blocks of steps so that a change of machine load hits both alike.

Model FLOPs count the encoder's matmuls over the real (non-pad) tokens: per token 2 x the
weights of the linear layers, plus per layer 2 x 2 x L x H for the attention scores and the
weighted sum over a sequence of L real tokens; a training step is 3 x the forward. They are
divided by the fp32 matmul rate of a large torch.mm measured in the same run.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from bench.common import Context, base_config, matmul_peak_gflops
from stages import finetune as finetune_stage
from stages.device import autocast, resolve_precision
from stages.batches import Split, bucketed_batches
from stages.data_prep import SPLIT_FILES, read_file
from stages.multitask_model import batch_lengths, build_model, make_batch, predict
from stages.samplers import epoch_tasks

TASKS = ("sst", "para", "sts")
CPU = torch.device("cpu")


# ---------------------------------------------------------------- the HuggingFace baseline


class HFMultitask(nn.Module):
    """transformers.BertModel + the CS224N heads, as a starter-style training script has them."""

    def __init__(self, model_dir: Path, attn: str, dropout: float = 0.1):
        super().__init__()
        import transformers
        from transformers import BertModel

        transformers.logging.set_verbosity_error()  # its load report lists the pooler we leave out
        transformers.utils.logging.disable_progress_bar()

        self.bert = BertModel.from_pretrained(str(model_dir), attn_implementation=attn, add_pooling_layer=False,
                                              local_files_only=True, hidden_dropout_prob=dropout,
                                              attention_probs_dropout_prob=dropout)
        h = self.bert.config.hidden_size
        self.dropout = nn.Dropout(dropout)
        self.heads = nn.ModuleDict({"sst": nn.Linear(h, 5), "para": nn.Linear(2 * h, 1), "sts": nn.Linear(2 * h, 1)})

    def embed(self, ids, mask):
        return self.dropout(self.bert(input_ids=ids, attention_mask=mask).last_hidden_state[:, 0])

    def forward(self, task, batch):
        if task == "sst":
            return self.heads["sst"](self.embed(batch["input_ids"], batch["attention_mask"]))
        u = self.embed(batch["input_ids_1"], batch["attention_mask_1"])
        v = self.embed(batch["input_ids_2"], batch["attention_mask_2"])
        return self.heads[task](torch.cat([u, v], dim=-1)).squeeze(-1)

    @staticmethod
    def loss(task, output, labels):
        if task == "sst":
            return F.cross_entropy(output, labels.long())
        if task == "para":
            return F.binary_cross_entropy_with_logits(output, labels.float())
        return F.mse_loss(output, labels.float())


class HFData:
    """A split's raw sentences, tokenized per batch like the starter's collate function."""

    def __init__(self, task: str, split: Split, texts: dict, tokenizer):
        self.task, self.tokenizer = task, tokenizer
        self.sentences = [texts[i] for i in split.ids]
        self.labels = split.labels

    def batch(self, idx) -> dict:
        out = {}
        columns = {"": 0} if self.task == "sst" else {"_1": 0, "_2": 1}
        for suffix, col in columns.items():
            enc = self.tokenizer.encode_batch([self.sentences[i][col] for i in idx])
            out["input_ids" + suffix] = torch.tensor([e.ids for e in enc])
            out["attention_mask" + suffix] = torch.tensor([e.attention_mask for e in enc])
        if self.labels is not None:
            out["labels"] = torch.tensor(self.labels[np.asarray(idx)])
        return out


def hf_tokenizer(model_dir: Path, max_length: int):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    tok.no_padding()  # the shipped file pads to 128; the starter pads to the batch's longest
    tok.enable_truncation(max_length)
    tok.enable_padding(pad_id=tok.token_to_id("[PAD]"), pad_token="[PAD]")
    return tok


def raw_texts(cfg) -> dict:
    """{(task, split): {id: sentences}} read from the CS224N files as data_prep reads them."""
    data_dir = Path(cfg.data.dir)
    out = {}
    for task, split, key in SPLIT_FILES:
        name = getattr(cfg.data, key)
        if name is None:
            continue
        rows, _ = read_file(data_dir / name, task, is_test=split == "test", drop=True, config_key=key)
        texts = {r[1]: r[2] for r in rows}
        if task == "para" and split == "dev" and cfg.data.quora_train is None:  # the carve: both parts
            out[("para", "train")] = texts
        out[(task, split)] = texts
    return out


# ---------------------------------------------------------------- FLOPs


def encoder_linear_weights(model_dir: Path) -> tuple[int, int, int]:
    """(weights in the encoder layers' linear maps, layers, hidden size) from config.json."""
    import json

    c = json.loads((model_dir / "config.json").read_text())
    h, i, n = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"]
    return n * (4 * h * h + 2 * h * i), n, h


def forward_flops(lengths: np.ndarray, linear_weights: int, layers: int, hidden: int) -> float:
    """Matmul FLOPs of one encoder forward over sequences of these (real) lengths."""
    lengths = np.asarray(lengths, dtype=np.float64)
    return float(2 * linear_weights * lengths.sum() + layers * 4 * hidden * (lengths**2).sum())


def _masks(batch: dict) -> list[torch.Tensor]:
    return [v for k, v in batch.items() if k.startswith("attention_mask")]


# ---------------------------------------------------------------- training throughput


class Trainer:
    """One side of the comparison: a model, its optimizer, its batches; `step` trains one."""

    def __init__(self, name, model, make, loss, batches, flops_args, grad_clip=1.0, lr=5e-5, weight_decay=0.01,
                 param_groups=None, fused=False, precision="fp32"):
        self.name, self.model, self.make, self.loss, self.batches = name, model, make, loss, batches
        self.precision = precision  # fp32, or bf16 autocast of the forward pass (stages.device)
        self.flops_args, self.grad_clip = flops_args, grad_clip
        groups = param_groups if param_groups is not None else _plain_groups(model, weight_decay)
        self.optimizer = torch.optim.AdamW(groups, lr=lr, fused=fused)
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        self.seconds = 0.0
        self.examples = self.real_tokens = self.padded_tokens = 0
        self.flops = self.padded_flops = 0.0
        model.train()

    def step(self, task: str, timed: bool) -> None:
        idx = self.batches[task]()
        t = time.perf_counter()
        batch = self.make(task, idx)
        with autocast(CPU, self.precision):
            output = self.model(task, batch)
        loss = self.loss(task, output.float(), batch["labels"])  # losses in fp32 on both sides
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.trainable, self.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        loss.item()
        elapsed = time.perf_counter() - t
        if not timed:
            return
        self.seconds += elapsed
        self.examples += len(idx)
        for mask in _masks(batch):
            lengths = mask.sum(1).numpy()
            self.real_tokens += int(lengths.sum())
            self.padded_tokens += mask.numel()
            self.flops += 3 * forward_flops(lengths, *self.flops_args)
            self.padded_flops += 3 * forward_flops(np.full(len(lengths), mask.shape[1]), *self.flops_args)


def _plain_groups(model, weight_decay):
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    rest = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


def _cursor(make_epoch):
    """A callable giving the next batch's row indices, starting a new epoch of batches when out."""
    queue = []

    def next_batch():
        if not queue:
            queue.extend(make_epoch())
        return queue.pop(0)
    return next_batch


def finetune_throughput(ctx: Context, report) -> None:
    torch.set_num_threads(ctx.threads)
    steps, warmup, blocks = (6, 1, 2) if ctx.quick else (40, 3, 4)
    cfg = base_config({"data.max_rows": 2048} if ctx.quick else {})
    bs, max_length = cfg.train.batch_size, cfg.data.max_length
    prepared = ctx.prepared(cfg.data.max_rows, max_length)
    train = finetune_stage._load_splits(prepared, "train")
    texts = raw_texts(cfg)
    tok = hf_tokenizer(ctx.model_dir, max_length)
    flops_args = encoder_linear_weights(ctx.model_dir)

    n_batches = {t: -(-len(s) // bs) for t, s in train.items()}
    tasks = epoch_tasks(n_batches, cfg.train.sampling, np.random.default_rng(cfg.seed), steps=warmup + steps)

    def ours(name, bucketed=True, precision="fp32"):
        torch.manual_seed(cfg.seed)
        model = build_model(cfg, ctx.model_dir)
        rng = np.random.default_rng(cfg.seed)
        encodings = {t: model.batch_encoding(t) for t in train}  # pipeline.yaml's: para as one sequence
        lengths = {t: batch_lengths(t, s, encodings[t]) for t, s in train.items()}
        if bucketed:
            batches = {t: _cursor(lambda t=t: bucketed_batches(lengths[t], bs, rng)) for t in train}
        else:
            batches = {t: _cursor(lambda t=t: _random_batches(len(train[t]), bs, rng)) for t in train}
        groups = finetune_stage._param_groups(model, cfg.train.lr, cfg.train.weight_decay, 1.0)
        return Trainer(name, model, lambda task, idx: make_batch(task, train[task], idx, "cpu", encodings[task]),
                       model.loss, batches, flops_args, cfg.train.grad_clip, cfg.train.lr, param_groups=groups,
                       fused=finetune_stage._fused_adamw(torch.device("cpu")), precision=precision)

    def hf(name, attn, precision="fp32"):
        torch.manual_seed(cfg.seed)
        model = HFMultitask(ctx.model_dir, attn, cfg.model.dropout)
        rng = np.random.default_rng(cfg.seed)
        data = {t: HFData(t, s, texts[(t, "train")], tok) for t, s in train.items()}
        batches = {t: _cursor(lambda t=t: _random_batches(len(train[t]), bs, rng)) for t in train}
        return Trainer(name, model, lambda task, idx: data[task].batch(idx), model.loss, batches, flops_args,
                       cfg.train.grad_clip, cfg.train.lr, cfg.train.weight_decay, precision=precision)

    # The baseline is hf_eager in fp32 (what a user writes); hf_eager_bf16 is the same loop under
    # the same bf16 autocast as ours_bf16 (like for like).
    sides = [ours("ours_fp32"), ours("ours_bf16", precision="bf16"), hf("hf_eager", "eager"),
             hf("hf_eager_bf16", "eager", "bf16"), hf("hf_sdpa_bf16", "sdpa", "bf16"),
             ours("ours_unbucketed", bucketed=False)]
    peak_before = {p: matmul_peak_gflops(ctx.threads, dtype=p) for p in ("fp32", "bf16")}
    for side in sides:  # warm-up steps, not timed
        for task in tasks[:warmup]:
            side.step(task, timed=False)
    per_block = -(-steps // blocks)
    for b in range(blocks):
        order = sides if b % 2 == 0 else sides[::-1]
        for side in order:
            for task in tasks[warmup + b * per_block: warmup + min(steps, (b + 1) * per_block)]:
                side.step(task, timed=True)
    peak = {p: max(rate, matmul_peak_gflops(ctx.threads, dtype=p)) for p, rate in peak_before.items()}

    by = {s.name: s for s in sides}
    rate = {s.name: s.examples / s.seconds for s in sides}
    used, _ = resolve_precision(cfg.precision, CPU)  # what a make run on this machine trains in
    report.note("finetune", f"{steps} timed steps per side after {warmup} warm-up, in {blocks} interleaved blocks; "
                f"batch {bs}, max length {max_length}, {ctx.threads} torch threads, sampling {cfg.train.sampling}, "
                f"task sequence {_counts(tasks[warmup:])}; rows: "
                + ", ".join(f"{t} {len(s)}" for t, s in train.items()))
    for p in ("fp32", "bf16"):
        report.value("finetune", f"{p} matmul peak (2048^3 torch.mm)", f"{peak[p]:.1f} GFLOP/s",
                     ratio=peak[p] / peak["fp32"] if p == "bf16" else None)
    targets = {"ours_fp32": 2.0, "ours_bf16": 4.0}
    for s in sides:
        mfu = {p: s.flops / s.seconds / 1e9 / peak[p] for p in peak}
        share = f"{mfu['fp32']:.1%} of the fp32 peak" + (f", {mfu['bf16']:.1%} of the bf16 peak" if s.precision == "bf16" else "")
        report.value("finetune", f"{s.name}: examples/s", f"{rate[s.name]:.1f}", ratio=rate[s.name] / rate["hf_eager"],
                     target=targets.get(s.name),
                     extra=f"real tokens {s.real_tokens / s.padded_tokens:.0%}; model FLOPs {share}"
                           + ("; what make run trains in here" if s.name == f"ours_{used}" else ""))
    report.value("finetune", "ours_bf16 vs hf_eager_bf16 (like for like: the same bf16 autocast)",
                 f"{rate['ours_bf16'] / rate['hf_eager_bf16']:.2f}x", ratio=None, target_text=">= 2x",
                 met=rate["ours_bf16"] / rate["hf_eager_bf16"] >= 2.0,
                 extra=f"vs hf_sdpa_bf16 {rate['ours_bf16'] / rate['hf_sdpa_bf16']:.2f}x")
    report.value("finetune", "ours_bf16 vs ours_fp32 (bf16 autocast alone)",
                 f"{rate['ours_bf16'] / rate['ours_fp32']:.2f}x", None)
    for name, p in (("ours_fp32", "fp32"), ("ours_bf16", "bf16")):
        share = by[name].flops / by[name].seconds / 1e9 / peak[p]
        report.value("finetune", f"{name}: model FLOPs of real tokens / {p} matmul peak", f"{share:.1%}", ratio=None,
                     target_text=">= 60%" if p == "fp32" else None, met=share >= 0.6 if p == "fp32" else None)
    report.value("finetune", "ours_fp32 vs ours_unbucketed (bucketing alone)",
                 f"{rate['ours_fp32'] / rate['ours_unbucketed']:.2f}x", None)

    # Lever: AdamW's fused kernel (finetune uses it on CPU too) vs the default implementation,
    # one optimizer step over MiniLM + heads with finetune's parameter groups, interleaved.
    model = by["ours_fp32"].model
    step_s = {False: [], True: []}
    optimizers = {f: torch.optim.AdamW(finetune_stage._param_groups(model, 1e-9, 0.0), lr=1e-9, fused=f)
                  for f in step_s}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    for r in range(4 if ctx.quick else 10):
        for fused, optimizer in optimizers.items():
            t = time.perf_counter()
            optimizer.step()
            if r:
                step_s[fused].append(time.perf_counter() - t)
    model.zero_grad(set_to_none=True)
    unfused, fused = sum(step_s[False]) / len(step_s[False]), sum(step_s[True]) / len(step_s[True])
    report.value("finetune", "AdamW step, fused kernel vs default (lever)", f"{fused * 1e3:.0f} ms vs {unfused * 1e3:.0f} ms",
                 ratio=unfused / fused, extra=f"default = {unfused / (by['ours_fp32'].seconds / steps):.0%} of an "
                                              "average ours_fp32 step; the HF baseline keeps torch's default AdamW")

    # Cross-check: the real finetune stage (pipeline.yaml's recipe, R-Drop's second sst pass
    # included), fixed steps, its own examples/s (train loop only), in each precision.
    cross_steps = 8 if ctx.quick else 40
    for p in ("fp32", "bf16"):
        cfg_run = base_config({"precision": p, "train.epochs": 1, "train.steps_per_epoch": cross_steps,
                               "train.checkpoint_every": 0, **({"data.max_rows": 2048} if ctx.quick else {})})
        out = ctx.work / f"finetune-crosscheck-{p}"
        t = time.perf_counter()
        result = finetune_stage.run(cfg_run, {"data_prep": ctx.train_only(prepared)}, out, lambda *a, **k: None)
        wall = time.perf_counter() - t
        ex_s = result["metrics"]["train/examples_per_s"]
        report.value("finetune", f"stages.finetune.run {p}, {cross_steps} steps incl. first (its own train/examples_per_s)",
                     f"{ex_s:.1f}", ratio=ex_s / rate["hf_eager"],
                     extra=f"stage wall {wall:.1f} s incl. model load and save; the recipe's R-Drop runs sst twice; "
                           "hf_eager of the interleaved run as denominator")


def _random_batches(n: int, bs: int, rng: np.random.Generator) -> list[np.ndarray]:
    order = rng.permutation(n)
    return [order[i:i + bs] for i in range(0, n, bs)]


def _counts(tasks) -> str:
    return " ".join(f"{t} {list(tasks).count(t)}" for t in TASKS if t in tasks)


# ---------------------------------------------------------------- inference throughput


def head_rows(split: Split, n: int) -> Split:
    """The first n rows of a split, as views (no copy)."""
    n = min(n, len(split))
    columns = {c: (values, offsets[:n + 1]) for c, (values, offsets) in split.columns.items()}
    labels = None if split.labels is None else split.labels[:n]
    return Split(ids=split.ids[:n], columns=columns, labels=labels, name=split.name)


@torch.no_grad()
def hf_predict(model: HFMultitask, data: HFData, n: int, bs: int, precision: str = "fp32") -> np.ndarray:
    """The starter's evaluation: eval mode, no grad, batches in file order padded to their longest."""
    model.eval()
    out = []
    for start in range(0, n, bs):
        idx = np.arange(start, min(n, start + bs))
        with autocast(CPU, precision):
            output = model(data.task, data.batch(idx)).float()
        out.append(output.argmax(-1) if data.task == "sst" else (output > 0).long() if data.task == "para"
                   else output.clamp(0, 5))
    return torch.cat(out).numpy()


def inference_throughput(ctx: Context, report) -> None:
    torch.set_num_threads(ctx.threads)
    rows, rounds = (96, 1) if ctx.quick else (320, 2)
    cfg = base_config()
    prepared = ctx.prepared(None, cfg.data.max_length)
    dev = {t: head_rows(s, rows) for t, s in finetune_stage._load_splits(prepared, "dev").items()}
    texts = raw_texts(cfg)
    tok = hf_tokenizer(ctx.model_dir, cfg.data.max_length)
    hf_bs = cfg.train.batch_size

    ours = build_model(cfg, ctx.model_dir).eval()
    hf_model = HFMultitask(ctx.model_dir, "eager").eval()
    data = {t: HFData(t, s, texts[(t, "dev")], tok) for t, s in dev.items()}
    n_examples = sum(len(s) for s in dev.values())
    used, _ = resolve_precision(cfg.precision, CPU)  # what make run's evaluate predicts in here

    variants = {}
    for p, sizes in (("fp32", (hf_bs, cfg.train.eval_batch_size)), ("bf16", (hf_bs, cfg.train.eval_batch_size, 256))):
        for bs in sizes:
            variants[f"ours {p}, eval batch {bs}"] = (
                lambda bs=bs, p=p: [predict(ours, t, s, bs, "cpu", p) for t, s in dev.items()])
    for p in ("fp32", "bf16"):
        variants[f"hf_eager {p}, batch {hf_bs}, file order"] = (
            lambda p=p: [hf_predict(hf_model, data[t], len(s), hf_bs, p) for t, s in dev.items()])
    warm = {t: head_rows(s, 8) for t, s in dev.items()}  # warm-up: first calls allocate and load kernels
    for t, s in warm.items():
        for p in ("fp32", "bf16"):
            predict(ours, t, s, 8, "cpu", p)
            hf_predict(hf_model, data[t], len(s), 8, p)
    seconds = {name: 0.0 for name in variants}
    names = list(variants)
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            t = time.perf_counter()
            variants[name]()
            seconds[name] += time.perf_counter() - t
    base = f"hf_eager fp32, batch {hf_bs}, file order"
    base_rate = rounds * n_examples / seconds[base]
    report.note("inference", f"{rows} dev rows per task ({n_examples} examples), {rounds} interleaved round(s); "
                f"all no-grad, eval mode; ours = stages.multitask_model.predict (length-sorted batches)")
    for name in names:
        rate = rounds * n_examples / seconds[name]
        configured = name.endswith(f", eval batch {cfg.train.eval_batch_size}")
        notes = ["train.eval_batch_size as configured"] if configured else []
        if configured and name.startswith(f"ours {used},"):
            notes.append("what make run's evaluate uses here")
        report.value("inference", f"{name}: examples/s", f"{rate:.1f}", ratio=rate / base_rate,
                     target=3.0 if configured and "bf16" in name else None, extra="; ".join(notes) or None)
    like = (seconds[f"hf_eager bf16, batch {hf_bs}, file order"]
            / seconds[f"ours bf16, eval batch {cfg.train.eval_batch_size}"])
    report.value("inference", f"ours bf16 vs hf_eager bf16 (like for like), eval batch {cfg.train.eval_batch_size}",
                 f"{like:.2f}x", None)
