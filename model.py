"""The LLaMA family (Llama-2, Llama-3, Mistral) in plain PyTorch, and C-RLFT's fused weighted loss.

Read top to bottom:
  1. ModelConfig and its named presets; the default device and dtype.
  2. The blocks: RMSNorm, RoPE, attention (packed stream, padded batch, KV cache), SwiGLU MLP.
  3. Transformer: one forward for the three uses (training on packed streams, a padded batch,
     decoding), Hugging Face checkpoints (safetensors only), new special tokens' rows.
  4. The weighted loss Σ w·CE (METHOD.md §3): written plainly, then fused, never materialising the
     [N, V] logits. The method's second hop.
  5. Hugging Face config.json and safetensors files.

Parameter names are those of Hugging Face's LlamaForCausalLM without the "model." prefix, so loading
a checkpoint is a copy by name. This file runs on one device; parallelism belongs to train.py.
"""

import inspect
import math
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from files import read_json, write_atomically, write_json

try:  # flash attention over cu_seqlens (torch >= 2.10); used on CUDA for packed streams
    from torch.nn.attention.varlen import varlen_attn
except ImportError:
    varlen_attn = None
# torch 2.11's varlen_attn has no enable_gqa (torch 2.13 does): there we repeat the K/V heads.
VARLEN_HAS_GQA = (varlen_attn is not None
                  and "enable_gqa" in inspect.signature(varlen_attn).parameters)

# --------------------------------------------------------------------------------------------------
# 1. Configuration


@dataclass
class ModelConfig:
    vocab_size: int = 32000
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int = 32  # < n_heads: grouped-query attention
    ffn_dim: int = 11008
    head_dim: int | None = None  # None: dim // n_heads
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # Llama-3.1's "llama3" rope scaling: factor, low_freq_factor, high_freq_factor,
    # original_max_position_embeddings
    rope_scaling: dict | None = None
    max_seq_len: int = 4096
    sliding_window: int | None = None  # Mistral: a token sees itself and window - 1 tokens before
    tie_embeddings: bool = False
    # Rows of the embedding and the output head in memory: vocab_size rounded up to a multiple of
    # this, for aligned matmuls on a GPU (32,001 rows would not be): padded_vocab_size. The logits
    # and the exports have vocab_size rows.
    vocab_multiple: int = 1
    architecture: str = "LlamaForCausalLM"  # or Mistral's, Qwen2's: what config.json names
    bos_token_id: int | list[int] | None = 1
    eos_token_id: int | list[int] | None = 2

    def __post_init__(self):
        if self.head_dim is None:
            self.head_dim = self.dim // self.n_heads
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} is not a multiple of "
                             f"n_kv_heads={self.n_kv_heads}")
        if self.architecture not in HF_MODEL_TYPES:
            raise ValueError(f"architecture {self.architecture!r} is not one of "
                             f"{sorted(HF_MODEL_TYPES)}")
        if self.sliding_window is not None and self.architecture != "MistralForCausalLM":
            raise ValueError("a sliding window needs architecture MistralForCausalLM")

    @property
    def attention_bias(self) -> bool:
        """Biases on the q, k and v projections: Qwen2's architecture has them (its config.json
        does not say so)."""
        return self.architecture == "Qwen2ForCausalLM"

    @property
    def padded_vocab_size(self) -> int:
        return -(-self.vocab_size // self.vocab_multiple) * self.vocab_multiple

    @classmethod
    def from_name(cls, name: str, **overrides) -> "ModelConfig":
        if name not in MODELS:
            raise ValueError(f"unknown model {name!r}; models: {', '.join(MODELS)}")
        return cls(**{**MODELS[name], **overrides})


HF_MODEL_TYPES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral",
                  "Qwen2ForCausalLM": "qwen2"}
