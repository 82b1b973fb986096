"""Where the parts of a decoder live: Llama, Qwen2, Qwen3, Mistral, SmolLM2, and the mixtures of
experts Qwen3-MoE and Mixtral.

All supported architectures share Hugging Face's module names for attention and for a dense
MLP, so one explicit map serves them; Qwen3's per-head q/k norms sit after the projections and
need no special handling. A mixture-of-experts layer keeps transformers' sparse block and router
(``mlp.gate``, left in 16 bits) but its experts, which transformers stores as two 3-D tensors,
are unfolded into one small MLP of three ``nn.Linear`` per expert (:func:`unfold_experts`), so
that every expert projection is a linear like any other: hooks, rotations, Hessians and solvers
need nothing special. What differs between MoE families (how their checkpoints name the block
and the projections, where the expert count lives) is a :class:`MoEFamily`: the next family is a
new entry there, not a copy of the pipeline.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

# Linears that share an input are solved together from one Hessian ("true sequential" order).
ATTENTION_GROUPS: tuple[tuple[str, ...], ...] = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
)
LINEAR_GROUPS: tuple[tuple[str, ...], ...] = ATTENTION_GROUPS + (
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)
LINEAR_NAMES: tuple[str, ...] = tuple(name for group in LINEAR_GROUPS for name in group)
EXPERT_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class MoEFamily:
    """How a mixture-of-experts architecture differs from the others: the checkpoint's names
    for the sparse block and for an expert's gate/up/down projections (Hugging Face's, which
    vLLM's loaders read), and the config field holding the number of experts."""

    block: str
    projections: tuple[str, str, str]
    num_experts: str


MOE_FAMILIES = {
    "Qwen3MoeForCausalLM": MoEFamily("mlp", ("gate_proj", "up_proj", "down_proj"), "num_experts"),
    "MixtralForCausalLM": MoEFamily("block_sparse_moe", ("w1", "w3", "w2"), "num_local_experts"),
}


@dataclass(frozen=True)
class AttentionShape:
    num_heads: int
    num_kv_heads: int
    head_dim: int


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    return model.model.layers


def attention_shape(config) -> AttentionShape:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return AttentionShape(config.num_attention_heads, config.num_key_value_heads, head_dim)


def moe_family(config) -> MoEFamily | None:
    architectures = getattr(config, "architectures", None) or []
    return MOE_FAMILIES.get(architectures[0]) if architectures else None


def is_moe_layer(layer: nn.Module) -> bool:
    return isinstance(getattr(layer.mlp, "experts", None), ExpertMLPs)


def num_experts(layer: nn.Module) -> int:
    return len(layer.mlp.experts) if is_moe_layer(layer) else 0


def expert_groups(e: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Expert e's two linear groups: gate/up (sharing the block's input) and down."""
    p = f"mlp.experts.{e}."
    return (p + "gate_proj", p + "up_proj"), (p + "down_proj",)


def linear_groups(layer: nn.Module) -> tuple[tuple[str, ...], ...]:
    """The layer's linear groups in calibration order: attention, then the dense MLP or each
    expert in turn (its gate/up, then its down)."""
    if not is_moe_layer(layer):
        return LINEAR_GROUPS
    return ATTENTION_GROUPS + tuple(g for e in range(num_experts(layer)) for g in expert_groups(e))


def layer_linears(layer: nn.Module) -> dict[str, nn.Linear]:
    """The quantized linears of a decoder layer, by their name inside the layer."""
    return {name: layer.get_submodule(name) for group in linear_groups(layer) for name in group}


def mlp_input_names(layer: nn.Module) -> tuple[str, ...]:
    """Everything reading post_attention_layernorm's output, by name in the layer: gate/up, or
    the router and every expert's gate/up (norm fusion and R1 fold into all of them)."""
    if not is_moe_layer(layer):
        return "mlp.gate_proj", "mlp.up_proj"
    return ("mlp.gate", *(name for e in range(num_experts(layer)) for name in expert_groups(e)[0]))


def mlp_output_names(layer: nn.Module) -> tuple[str, ...]:
    """The MLP's down projections (one per expert in a MoE layer), by name in the layer."""
    if not is_moe_layer(layer):
        return ("mlp.down_proj",)
    return tuple(expert_groups(e)[1][0] for e in range(num_experts(layer)))


