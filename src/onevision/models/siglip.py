"""SigLIP vision tower (so400m-patch14-384 with the last layer dropped), as used by LLaVA-OneVision.

Reference: transformers SiglipVisionModel. Only the encoder layers needed for the requested feature
layers are run; post_layernorm exists (the checkpoints carry it) but is never applied to the features.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from onevision.config import SiglipVisionConfig
from onevision.models.attention import attend


def activation(name: str):
    table = {"gelu": F.gelu, "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"), "silu": F.silu,
             "relu": F.relu}
    if name not in table:
        raise ValueError(f"activation {name!r} is not supported; expected one of {sorted(table)}")
    return table[name]


class SiglipEmbeddings(nn.Module):
    def __init__(self, cfg: SiglipVisionConfig):
        super().__init__()
        self.patch_embedding = nn.Conv2d(cfg.num_channels, cfg.hidden_size, cfg.patch_size, cfg.patch_size)
        self.position_embedding = nn.Embedding(cfg.num_patches_per_side**2, cfg.hidden_size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        # (N, 3, 384, 384) -> (N, 1152, 27, 27) -> (N, 729, 1152)
        x = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))
        return x.flatten(2).transpose(1, 2) + self.position_embedding.weight


class SiglipAttention(nn.Module):
    def __init__(self, cfg: SiglipVisionConfig):
        super().__init__()
        d = cfg.hidden_size
        self.num_heads = cfg.num_attention_heads
        self.head_dim = d // self.num_heads
        self.k_proj, self.v_proj, self.q_proj, self.out_proj = (nn.Linear(d, d) for _ in range(4))
        self.impl = "sdpa"

    def forward(self, x: torch.Tensor, need_weights: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        b, n, _ = x.shape
        # (B, N, C) -> (B, heads, N, head_dim)
        q, k, v = (p(x).view(b, n, self.num_heads, self.head_dim).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        out, weights = attend(self.impl, q, k, v, None, False, self.head_dim**-0.5, need_weights)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, -1)), weights


class SiglipMLP(nn.Module):
    def __init__(self, cfg: SiglipVisionConfig):
        super().__init__()
        self.act = activation(cfg.hidden_act)
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SiglipEncoderLayer(nn.Module):
    def __init__(self, cfg: SiglipVisionConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = SiglipAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = SiglipMLP(cfg)

    def forward(self, x: torch.Tensor, need_weights: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        h, weights = self.self_attn(self.layer_norm1(x), need_weights)
        x = x + h
        return x + self.mlp(self.layer_norm2(x)), weights


class SiglipEncoder(nn.Module):
    def __init__(self, cfg: SiglipVisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(SiglipEncoderLayer(cfg) for _ in range(cfg.num_hidden_layers))


class SiglipVisionTower(nn.Module):
    """Returns the hidden states the caller asks for; layer index semantics are the reference's
    (0 = embeddings, i = output of layer i, -1 = output of the last layer)."""

    def __init__(self, cfg: SiglipVisionConfig):
        super().__init__()
        self.config = cfg
        self.embeddings = SiglipEmbeddings(cfg)
        self.encoder = SiglipEncoder(cfg)
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, pixel_values: torch.Tensor, layers: list[int] | None = None,
                output_attentions: bool = False) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
        """pixel_values (N, 3, H, W) -> (hidden states at `layers` (all when None), attention weights or None)."""
        state = self.begin(pixel_values, layers, output_attentions)
        self.advance(state)
        return state.outputs(), state.attentions

    def begin(self, pixel_values: torch.Tensor, layers: list[int] | None = None,
              output_attentions: bool = False) -> TowerPass:
        """Start a pass that `advance` runs a few layers at a time (the engine interleaves it with decoding)."""
        n_layers = len(self.encoder.layers)
        if layers is not None and any(not -(n_layers + 1) <= i <= n_layers for i in layers):
            raise ValueError(f"vision_feature_layer {layers} is out of range: the tower has {n_layers + 1} hidden "
                             f"states (indices {-(n_layers + 1)} to {n_layers})")
        wanted = list(range(n_layers + 1)) if layers is None else [i % (n_layers + 1) for i in layers]
        last = n_layers if output_attentions else max(wanted)
        x = self.embeddings(pixel_values)
        return TowerPass(x, wanted, last, {0: x} if 0 in wanted else {}, [] if output_attentions else None)

    def advance(self, state: TowerPass, max_layers: int | None = None) -> bool:
        """Run up to `max_layers` more layers (all when None); True once the pass is complete."""
        stop = state.last if max_layers is None else min(state.last, state.done + max_layers)
        for i in range(state.done + 1, stop + 1):
            x, weights = self.encoder.layers[i - 1](state.x, state.attentions is not None)
            if i in state.wanted:
                state.kept[i] = x  # only the requested layers stay alive
            if state.attentions is not None:
                state.attentions.append(weights)
            state.x, state.done = x, i  # progress per layer: an interrupted pass never runs a layer twice
        return state.finished


class TowerPass:
    """A vision tower pass in progress over a batch of tiles."""

    def __init__(self, x, wanted, last, kept, attentions):
        self.x, self.wanted, self.last, self.kept, self.attentions = x, wanted, last, kept, attentions
        self.done = 0  # layers run so far

    @property
    def finished(self) -> bool:
        return self.done >= self.last

    def outputs(self) -> list[torch.Tensor]:
        return [self.kept[i] for i in self.wanted]