_LLAMA3_ROPE = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                    original_max_position_embeddings=8192)
MODELS = {
    # Tests and demos: small enough for a CPU, each variation of the family switched on somewhere.
    "tiny": dict(vocab_size=320, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=176,
                 max_seq_len=512),
    "tiny-mistral": dict(vocab_size=320, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=176,
                         max_seq_len=512, sliding_window=16, architecture="MistralForCausalLM"),
    "tiny-qwen2": dict(vocab_size=320, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=176,
                       max_seq_len=512, rope_theta=1e6, norm_eps=1e-6,
                       architecture="Qwen2ForCausalLM"),
    "demo": dict(vocab_size=401, dim=128, n_layers=4, n_heads=4, n_kv_heads=4, ffn_dim=384,
                 max_seq_len=256),
    # The real shapes, as their Hugging Face config.json files give them.
    "TinyLlama-1.1B": dict(dim=2048, n_layers=22, n_heads=32, n_kv_heads=4, ffn_dim=5632,
                           max_seq_len=2048),
    "Llama-2-7B": dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, ffn_dim=11008),
    "Llama-2-13B": dict(dim=5120, n_layers=40, n_heads=40, n_kv_heads=40, ffn_dim=13824),
    "Mistral-7B": dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim=14336,
                       max_seq_len=32768, sliding_window=4096, architecture="MistralForCausalLM"),
    "Llama-3-8B": dict(vocab_size=128256, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8,
                       ffn_dim=14336, rope_theta=500000.0, max_seq_len=8192, bos_token_id=128000,
                       eos_token_id=128001),
    "Llama-3.1-8B": dict(vocab_size=128256, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8,
                         ffn_dim=14336, rope_theta=500000.0, rope_scaling=_LLAMA3_ROPE,
                         max_seq_len=131072, bos_token_id=128000, eos_token_id=128001),
    "Qwen2.5-7B": dict(vocab_size=152064, dim=3584, n_layers=28, n_heads=28, n_kv_heads=4,
                       ffn_dim=18944, rope_theta=1e6, norm_eps=1e-6, max_seq_len=131072,
                       architecture="Qwen2ForCausalLM",
                       bos_token_id=151643, eos_token_id=151643),
}


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 on a GPU; float32 on a CPU, where bf16 matmuls mostly run through a slow fallback."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


# --------------------------------------------------------------------------------------------------
# 2. The blocks


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # Normalise in float32, scale in the input dtype: as the reference Llama (bf16 matches).
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


def rope_inv_freq(cfg: ModelConfig, device) -> torch.Tensor:
    """The rotary frequencies θ^(-2i/d), with Llama-3.1's "llama3" rescaling of the long
    wavelengths. Computed in float32 at each forward (a few tiny kernels) rather than kept as a
    buffer, which model.to(torch.bfloat16) would round and the meta device would leave empty."""
    d = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, device=device).float() / d))
    if cfg.rope_scaling is None:
        return inv_freq
    s = cfg.rope_scaling
    old_len = s["original_max_position_embeddings"]
    low, high, factor = s["low_freq_factor"], s["high_freq_factor"], s["factor"]
    wavelen = 2 * math.pi / inv_freq
    # Wavelengths longer than old_len/low are slowed down by `factor`, shorter than old_len/high
    # kept, and those in between interpolated smoothly.
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(is_medium, smoothed, scaled)


