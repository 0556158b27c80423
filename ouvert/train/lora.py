"""LoRA (arXiv:2106.09685): y = W x + (alpha / r) * B A dropout(x), with W frozen.

Adapters go on the nn.Linear layers whose names match the targets (`q_proj,v_proj`, or
`all-linear`: every linear layer but the output head, MLA's projections included; the stacked
routed experts are tensors, not linear layers, and get none). Saved alone in PEFT's layout
(adapter_config.json + adapter_model.safetensors under HF names), so PEFT puts them on the
transformers model of the same base; `merge` folds them into the base weights.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from ouvert.checkpoint.base import hf_names


class LoRALinear(nn.Linear):
    """An nn.Linear (same weight and bias names) with a low-rank update beside it."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        dev, dt = base.weight.device, base.weight.dtype
        self.lora_A = nn.Linear(self.in_features, r, bias=False, device=dev, dtype=dt)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, device=dev, dtype=dt)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # PEFT's default init
        nn.init.zeros_(self.lora_B.weight)  # so training starts from the base model exactly
        self.scaling = alpha / r
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False

    def forward(self, x: Tensor) -> Tensor:
        y = F.linear(x, self.weight, self.bias)
        if self.merged:
            return y
        return y + self.lora_B(self.lora_A(self.dropout(x))) * self.scaling

    def delta(self) -> Tensor:
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling


def _targets(model: nn.Module, targets: str) -> list[str]:
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and not isinstance(m, LoRALinear)]
    if targets == "all-linear":
        return [n for n in names if n != "lm_head"]
    wanted = {t.strip() for t in targets.split(",") if t.strip()}
    chosen = [n for n in names if n.rsplit(".", 1)[-1] in wanted]
    if not chosen:
        raise ValueError(f"lora targets {targets!r} match no linear layer")
    return chosen


def apply_lora(model: nn.Module, r: int, alpha: float, dropout: float = 0.0, targets: str = "q_proj,v_proj",
               generator: torch.Generator | None = None) -> list[str]:
    """Swap the target linears for LoRALinear and freeze everything but the adapters."""
    if generator is not None:
        state = torch.random.get_rng_state()
        torch.random.manual_seed(int(torch.randint(0, 2**31, (1,), generator=generator)))
    chosen = _targets(model, targets)
    for name in chosen:
        parent, _, leaf = name.rpartition(".")
        holder = model.get_submodule(parent) if parent else model
        setattr(holder, leaf, LoRALinear(getattr(holder, leaf), r, alpha, dropout))
    if generator is not None:
        torch.random.set_rng_state(state)
    for n, p in model.named_parameters():
        p.requires_grad_(".lora_" in n)
    model.lora = {"r": r, "alpha": alpha, "dropout": dropout, "targets": chosen}
    return chosen


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


@torch.no_grad()
def merge(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight, in place, and put plain nn.Linear back."""
    for name, m in lora_modules(model).items():
        m.weight.data += m.delta().to(m.weight.dtype)
        plain = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
        plain.weight, plain.bias = m.weight, m.bias
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, plain)
    for p in model.parameters():
        p.requires_grad_(True)
    model.__dict__.pop("lora", None)
    return model


def _peft_key(name: str, part: str, cfg) -> str:
    return f"base_model.model.{hf_names(name + '.weight', cfg)[0].removesuffix('.weight')}.{part}.weight"


def adapter_state(model: nn.Module, state: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
    """The adapters under PEFT's key names (from the model, or from a full state dict in our names)."""
    cfg = model.config
    out = {}
    for name in lora_modules(model):
        for part in ("lora_A", "lora_B"):
            t = state[f"{name}.{part}.weight"] if state is not None else model.get_submodule(f"{name}.{part}").weight
            out[_peft_key(name, part, cfg)] = t.detach().contiguous()
    return out


def save_adapter(model: nn.Module, out: str | Path, base: str, state: dict[str, Tensor] | None = None) -> None:
    """adapter_config.json + adapter_model.safetensors, in PEFT's layout."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    info = model.lora
    targets = sorted({n.rsplit(".", 1)[-1] for n in info["targets"]})
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(base),
        "r": info["r"], "lora_alpha": info["alpha"], "lora_dropout": info["dropout"],
        "target_modules": targets, "bias": "none", "fan_in_fan_out": False, "inference_mode": True,
        "init_lora_weights": True, "modules_to_save": None, "use_rslora": False, "use_dora": False,
    }
    save_file(adapter_state(model, state), str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")


def load_adapter(model: nn.Module, path: str | Path) -> nn.Module:
    """Put a PEFT-layout adapter (ours or PEFT's) on a model: apply_lora, then copy A and B."""
    path = Path(path)
    cfg_file, weights = path / "adapter_config.json", path / "adapter_model.safetensors"
    for f in (cfg_file, weights):
        if not f.is_file():
            raise FileNotFoundError(f"{f}: missing; not a LoRA adapter directory")
    c = json.loads(cfg_file.read_text())
    if c.get("peft_type") != "LORA":
        raise ValueError(f"{cfg_file}: peft_type {c.get('peft_type')!r} is not LORA")
    tm = c["target_modules"]
    apply_lora(model, c["r"], c["lora_alpha"], 0.0, ",".join(tm) if isinstance(tm, list) else tm)
    return load_adapter_weights(model, path)


def load_adapter_weights(model: nn.Module, path: str | Path) -> nn.Module:
    """Copy A and B from a PEFT-layout adapter_model.safetensors into a model that has its LoRA layers."""
    weights = Path(path) / "adapter_model.safetensors"
    state = load_file(str(weights))
    for name, m in lora_modules(model).items():
        for part in ("lora_A", "lora_B"):
            key = _peft_key(name, part, model.config)
            if key not in state:
                raise ValueError(f"{weights}: missing {key!r}")
            getattr(m, part).weight.data.copy_(state[key])
    return model
