"""A character-level MoE transformer in the spirit of makeMoE (seed 002), on torchmoe's modules.

Pre-norm decoder blocks: causal multi-head self-attention, then a sparse MoE feed-forward layer
(`torchmoe.nn.MoE` with a top-k or noisy top-k router, or `torchmoe.nn.SwitchMoE`), each with a
residual connection. The MoE layers' auxiliary losses (load balancing, router z-loss) are summed into
``aux_loss`` for the training objective.
"""
import math
from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .corpus import CharTokenizer

ROUTERS = ("topk", "noisy", "switch")


@dataclass
class ModelConfig:
    vocab_size: int
    n_embed: int = 128
    n_head: int = 8
    n_layer: int = 8
    block_size: int = 32
    num_experts: int = 8
    top_k: int = 2
    router: str = "noisy"
    capacity_factor: Optional[float] = 1.25  # None: dropless
    activation: str = "relu"  # makeMoE's experts are Linear-ReLU-Linear
    ff_mult: int = 4
    dropout: float = 0.0
    impl: str = "fused"  # "reference": the same layers through torchmoe.reference (plain PyTorch)

    def __post_init__(self):
        if self.router not in ROUTERS:
            raise ValueError(f"router must be one of {ROUTERS}, got {self.router!r}")
        if self.n_embed % self.n_head != 0:
            raise ValueError(f"n_embed ({self.n_embed}) must be divisible by n_head ({self.n_head})")
        if self.router == "switch":
            self.top_k = 1
        if not 0 < self.top_k <= self.num_experts:
            raise ValueError(f"top_k must be in [1, num_experts={self.num_experts}], got {self.top_k}")


def make_moe_layer(cfg: ModelConfig) -> nn.Module:
    from torchmoe import nn as moe_nn

    d_ff = cfg.ff_mult * cfg.n_embed
    # The capacity factor sizes the expert buffers of a training batch; a lone sequence (generation, where
    # the first step has a single token and capacity floor(k * 1.25 / E) = 0) must not lose its tokens.
    # min_capacity = block_size keeps every token of one sequence and leaves batches of many unchanged.
    min_capacity = cfg.block_size
    if cfg.router == "switch":
        return moe_nn.SwitchMoE(
            cfg.n_embed,
            d_ff,
            cfg.num_experts,
            capacity_factor=cfg.capacity_factor,
            activation=cfg.activation,
            min_capacity=min_capacity,
            impl=cfg.impl,
        )
    return moe_nn.MoE(
        cfg.n_embed,
        d_ff,
        cfg.num_experts,
        k=cfg.top_k,
        capacity_factor=cfg.capacity_factor,
        activation=cfg.activation,
        router=cfg.router,
        min_capacity=min_capacity,
        impl=cfg.impl,
    )


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.dropout = cfg.dropout
        self.qkv = nn.Linear(cfg.n_embed, 3 * cfg.n_embed)
        self.proj = nn.Linear(cfg.n_embed, cfg.n_embed)
        self.resid_drop = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor) -> Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0
        )
        return self.resid_drop(self.proj(y.transpose(1, 2).reshape(B, T, C)))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.n_embed)
        self.attn = CausalSelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.n_embed)
        self.moe = make_moe_layer(cfg)
        self.moe_drop = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.moe_drop(self.moe(self.ln2(x)))


class MoETransformer(nn.Module):
    """Character-level decoder-only transformer whose feed-forward layers are sparse MoE layers."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.n_embed)
        self.pos_emb = nn.Embedding(cfg.block_size, cfg.n_embed)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.n_layer)])
        self.ln_f = nn.LayerNorm(cfg.n_embed)
        self.lm_head = nn.Linear(cfg.n_embed, cfg.vocab_size)
        self._init_dense()

    def _init_dense(self) -> None:
        # GPT-2 style for the dense parts; the MoE layers keep their own initialisation.
        for emb in (self.tok_emb, self.pos_emb):
            nn.init.normal_(emb.weight, std=0.02)
        residual_std = 0.02 / math.sqrt(2 * self.cfg.n_layer)
        for block in self.blocks:
            nn.init.normal_(block.attn.qkv.weight, std=0.02)
            nn.init.zeros_(block.attn.qkv.bias)
            nn.init.normal_(block.attn.proj.weight, std=residual_std)
            nn.init.zeros_(block.attn.proj.bias)
        nn.init.normal_(self.lm_head.weight, std=0.02)
        nn.init.zeros_(self.lm_head.bias)

    def moe_layers(self) -> List[nn.Module]:
        return [block.moe for block in self.blocks]

    def forward(self, idx: Tensor, targets: Optional[Tensor] = None) -> Tuple[Tensor, Optional[Tensor], Tensor]:
        """Returns ``(logits [B, T, vocab], cross-entropy or None, summed MoE aux loss)``."""
        T = idx.shape[1]
        if T > self.cfg.block_size:
            raise ValueError(f"sequence length {T} exceeds block_size {self.cfg.block_size}")
        pos = torch.arange(T, device=idx.device)
        x = self.drop(self.tok_emb(idx) + self.pos_emb(pos))
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        aux = sum(layer.aux_loss for layer in self.moe_layers())
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
        return logits, loss, aux

    @torch.no_grad()
    def generate(
        self, idx: Tensor, max_new_tokens: int, temperature: float = 0.8, generator: Optional[torch.Generator] = None
    ) -> Tensor:
        """Samples ``max_new_tokens`` characters after ``idx [B, T]`` (sampling on the CPU, so a CPU
        ``generator`` makes it reproducible on any device)."""
        was_training = self.training
        self.eval()
        for _ in range(max_new_tokens):
            logits, _, _ = self(idx[:, -self.cfg.block_size :])
            probs = torch.softmax(logits[:, -1].float().cpu() / temperature, dim=-1)
            nxt = torch.multinomial(probs, 1, generator=generator).to(idx.device)
            idx = torch.cat([idx, nxt], dim=1)
        self.train(was_training)
        return idx


def save_checkpoint(path: str, model: MoETransformer, tokenizer: CharTokenizer, **extra: Any) -> None:
    state = {
        "config": asdict(model.cfg),
        "vocab": tokenizer.chars,
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }
    state.update(extra)
    torch.save(state, path)


def load_checkpoint(
    path: str, device: str = "cpu", impl: Optional[str] = None
) -> Tuple[MoETransformer, CharTokenizer, Dict[str, Any]]:
    """Builds a fresh model from a checkpoint's config and loads its weights (strictly)."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    config = dict(state["config"])
    if impl is not None:
        config["impl"] = impl
    model = MoETransformer(ModelConfig(**config))
    model.load_state_dict(state["model"], strict=True)
    return model.to(device), CharTokenizer(state["vocab"]), state