def apply_rope(x, cos, sin):
    """x [B, T, heads, hd]; cos, sin [B, T, hd]: the pairs (i, i + hd/2) rotated (HF's layout)."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return x * cos[:, :, None] + rotated * sin[:, :, None]


def attention_mask(q_pos, k_pos, window: int | None):
    """bool [B, 1, T, S]: a query at q_pos sees a key at k_pos <= q_pos, inside the window."""
    d = q_pos[:, :, None] - k_pos[:, None, :]  # [B, T, S]
    visible = d >= 0
    if window is not None:
        visible &= d < window
    return visible[:, None]


def varlen_attention(q, k, v, cu_seqlens, max_seqlen: int, window: int | None):
    """Flash attention over a packed stream: q [N, nh, hd], k, v [N, nkv, hd] → [N, nh, hd],
    causal inside each conversation of cu_seqlens (int32 [S+1])."""
    gqa = {}
    if k.shape[1] != q.shape[1]:
        if VARLEN_HAS_GQA:
            gqa = {"enable_gqa": True}
        else:  # torch 2.11
            k, v = repeat_kv(k, v, q.shape[1], dim=1)
    window_size = (-1 if window is None else window - 1, 0)  # (left, right); right 0 = causal
    return varlen_attn(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen,
                       window_size=window_size, **gqa)


def repeat_kv(k, v, n_heads: int, dim: int):
    """Grouped-query attention by copying: each K/V head repeated for its group of query heads
    (query head h uses K/V head h // (n_heads / n_kv_heads)), for kernels that take as many K/V
    heads as query heads."""
    n_rep = n_heads // k.shape[dim]
    return k.repeat_interleave(n_rep, dim=dim), v.repeat_interleave(n_rep, dim=dim)


@dataclass
class AttentionInputs:
    """What every layer's attention needs besides its own q, k, v; built once per forward. Three
    paths: flash varlen over a packed stream (cu_seqlens), a packed stream run as a padded batch of
    its conversations (rows, valid), and plain SDPA over the batch or the KV cache (mask only)."""
    cos: torch.Tensor  # [B, T, hd] rotary tables at each token's position
    sin: torch.Tensor
    positions: torch.Tensor  # [B, T] each token's position: where its K/V go in a KV cache
    mask: torch.Tensor | None = None  # bool [B, 1, T, S]: which keys each query sees (SDPA)
    cu_seqlens: torch.Tensor | None = None  # int32 [S + 1], with max_seqlen: flash varlen
    max_seqlen: int | None = None
    rows: torch.Tensor | None = None  # [S, L]: the stream index of position j of conversation s
    valid: torch.Tensor | None = None  # bool [S, L]: j < that conversation's length
    cache_rows: torch.Tensor | None = None  # [B]: the KV cache rows of the batch's rows (sample.py)


class KVCache(nn.Module):
    """A static cache: K/V of position p of row b live at [b, p]; later slots are masked."""

    def __init__(self, batch_size, max_seq_len, n_kv_heads, head_dim, dtype, device):
        super().__init__()
        shape = (batch_size, max_seq_len, n_kv_heads, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, positions, k, v, rows=None):
        """Writes k, v [B, T, nkv, hd] at positions [B, T] of the cache rows `rows` [B] (default:
        the first B); returns those rows of the cache, [B, S, nkv, hd]."""
        B = k.shape[0]
        index = torch.arange(B, device=k.device) if rows is None else rows
        self.k[index[:, None], positions] = k
        self.v[index[:, None], positions] = v
        if rows is None:  # the first B rows: the cache's own storage, no copy
            return self.k[:B], self.v[:B]
        return self.k[rows], self.v[rows]  # a prefill into rows beside others being decoded


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.window = cfg.sliding_window
        bias = cfg.attention_bias
        self.q_proj = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=bias)
        self.k_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=bias)
        self.v_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=bias)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)
        self.kv_cache: KVCache | None = None

    def forward(self, x, a: AttentionInputs):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim)
        q, k = apply_rope(q, a.cos, a.sin), apply_rope(k, a.cos, a.sin)
        if a.cu_seqlens is not None:  # a packed stream (B = 1) on CUDA
            y = varlen_attention(q[0], k[0], v[0], a.cu_seqlens, a.max_seqlen, self.window)[None]
        elif a.rows is not None:  # a packed stream elsewhere: its conversations as a batch's rows
            y = self.sdpa(q[0][a.rows], k[0][a.rows], v[0][a.rows], a.mask)[a.valid][None]
        else:
            if self.kv_cache is not None:
                k, v = self.kv_cache.update(a.positions, k, v, a.cache_rows)  # [B, S, nkv, hd]
            y = self.sdpa(q, k, v, a.mask)
        return self.o_proj(y.reshape(B, T, -1))

    def sdpa(self, q, k, v, mask):
        """q [B, T, nh, hd], k, v [B, S, nkv, hd] → [B, T, nh, hd]. On CUDA, SDPA has no fused
        kernel for a mask with enable_gqa (torch 2.11-2.13: the math backend, fp32 [B, H, T, S]
        scores), so there the K/V heads are repeated instead; on CPU the fused kernel takes both."""
        gqa = self.n_kv_heads != self.n_heads
        if gqa and q.is_cuda:
            k, v = repeat_kv(k, v, self.n_heads, dim=2)
            gqa = False
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           attn_mask=mask, enable_gqa=gqa)
        return y.transpose(1, 2)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.up_proj = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.down_proj = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # SwiGLU


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, a: AttentionInputs):
        x = x + self.self_attn(self.input_layernorm(x), a)
        return x + self.mlp(self.post_attention_layernorm(x))


# --------------------------------------------------------------------------------------------------
# 3. The model


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.lm_head = nn.Linear(config.dim, config.vocab_size, bias=False)
        padding_rows = config.padded_vocab_size - config.vocab_size
        if padding_rows:  # added after being built: the same random draws as without
            for module in (self.embed_tokens, self.lm_head):
                padding = module.weight.new_zeros(padding_rows, config.dim)
                module.weight = nn.Parameter(torch.cat([module.weight.detach(), padding]))
            self.embed_tokens.num_embeddings = config.padded_vocab_size
            self.lm_head.out_features = config.padded_vocab_size
        if config.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.init_weights()

    @torch.no_grad()
    def init_weights(self):
        """Random weights for training from scratch. A model built on the meta device has no
        values: call this after `to_empty(device=...)` (from_pretrained fills them instead)."""
        for module in self.modules():
            if isinstance(module, nn.Linear) and module.bias is not None:  # Qwen2's q, k, v
                module.bias.zero_()
            if isinstance(module, (nn.Linear, nn.Embedding)):
                vocabulary = module in (self.embed_tokens, self.lm_head)
                rows = module.weight[:self.config.vocab_size] if vocabulary else module.weight
                nn.init.normal_(rows, std=0.02)
                if vocabulary:  # padding rows: never looked up, never predicted
                    module.weight[self.config.vocab_size:].zero_()
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)

    def to_empty(self, *, device, recurse=True):
        super().to_empty(device=device, recurse=recurse)
        if self.config.tie_embeddings:  # to_empty makes new parameter objects: tie them again
            self.lm_head.weight = self.embed_tokens.weight
        return self

    def setup_kv_cache(self, batch_size: int, max_seq_len: int | None = None):
        """Gives every layer a static KV cache; then forward(tokens, positions), both [B, T],
        decodes incrementally: each token's K/V are stored at its position and it attends to the
        stored positions up to its own."""
        p = self.lm_head.weight
        c = self.config
        for layer in self.layers:
            layer.self_attn.kv_cache = KVCache(batch_size, max_seq_len or c.max_seq_len,
                                               c.n_kv_heads, c.head_dim, p.dtype, p.device)

    def drop_kv_cache(self):
        """Back to plain forward passes (a packed stream, training) after decoding with a cache."""
        for layer in self.layers:
            layer.self_attn.kv_cache = None

    def forward(self, tokens, positions=None, cu_seqlens=None, max_seqlen=None, targets=None,
                target_weights=None, supervised=None):
        """Three uses of one forward:
        - padded batch: tokens [B, T], each row a sequence from position 0 → logits [B, T, V];
        - packed stream: tokens [N], positions [N] restarting at 0 for each conversation, cu_seqlens
          (int32 [S+1], the conversation boundaries), optionally max_seqlen → logits [N, V];
        - decoding after setup_kv_cache: tokens [B, T] at positions [B, T] → logits [B, T, V].
        With targets and target_weights (the shape of tokens), return instead the fused loss (Σ
        w·CE, and per token CE and [argmax = target], flat [N]): the [N, V] logits are never
        materialised. `supervised`: the flat indices of the tokens with w ≠ 0, if known, which
        spares the loss a host sync."""
        x = self.hidden_states(tokens, positions, cu_seqlens, max_seqlen)
        if targets is None:
            return self.logits(x)
        # The output weight is read here, inside the forward of the module that owns it: under
        # FSDP2 it is then the gathered (unsharded) parameter, and autograd takes its gradient back.
        return fused_weighted_cross_entropy(x.flatten(0, -2), self.lm_head.weight,
                                            targets.flatten(), target_weights.flatten(),
                                            supervised, vocab_size=self.config.vocab_size)

    def logits(self, x):
        """The output head on final hidden states: logits over the vocabulary, not its padding."""
        logits = self.lm_head(x)
        if self.config.padded_vocab_size == self.config.vocab_size:
            return logits
        return logits[..., :self.config.vocab_size]

    def hidden_states(self, tokens, positions=None, cu_seqlens=None, max_seqlen=None,
                      cache_rows=None):
        """The final normalised hidden states, [B, T, D] or [N, D]: forward without the output
        head, for callers that need a few positions' logits only (sample.py: each prompt's last).
        cache_rows [B]: the KV cache rows a batch of prompts is written into (default: the first
        B), so that prompts can join rows that are being decoded."""
        packed = tokens.dim() == 1
        if packed:
            if positions is None or cu_seqlens is None:
                raise ValueError("a packed stream (tokens [N]) needs positions and cu_seqlens")
            tokens, positions = tokens[None], positions[None]  # the stream is a batch of one
        elif positions is None:
            positions = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
        x = self.embed_tokens(tokens)
        a = self.attention_inputs(positions, x.dtype, cu_seqlens if packed else None, max_seqlen,
                                  cache_rows)
        for layer in self.layers:
            x = layer(x, a)
        x = self.norm(x)
        return x[0] if packed else x

    def attention_inputs(self, positions, dtype, cu_seqlens, max_seqlen,
                         cache_rows=None) -> AttentionInputs:
        inv_freq = rope_inv_freq(self.config, positions.device)
        angles = positions.float()[..., None] * inv_freq  # [B, T, hd/2]
        angles = torch.cat((angles, angles), dim=-1)
        cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
        cache = self.layers[0].self_attn.kv_cache
        window = self.config.sliding_window
        if cu_seqlens is None:  # padded batch (the keys are its tokens) or decoding (the cache's)
            k_pos = positions
            if cache is not None:
                k_pos = torch.arange(cache.k.shape[1], device=positions.device)[None]
            mask = attention_mask(positions, k_pos, window)
            return AttentionInputs(cos, sin, positions, mask=mask, cache_rows=cache_rows)
        if cache is not None:
            raise ValueError("a packed stream cannot run through a KV cache: drop_kv_cache() first")
        lengths = cu_seqlens[1:] - cu_seqlens[:-1]
        if max_seqlen is None:
            max_seqlen = int(lengths.max())  # a host sync: pass max_seqlen if you can
        half = dtype in (torch.bfloat16, torch.float16)
        if positions.is_cuda and half and varlen_attn is not None:
            return AttentionInputs(cos, sin, positions, cu_seqlens=cu_seqlens,
                                   max_seqlen=max_seqlen)
        # Elsewhere (CPU, float32): each conversation becomes a row of a padded batch. Causality
        # alone keeps a real query away from the padding, which only ever follows it.
        j = torch.arange(max_seqlen, device=positions.device)
        # [S, L]; the padding past a conversation's end reads a real token, never attended to
        rows = (cu_seqlens[:-1, None] + j).clamp(max=positions.shape[1] - 1)
        return AttentionInputs(cos, sin, positions, mask=attention_mask(j[None], j[None], window),
                               rows=rows, valid=j < lengths[:, None])

    # ----------------------------------------------------------------------------------------------
    # Checkpoints in the Hugging Face format (safetensors only) and special tokens

    @classmethod
    def from_pretrained(cls, path, device="cpu", dtype=torch.float32) -> "Transformer":
        """Loads a Hugging Face folder (config.json + model.safetensors or indexed shards), built on
        the meta device and filled one tensor at a time: never two copies of the weights."""
        path = Path(path)
        config = config_from_hf(read_json(path / "config.json"), path / "config.json")
        with torch.device("meta"):
            model = cls(config).to(dtype)
        model.to_empty(device=device)
        params = dict(model.named_parameters())  # tied weights appear once, as embed_tokens.weight
        loaded = set()
        shapes = {n: p.shape for n, p in params.items()}
        with torch.no_grad():
            for file, hf_name, f in iter_checkpoint(path):
                name = checked_parameter_name(file, hf_name, f, shapes, config)
                if name is not None:
                    params[name].copy_(f.get_tensor(hf_name))
                    loaded.add(name)
        check_all_loaded(path, params, loaded)
        return model

    def save_pretrained(self, path, dtype=None, max_shard_bytes=5_000_000_000):
        """Writes config.json and model.safetensors, or model-0000k-of-0000n.safetensors shards of
        at most max_shard_bytes with model.safetensors.index.json, as transformers and vLLM read."""
        params = dict(self.named_parameters())  # a tied lm_head is not saved, as transformers does
        write_hf_checkpoint(path, self.config, {n: p.shape for n, p in params.items()},
                            lambda n: params[n].detach(), dtype or self.lm_head.weight.dtype,
                            max_shard_bytes)

    @torch.no_grad()
    def extend_vocab(self, vocab_size: int):
        """Appends rows for new special tokens (METHOD.md §2: <|end_of_turn|>, pads) to the input
        embedding and the output head; each new row starts as the mean of its matrix's rows."""
        old = self.config.vocab_size
        if vocab_size < old:
            raise ValueError(f"cannot shrink the vocabulary from {old} to {vocab_size}")
        self.embed_tokens.weight = extend_rows(self.embed_tokens.weight, vocab_size)
        self.embed_tokens.num_embeddings = vocab_size
        if self.config.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        else:
            self.lm_head.weight = extend_rows(self.lm_head.weight, vocab_size)
        self.lm_head.out_features = vocab_size
        self.config = replace(self.config, vocab_size=vocab_size)