def mlp_input_linears(layer: nn.Module) -> list[nn.Module]:
    return [layer.get_submodule(name) for name in mlp_input_names(layer)]


def mlp_output_linears(layer: nn.Module) -> list[nn.Linear]:
    return [layer.get_submodule(name) for name in mlp_output_names(layer)]


def router_names(model: nn.Module) -> list[str]:
    """Module names of the MoE routers, which stay in 16 bits (the scheme lists them in ignore)."""
    family = moe_family(model.config)
    return [checkpoint_name(model.config, f"model.layers.{i}.mlp.gate")
            for i, layer in enumerate(decoder_layers(model)) if is_moe_layer(layer)] if family else []


def checkpoint_name(config, name: str) -> str:
    """The checkpoint's name for a module or tensor of the model as rotq holds it: for a MoE
    family, its block and expert projection names (``mlp.experts.3.gate_proj`` ->
    ``block_sparse_moe.experts.3.w1`` for Mixtral); unchanged otherwise."""
    family = moe_family(config)
    if family is None or ".mlp.experts." not in name and not name.endswith((".mlp.gate", ".mlp.gate.weight")):
        return name
    head, _, tail = name.partition(".mlp.")
    parts = tail.split(".")
    if len(parts) >= 3 and parts[2] in EXPERT_PROJECTIONS:  # experts.{e}.{projection}...
        parts[2] = family.projections[EXPERT_PROJECTIONS.index(parts[2])]
    return ".".join([head, family.block, *parts])


class ExpertMLP(nn.Module):
    """One expert: act(gate_proj(x)) * up_proj(x) -> down_proj."""

    def __init__(self, hidden: int, intermediate: int, act_fn, dtype=None, device=None):
        super().__init__()
        kw = dict(bias=False, dtype=dtype, device=device)
        self.gate_proj = nn.Linear(hidden, intermediate, **kw)
        self.up_proj = nn.Linear(hidden, intermediate, **kw)
        self.down_proj = nn.Linear(intermediate, hidden, **kw)
        self.act_fn = act_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class ExpertMLPs(nn.ModuleList):
    """A sparse block's experts as separate MLPs, called as transformers calls its fused experts
    module: each token goes through the experts its router chose, weighted by their scores."""

    def forward(self, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(hidden)
        for e in top_k_index.unique().tolist():
            token, slot = torch.where(top_k_index == e)
            y = self[e](hidden[token]) * top_k_weights[token, slot, None]
            out.index_add_(0, token, y.to(out.dtype))
        return out


def unfold_experts(model: nn.Module) -> None:
    """Replace every MoE layer's fused experts (``gate_up_proj`` [E, 2I, d], ``down_proj``
    [E, d, I]) by :class:`ExpertMLPs` with their own copies of the weights (views would share
    storage, which safetensors refuses to save; the fused tensors are freed layer by layer; meta
    stays meta). A no-op on dense models and on layers already unfolded."""
    if moe_family(model.config) is None:
        return
    for layer in decoder_layers(model):
        fused = getattr(layer.mlp, "experts", None)
        if fused is None or isinstance(fused, ExpertMLPs):
            continue
        gate_up, down = fused.gate_up_proj, fused.down_proj
        E, two_i, d = gate_up.shape
        inter = two_i // 2
        experts = ExpertMLPs()
        for e in range(E):
            expert = ExpertMLP(d, inter, fused.act_fn, dtype=gate_up.dtype, device="meta")
            expert.gate_proj.weight = nn.Parameter(gate_up.data[e, :inter].clone(), requires_grad=False)
            expert.up_proj.weight = nn.Parameter(gate_up.data[e, inter:].clone(), requires_grad=False)
            expert.down_proj.weight = nn.Parameter(down.data[e].clone(), requires_grad=False)
            experts.append(expert)
        layer.mlp.experts = experts


def release_linears(layer: nn.Module) -> None:
    """Return the layer's linear weights to the meta device, freeing their memory (their
    integer form, or the checkpoint on disk, is what is used from then on)."""
    for lin in layer_linears(layer).values():
        lin.weight = nn.Parameter(torch.empty_like(lin.weight, device="meta"), requires_grad=False)
