"""Packed training: the LoRA jobs of a sweep trained together over one frozen base.

LoRA (Hu et al. 2021, §4.1) leaves W frozen and trains h = W x + scale · B A x. Jobs
that share W can share its work: their batches are stacked (K·B rows), the base runs
once over all of them, and each job's low-rank path applies to its own rows only.
Rows never mix in a transformer (attention, LayerNorm and the loss are per sequence),
so job k's loss, and with it its gradients, are the ones it computes alone, up to the
order in which the stacked matmuls sum. Each job keeps its own rank, alpha, scaling,
targets, dropout, init and seed, and its own AdamW, schedule, gradient clipping and
divergence check: a job whose loss is not finite leaves the pack, the others go on.

Depends on torch only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from loralab.adapter_slots import LoRAAdapter
from loralab.lora import LoRAConfig, find_targets
from loralab.model import GPT
from loralab.schedule import warmup_cosine
from loralab.surgery import replace_module

PACKABLE_LORA = {"rank", "alpha", "dropout", "target_modules", "scaling", "init"}  # the rest at its default


@dataclass
class JobSpec:
    """One job of a pack: its adapter and how it trains (``LitTransformer``'s optimizer and schedule,
    Lightning's ``gradient_clip_val``)."""

    lora: LoRAConfig
    seed: int
    lr: float
    max_steps: int
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1
    gradient_clip_val: float | None = None


def unpackable(config: LoRAConfig) -> str | None:
    """Why a LoRA config cannot train in a pack (it then trains alone), or None."""
    if config.init == "pissa":  # its residual would change the base the pack shares
        return "lora.init='pissa' is not packed"
    default = LoRAConfig()
    for f in fields(LoRAConfig):
        if f.name not in PACKABLE_LORA and getattr(config, f.name) != getattr(default, f.name):
            return f"lora.{f.name}={getattr(config, f.name)!r} is not packed"
    return None


class PackedLinear(nn.Module):
    """A frozen ``nn.Linear`` shared by a pack's jobs, with each job's adapter (``lora_A``,
    ``lora_B``, dropout, scale) where that job adapts this layer. ``rows`` says, before each
    forward, which job owns which consecutive rows of the stacked batch."""

    def __init__(self, base: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight.requires_grad_(False)
        self.bias = base.bias.requires_grad_(False) if base.bias is not None else None
        self.adapters = nn.ModuleDict()  # job name -> LoRAAdapter
        self.rows: list[tuple[str, int]] = []  # (job, its rows), in stacking order

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = F.linear(x, self.weight, self.bias)  # (K·B, T, out)
        sizes = [n for _, n in self.rows]
        parts = []
        for (job, _), xs, rs in zip(self.rows, x.split(sizes), result.split(sizes)):
            if job not in self.adapters:  # this job does not adapt this layer
                parts.append(rs)
                continue
            a = self.adapters[job]
            xs = a.lora_dropout(xs.to(a.lora_A.dtype))
            lora = F.linear(F.linear(xs, a.lora_A), a.lora_B)  # (B, T, out): (x Aᵀ) Bᵀ, as LoRALinear
            parts.append((rs + a.scale * lora).to(rs.dtype))
        return torch.cat(parts)  # (K·B, T, out)


class Pack(nn.Module):
    """K jobs over one frozen GPT. ``base`` is wrapped in place (it becomes the pack's). Each
    job's adapters are drawn from ``torch.manual_seed(job.seed)`` in the order ``inject_lora``
    draws them, so they start where the job's solo run starts."""

    def __init__(self, base: GPT, jobs: dict[str, JobSpec]):
        super().__init__()
        for name, job in jobs.items():
            if reason := unpackable(job.lora):
                raise ValueError(f"job {name!r} cannot be packed: {reason}")
        self.model = base.requires_grad_(False)
        self.jobs = jobs
        targets = {name: find_targets(base, job.lora.target_modules) for name, job in jobs.items()}
        for module_name in dict.fromkeys(t for names in targets.values() for t in names):
            replace_module(base, module_name, PackedLinear(base.get_submodule(module_name)))
        self.layers = {n: m for n, m in base.named_modules() if isinstance(m, PackedLinear)}
        self.optimizers, self.schedulers = {}, {}
        for name, job in jobs.items():
            self.add_adapters(name, job, targets[name])
            params = self.job_parameters(name)
            self.optimizers[name] = torch.optim.AdamW(params, lr=job.lr, betas=tuple(job.betas),
                                                      weight_decay=job.weight_decay)
            self.schedulers[name] = torch.optim.lr_scheduler.LambdaLR(
                self.optimizers[name], warmup_cosine(job.warmup_steps, job.max_steps, job.min_lr_ratio))

    def add_adapters(self, name: str, job: JobSpec, targets: list[str]) -> None:
        torch.manual_seed(job.seed)
        weight = self.layers[targets[0]].weight
        dtype = torch.promote_types(weight.dtype, torch.float32)  # as LoRALinear.add_adapter
        c = job.lora
        for target in targets:
            layer = self.layers[target]
            layer.adapters[name] = LoRAAdapter.initialised(layer.in_features, layer.out_features, c.rank, c.alpha,
                                                           c.dropout, c.scaling, c.init, device=weight.device,
                                                           dtype=dtype)

    def job_parameters(self, name: str) -> list[nn.Parameter]:
        """Job ``name``'s trainable parameters, in its solo model's order (lora_A, lora_B per layer)."""
        return [p for layer in self.layers.values() if name in layer.adapters
                for p in (layer.adapters[name].lora_A, layer.adapters[name].lora_B)]

    def adapter_state(self, name: str) -> dict[str, torch.Tensor]:
        """Job ``name``'s adapter under the keys its solo model has (``lora_state_dict``)."""
        return {f"{module}.{key}": getattr(layer.adapters[name], key).detach()
                for module, layer in self.layers.items() if name in layer.adapters for key in ("lora_A", "lora_B")}

    def forward_stacked(self, names: list[str], x: torch.Tensor) -> list[torch.Tensor]:
        """Logits per job: ``x`` (K·B, T) holds job ``names[k]``'s rows in its k-th block of B."""
        rows = [(name, x.size(0) // len(names)) for name in names]
        for layer in self.layers.values():
            layer.rows = rows
        logits, _ = self.model(x)  # (K·B, T, vocab)
        return list(logits.split(x.size(0) // len(names)))  # K × (B, T, vocab)

    def train_step(self, batches: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, float]:
        """One optimizer step of every job in ``batches`` on its own batch (x, y), each (B, T).
        Returns each job's loss; a non-finite one means the job diverged: its step is skipped
        (as ``LitTransformer`` skips it) and its caller takes it out of the pack."""
        names = list(batches)
        x = torch.cat([batches[n][0] for n in names])  # (K·B, T)
        self.model.train()
        logits = self.forward_stacked(names, x)
        losses = {n: F.cross_entropy(lg.reshape(-1, lg.size(-1)), batches[n][1].reshape(-1), ignore_index=-1)
                  for n, lg in zip(names, logits)}
        finite = [n for n in names if torch.isfinite(losses[n])]
        for n in names:
            self.optimizers[n].zero_grad(set_to_none=True)
        if finite:  # job k's parameters see only loss k: the sum's gradient is each job's own
            sum(losses[n] for n in finite).backward()
        for n in finite:
            if self.jobs[n].gradient_clip_val:
                nn.utils.clip_grad_norm_(self.job_parameters(n), self.jobs[n].gradient_clip_val)
            self.optimizers[n].step()
            self.schedulers[n].step()
        return {n: loss.item() for n, loss in losses.items()}

    @torch.no_grad()
    def evaluate(self, names: list[str], batches) -> dict[str, dict[str, float]]:
        """val/loss, val/ppl and val/acc of each job in ``names`` over ``batches`` of (x, y), the
        same batches for every job, as ``LitTransformer`` computes them: the mean token loss (inf once a
        batch is NaN), its exponential, and the share of tokens whose most likely next token is
        the target (targets of -1 are ignored)."""
        self.model.eval()
        totals = {n: torch.zeros(3, dtype=torch.float64) for n in names}  # NLL, tokens, correct
        for x, y in batches:
            logits = self.forward_stacked(names, x.repeat(len(names), 1))  # the batch once per job
            target = y.reshape(-1)  # (B·T,)
            kept = target != -1
            for n, lg in zip(names, logits):
                flat = lg.reshape(-1, lg.size(-1)).float()  # (B·T, vocab)
                nll = F.cross_entropy(flat, target, ignore_index=-1, reduction="sum")
                correct = (flat.argmax(-1) == target)[kept].sum()
                totals[n] += torch.stack([nll.double(), kept.sum().double(), correct.double()])
        metrics = {}
        for n, (nll, tokens, correct) in totals.items():
            loss = math.inf if nll.isnan() else (nll / tokens).item()
            metrics[n] = {"val/loss": loss, "val/ppl": math.exp(loss) if loss < 700 else math.inf,
                          "val/acc": (correct / tokens).item()}
        return metrics

    def job_state(self, name: str) -> dict:
        """What job ``name`` needs to go on exactly: adapter, optimizer and schedule (tensors and
        plain values only: loadable with ``weights_only=True``)."""
        return {"adapter": {k: v.clone() for k, v in self.adapter_state(name).items()},
                "optimizer": self.optimizers[name].state_dict(), "scheduler": self.schedulers[name].state_dict()}

    @torch.no_grad()
    def load_job_state(self, name: str, state: dict) -> None:
        own = self.adapter_state(name)
        if own.keys() != state["adapter"].keys():
            raise ValueError(f"checkpoint of job {name!r} holds another adapter: keys "
                             f"{sorted(state['adapter'])[:3]}..., expected {sorted(own)[:3]}...")
        for key, value in state["adapter"].items():
            own[key].copy_(value)
        self.optimizers[name].load_state_dict(state["optimizer"])
        self.schedulers[name].load_state_dict(state["scheduler"])