def extend_rows(weight: torch.Tensor, n_rows: int) -> nn.Parameter:
    new = weight.new_empty(n_rows, weight.shape[1])
    new[: len(weight)] = weight
    new[len(weight):] = weight.mean(0, dtype=torch.float32).to(weight.dtype)
    return nn.Parameter(new, requires_grad=weight.requires_grad)


# --------------------------------------------------------------------------------------------------
# 4. The weighted loss (METHOD.md §3): the numerator Σ_t w_t·CE_t; train.py divides it by the
# step's global Σ w (METHOD.md §4)


def weighted_cross_entropy(logits, targets, target_weights):
    """Σ_t w_t·CE_t written plainly, from the full logits [N, V]: the formula the fused loss below
    computes without ever holding them. What tests hold it to, and bench.py's baseline."""
    return (target_weights * F.cross_entropy(logits, targets, reduction="none")).sum()


# Supervised tokens per chunk: memory against speed. A chunk of C tokens holds its logits in
# float32, turned in place into their gradient, and for bf16 inputs a bf16 copy for the matmuls:
# 6·C·V bytes, 197 MB at C = 1024 and V = 32,000 (788 MB at V = 128,256). For a bf16 head each
# chunk also adds its [V, H] weight-gradient product into a float32 accumulator: on CUDA the matmul
# does it (addmm with a float32 output: 8·V·H bytes read and written per chunk); on the CPU, which
# has no such matmul, through a bf16 product (12·V·H bytes). Either is amortised over the chunk's
# 6·C·V·H matmul FLOPs, so smaller chunks spend relatively more time on the accumulator. At C = 1024
# the matmuls, [1024, H] × [H, V], run at full tensor-core speed (bench.py loss on an H200: 0.94×
# the naive time at V = 32,000, 0.84× at 128,256, with 30% zero-weight tokens).
CHUNK_TOKENS = 1024


