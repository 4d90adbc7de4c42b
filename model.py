"""The LLaMA family (Llama-2, Llama-3, Mistral, Qwen2) in plain PyTorch, and C-RLFT's weighted loss,
plain and fused.

Read top to bottom:
  1. ModelConfig and its named presets; the default device and dtype.
  2. The blocks: RMSNorm, RoPE, attention (packed stream, padded batch, KV cache), SwiGLU MLP.
  3. Transformer: one forward for the three uses (training on packed streams, a padded batch,
     decoding).
  4. The weighted loss Σ w·CE (METHOD.md §3): written plainly, then fused, never materialising the
     [N, V] logits. The method's second hop.

Parameter names are those of Hugging Face's LlamaForCausalLM without the "model." prefix, so that
reading a checkpoint is a copy by name (infra/hf.py reads and writes the files). This file runs on
one device and opens no file; parallelism is applied from outside (train.py).
"""

import inspect
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

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
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"architecture {self.architecture!r} is not one of "
                             f"{sorted(ARCHITECTURES)}")
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


# The architectures implemented, as config.json names them.
ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
LLAMA3_ROPE = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
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
                         ffn_dim=14336, rope_theta=500000.0, rope_scaling=LLAMA3_ROPE,
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
    """Picks bf16 on a GPU; float32 on a CPU, where bf16 matmuls mostly run through a slow fallback.
    """
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
    """Computes the rotary frequencies θ^(-2i/d), with Llama-3.1's "llama3" rescaling of the long
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
    """Rotates the pairs (i, i + hd/2) of x [B, T, heads, hd] by cos, sin [B, T, hd] (HF's layout).
    """
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return x * cos[:, :, None] + rotated * sin[:, :, None]


def attention_mask(q_pos, k_pos, window: int | None):
    """Says which keys each query sees, bool [B, 1, T, S]: a query at q_pos sees a key at k_pos <=
    q_pos, inside the window."""
    d = q_pos[:, :, None] - k_pos[:, None, :]  # [B, T, S]
    visible = d >= 0
    if window is not None:
        visible &= d < window
    return visible[:, None]


def varlen_attention(q, k, v, cu_seqlens, max_seqlen: int, window: int | None):
    """Runs flash attention over a packed stream: q [N, nh, hd], k, v [N, nkv, hd] → [N, nh, hd],
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
    """Repeats each K/V head for its group of query heads (grouped-query attention by copying)
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
        """Runs SDPA: q [B, T, nh, hd], k, v [B, S, nkv, hd] → [B, T, nh, hd]. On CUDA, SDPA has no
        fused kernel for a mask with enable_gqa (torch 2.11-2.13: the math backend, fp32 [B, H, T,
        S] scores), so there the K/V heads are repeated instead; on CPU the fused kernel takes both.
        """
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
        """Draws random weights for training from scratch. A model built on the meta device has no
        values: call this after `to_empty(device=...)` (infra/hf.py's load_weights fills them
        instead)."""
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
        """Goes back to plain forward passes (a packed stream, training) after decoding with a
        cache."""
        for layer in self.layers:
            layer.self_attn.kv_cache = None

    def forward(self, tokens, positions=None, cu_seqlens=None, max_seqlen=None, targets=None,
                target_weights=None, supervised=None, loss="fused"):
        """Three uses of one forward:
        - padded batch: tokens [B, T], each row a sequence from position 0 → logits [B, T, V];
        - packed stream: tokens [N], positions [N] restarting at 0 for each conversation, cu_seqlens
          (int32 [S+1], the conversation boundaries), optionally max_seqlen → logits [N, V];
        - decoding after setup_kv_cache: tokens [B, T] at positions [B, T] → logits [B, T, V].
        With targets and target_weights (the shape of tokens), returns instead the weighted loss (Σ
        w·CE, and per token CE and [argmax = target], flat [N]): `loss` "fused" never materialises
        the [N, V] logits, "plain" computes the same from them (weighted_cross_entropy).
        `supervised`: the flat indices of the tokens with w ≠ 0, if known, which spares the fused
        loss a host sync."""
        x = self.hidden_states(tokens, positions, cu_seqlens, max_seqlen)
        if targets is None:
            return self.logits(x)
        x, targets, target_weights = x.flatten(0, -2), targets.flatten(), target_weights.flatten()
        # The output weight is read here, inside the forward of the module that owns it: under
        # FSDP2 it is then the gathered (unsharded) parameter, and autograd takes its gradient back.
        if loss == "plain":
            return weighted_cross_entropy(self.logits(x), targets, target_weights)
        return fused_weighted_cross_entropy(x, self.lm_head.weight, targets, target_weights,
                                            supervised, vocab_size=self.config.vocab_size)

    def logits(self, x):
        """Applies the output head to final hidden states: logits over the vocabulary, not its
        padding."""
        logits = self.lm_head(x)
        if self.config.padded_vocab_size == self.config.vocab_size:
            return logits
        return logits[..., :self.config.vocab_size]

    def hidden_states(self, tokens, positions=None, cu_seqlens=None, max_seqlen=None,
                      cache_rows=None):
        """Runs forward without the output head: the final normalised hidden states, [B, T, D] or
        [N, D], for callers that need a few positions' logits only (sample.py: each prompt's last).
        cache_rows [B]: the KV cache rows a batch of prompts is written into (default: the first B),
        so that prompts can join rows that are being decoded."""
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


# --------------------------------------------------------------------------------------------------
# 4. The weighted loss (METHOD.md §3): the numerator Σ_t w_t·CE_t; train.py divides it by the
# step's global Σ w (METHOD.md §4)


def weighted_cross_entropy(logits, targets, target_weights):
    """Computes Σ_t w_t·CE_t plainly, from the full logits [N, V], with each token's CE and [argmax
    = target] (0 where w = 0), in float32 (float64 for float64 logits); only the sum is
    differentiable. The formula and the outputs of the fused loss below, which computes them without
    ever holding the logits: what the tests hold it to, and train.py's --loss=plain."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    supervised = target_weights != 0
    ce = torch.where(supervised, F.cross_entropy(logits, targets, reduction="none"), 0)
    correct = (supervised & (logits.argmax(-1) == targets)).to(logits.dtype)
    return (target_weights.to(logits.dtype) * ce).sum(), ce.detach(), correct


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
    """Computes Σ w·CE of the logits hidden @ head.T without materialising them, and per token [N]
    its CE and [argmax = target] (0 where w = 0), all in float32 (float64 for float64 inputs).

    hidden [N, H] and head [V, H] share a dtype; targets [N] int; target_weights [N] ≥ 0, zero for
    every token that is not supervised (its target is never read). Only the sum is differentiable.
    supervised: the indices of the tokens with w ≠ 0 when the caller knows them (train.py does, from
    the data); finding them here is a host sync, as the number of chunks depends on it. vocab_size:
    the rows of head that are tokens, when the others pad it (ModelConfig.vocab_multiple)."""
    if hidden.dtype != head.dtype:
        raise TypeError(f"hidden states are {hidden.dtype} but the output head is {head.dtype}")
    if supervised is None:
        supervised = target_weights.nonzero().squeeze(1)
    need_grad = torch.is_grad_enabled() and (hidden.requires_grad or head.requires_grad)
    vocab_size = len(head) if vocab_size is None else vocab_size
    return FusedWeightedCrossEntropy.apply(hidden, head, targets, target_weights, supervised,
                                           need_grad, chunk_tokens, vocab_size)