class FusedWeightedCrossEntropy(torch.autograd.Function):
    """Σ_t w_t·CE(h_t · headᵀ, y_t) over the tokens with w_t ≠ 0, a chunk of them at a time, with
    each token's CE and [argmax h_t · headᵀ = y_t] for statistics. The gradients are computed in
    the same pass (the logits exist only there) and handed to autograd in backward, scaled by the
    incoming gradient."""

    @staticmethod
    def forward(ctx, hidden, head, targets, target_weights, supervised, need_grad, chunk_tokens,
                vocab_size):
        # hidden [N, H], head [V, H], targets [N] (any value where w = 0), target_weights [N],
        # supervised: the indices of the tokens with w ≠ 0, the only ones computed
        cdt = torch.promote_types(hidden.dtype, torch.float32)  # float64 for float64 inputs
        ce = torch.zeros(len(hidden), dtype=cdt, device=hidden.device)
        correct = torch.zeros(len(hidden), dtype=cdt, device=hidden.device)
        if need_grad:
            grad_hidden = torch.zeros_like(hidden)
            grad_head = torch.zeros_like(head, dtype=cdt)  # float32 accumulator for a bf16 head
        for start in range(0, len(supervised), chunk_tokens):
            idx = supervised[start:start + chunk_tokens]
            h = hidden[idx]  # [C, H]
            y = targets[idx]  # [C]
            w = target_weights[idx].to(cdt)  # [C]
            logits = (h @ head.T).to(cdt)  # [C, V], the only chunk-sized buffer (updated in place)
            logits[:, vocab_size:] = float("-inf")  # the head's padding rows: no token
            target_logit = logits.gather(1, y[:, None]).squeeze(1)
            row_max, argmax = logits.max(dim=1)
            correct[idx] = (argmax == y).to(cdt)
            exp = logits.sub_(row_max[:, None]).exp_()
            sum_exp = exp.sum(dim=1)
            ce[idx] = row_max + sum_exp.log() - target_logit  # CE = logsumexp(z) − z_y
            if not need_grad:
                continue
            # dCE/dz = softmax(z) − onehot(y), each token's row times its weight w.
            g = exp.mul_((w / sum_exp)[:, None])
            g[torch.arange(len(idx), device=g.device), y] -= w
            g = g.to(hidden.dtype)
            grad_hidden[idx] = g @ head  # [C, H]
            if head.dtype == cdt:
                grad_head.addmm_(g.T, h)
            elif head.is_cuda:  # the bf16 product accumulated in float32 by the matmul (C += A·B)
                torch.addmm(grad_head, g.T, h, out_dtype=cdt, out=grad_head)
            else:  # a CPU matmul has no float32 output from bf16 inputs: add the bf16 product
                grad_head += g.T @ h
        ctx.mark_non_differentiable(ce, correct)
        if need_grad:
            ctx.save_for_backward(grad_hidden, grad_head.to(head.dtype))
        return (target_weights.to(cdt) * ce).sum(), ce, correct

    @staticmethod
    def backward(ctx, grad_loss, _grad_ce, _grad_correct):
        grad_hidden, grad_head = ctx.saved_tensors
        # In place: the saved gradients are used once (autograd refuses a second backward).
        grad_hidden.mul_(grad_loss.to(grad_hidden.dtype))
        grad_head.mul_(grad_loss.to(grad_head.dtype))
        return grad_hidden, grad_head, None, None, None, None, None, None


def fused_weighted_cross_entropy(hidden, head, targets, target_weights, supervised=None,
                                 chunk_tokens=CHUNK_TOKENS, vocab_size=None):
    """Σ w·CE of the logits hidden @ head.T without materialising them, and per token [N] its CE
    and [argmax = target] (0 where w = 0), all in float32 (float64 for float64 inputs).

    hidden [N, H] and head [V, H] share a dtype; targets [N] int; target_weights [N] ≥ 0, zero for
    every token that is not supervised (its target is never read). Only the sum is
    differentiable. supervised: the indices of the tokens with w ≠ 0 when the caller knows them
    (train.py does, from the data); finding them here is a host sync, as the number of chunks
    depends on it. vocab_size: the rows of head that are tokens, when the others pad it
    (ModelConfig.vocab_multiple)."""
    if hidden.dtype != head.dtype:
        raise TypeError(f"hidden states are {hidden.dtype} but the output head is {head.dtype}")
    if supervised is None:
        supervised = target_weights.nonzero().squeeze(1)
    need_grad = torch.is_grad_enabled() and (hidden.requires_grad or head.requires_grad)
    vocab_size = len(head) if vocab_size is None else vocab_size
    return FusedWeightedCrossEntropy.apply(hidden, head, targets, target_weights, supervised,
                                           need_grad, chunk_tokens, vocab_size)


# --------------------------------------------------------------------------------------------------
# 5. Hugging Face config.json and safetensors files


def config_from_hf(hf: dict, source) -> ModelConfig:
    """Our config from a Hugging Face config.json (transformers 4 or 5 layout); refuses what we do
    not implement rather than loading it wrong."""
    arch = (hf.get("architectures") or [None])[0]
    if arch not in HF_MODEL_TYPES:
        raise ValueError(f"{source}: architectures {hf.get('architectures')!r} is not supported; "
                         f"this model implements {' and '.join(HF_MODEL_TYPES)}")
    # Qwen2's config.json names a sliding_window that it uses only with use_sliding_window.
    qwen2 = arch == "Qwen2ForCausalLM"
    for key, expected in (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False),
                          ("use_sliding_window", False)):
        if hf.get(key, expected) != expected:
            raise ValueError(f"{source}: {key}={hf[key]!r} is not supported (only {expected!r})")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}  # transformers 5 or 4
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "llama3"):
        raise ValueError(f"{source}: rope type {rope_type!r} is not supported (default, llama3)")
    return ModelConfig(
        vocab_size=hf["vocab_size"], dim=hf["hidden_size"], n_layers=hf["num_hidden_layers"],
        n_heads=hf["num_attention_heads"],
        n_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        ffn_dim=hf["intermediate_size"], head_dim=hf.get("head_dim"),
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        rope_theta=rope.get("rope_theta", hf.get("rope_theta", 10000.0)),
        rope_scaling=({k: rope[k] for k in _LLAMA3_ROPE} if rope_type == "llama3" else None),
        max_seq_len=hf.get("max_position_embeddings", 4096),
        sliding_window=None if qwen2 else hf.get("sliding_window"),
        tie_embeddings=hf.get("tie_word_embeddings", False), architecture=arch,
        bos_token_id=hf.get("bos_token_id"), eos_token_id=hf.get("eos_token_id"))


def config_to_hf(cfg: ModelConfig, dtype: torch.dtype) -> dict:
    """The config.json transformers and vLLM read (transformers 4's keys, which 5 reads too)."""
    hf = {
        "architectures": [cfg.architecture], "model_type": HF_MODEL_TYPES[cfg.architecture],
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.dim, "intermediate_size": cfg.ffn_dim,
        "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim, "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": cfg.rope_scaling and {"rope_type": "llama3", **cfg.rope_scaling},
        "tie_word_embeddings": cfg.tie_embeddings, "attention_bias": False, "mlp_bias": False,
        "bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }
    if cfg.architecture == "MistralForCausalLM":
        hf["sliding_window"] = cfg.sliding_window
    if cfg.architecture == "Qwen2ForCausalLM":  # its q, k, v biases: implied by the architecture
        del hf["attention_bias"], hf["mlp_bias"]
        hf.update(use_sliding_window=False, sliding_window=None)
    return hf


def hf_tensor_name(name: str) -> str:
    return name if name.startswith("lm_head.") else "model." + name


def write_hf_checkpoint(path, config: ModelConfig, shapes: dict, fetch, dtype,
                        max_shard_bytes=5_000_000_000, write=True):
    """The files of save_pretrained for parameters given by name and shape, fetch(name) returning
    one parameter's full value at a time, so only one shard is ever in memory. (train.py gathers
    FSDP shards in fetch on every rank; only the rank with write=True writes.) Each file is written
    under a temporary name and renamed into place; stale shards of an earlier save in the folder
    go. Padding rows of the vocabulary (ModelConfig.vocab_multiple) stay behind: the files have
    vocab_size rows."""
    path = Path(path)
    vocabulary = ("embed_tokens.weight", "lm_head.weight")
    shapes = {n: (config.vocab_size, *s[1:]) if n in vocabulary else tuple(s)
              for n, s in shapes.items()}
    itemsize = torch.empty((), dtype=dtype).element_size()
    shards, size = [[]], 0
    for name, shape in shapes.items():
        nbytes = math.prod(shape) * itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    files = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    if write:
        path.mkdir(parents=True, exist_ok=True)
    weight_map = {}
    for file, shard in zip(files, shards):
        tensors = {hf_tensor_name(n): fetch(n)[:shapes[n][0]].to("cpu", dtype).contiguous()
                   for n in shard}
        if write:
            write_atomically(path / file,
                             lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
        weight_map.update(dict.fromkeys(tensors, file))
    if not write:
        return
    written = set(files)
    if len(files) > 1:
        index = {"metadata": {"total_size": sum(math.prod(s) for s in shapes.values()) * itemsize},
                 "weight_map": weight_map}
        write_json(path / "model.safetensors.index.json", index)
        written.add("model.safetensors.index.json")
    for stale in path.glob("model*.safetensors*"):
        if stale.name not in written:
            stale.unlink()
    write_json(path / "config.json", config_to_hf(config, dtype))


def checkpoint_files(path: Path) -> list[Path]:
    single, index = path / "model.safetensors", path / "model.safetensors.index.json"
    if single.exists():
        return [single]
    if not index.exists():
        raise FileNotFoundError(f"{path}: neither model.safetensors nor "
                                f"model.safetensors.index.json (pickle .bin checkpoints are not "
                                f"read: convert them to safetensors)")
    weight_map = read_json(index).get("weight_map")
    if not isinstance(weight_map, dict):
        raise ValueError(f"{index}: no 'weight_map' object")
    files = [path / name for name in sorted(set(weight_map.values()))]
    for file in files:
        if not file.exists():
            raise FileNotFoundError(f"{index} lists {file.name}, which is missing")
    return files


def iter_checkpoint(path):
    """Yields (file, Hugging Face tensor name, open safetensors file) shard after shard; read the
    tensor with f.get_tensor(name), or only some of its rows with f.get_slice(name)[a:b]."""
    for file in checkpoint_files(Path(path)):
        try:
            opened = safe_open(file, framework="pt")
        except Exception as e:  # safetensors' own SafetensorError: a truncated or damaged file
            raise ValueError(f"{file} is not a whole safetensors file ({e}): copy it "
                             f"again") from None
        with opened as f:
            for name in f.keys():
                yield file, name, f


def checked_parameter_name(file, hf_name: str, f, shapes: dict, config: ModelConfig,
                           vocab_rows: int | None = None):
    """Our name of a checkpoint tensor after checking it belongs to the model with the expected
    shape (`vocab_rows`: the checkpoint's vocabulary rows when the model has more); None for a
    tensor to skip."""
    if hf_name.endswith("rotary_emb.inv_freq"):  # a buffer some old exports carry: recomputed here
        return None
    name = hf_name.removeprefix("model.")
    if name not in shapes:
        raise ValueError(f"{file}: tensor {hf_name} is not a parameter of {config.architecture} "
                         f"with this config.json (tie_word_embeddings={config.tie_embeddings})")
    expected = tuple(shapes[name])
    if vocab_rows is not None and name in ("embed_tokens.weight", "lm_head.weight"):
        expected = (vocab_rows,) + expected[1:]
    shape = tuple(f.get_slice(hf_name).get_shape())
    if shape != expected:
        raise ValueError(f"{file}: tensor {hf_name} has shape {shape}, config.json implies "
                         f"{expected}")
    return name


def check_all_loaded(path, params, loaded):
    missing = sorted(set(params) - loaded)
    if missing:
        raise ValueError(f"{path}: the checkpoint lacks {len(missing)} tensors, e.g. {missing[:3]}")

