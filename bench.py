"""
Speed of model.py against transformers' GPT2LMHeadModel with identical weights, in one run:
forward tokens/s (no grad) and KV-cache sampling tokens/s (ours vs `generate`).

    python bench.py                      # the default scratch config and GPT-2 124M, on CPU
    python bench.py --configs=xl --device=cuda --dtype=bfloat16
"""
import sys
import time

import torch

from model import GPT, GPTConfig

# ----------------------------------------------------------------------------- config
configs = "scratch,124m"  # comma list from CONFIGS below
device = "cpu"
dtype = "float32"  # float32 | bfloat16 | float16
batch_size = 8
seq_len = 256  # forward benchmark length
prompt_len = 64  # sampling benchmark: prompt length and new tokens
new_tokens = 64
reps = 3  # timed repetitions (best is reported), after one warm-up

CONFIGS = {
    "scratch": GPTConfig(),  # model.py's default scratch model
    "124m": GPTConfig(block_size=1024, vocab_size=50257, n_layer=12, n_head=12, n_embd=768),
    "xl": GPTConfig(block_size=1024, vocab_size=50257, n_layer=48, n_head=25, n_embd=1600),
}
for arg in sys.argv[1:]:
    if arg in ("-h", "--help"):
        block = open(__file__).read().split("# " + "-" * 77)[1].removeprefix(" config").split("\nCONFIGS")[0]
        print(f"{__doc__.strip()}\n\noptions, each --key=value (the defaults):{block.rstrip()}")
        sys.exit(0)
    key, _, val = arg.removeprefix("--").partition("=")
    if key not in globals() or key.startswith("_") or key in ("CONFIGS", "sys", "time", "torch", "GPT", "GPTConfig"):
        sys.exit(f"error: unknown option {arg} (known: configs, device, dtype, batch_size, seq_len, prompt_len, new_tokens, reps)")
    globals()[key] = type(globals()[key])(val)


def best_time(fn):
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return min(times)


def twins(cfg):
    """Our GPT and a transformers GPT-2 with the same weights."""
    from transformers import GPT2Config, GPT2LMHeadModel
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=cfg.vocab_size, n_positions=cfg.block_size, n_embd=cfg.n_embd,
                                    n_layer=cfg.n_layer, n_head=cfg.n_head, bos_token_id=0, eos_token_id=0))
    ours = GPT(cfg)
    sd = ours.state_dict()
    with torch.no_grad():
        for k, v in hf.state_dict().items():
            if k in sd:
                v.copy_(sd[k].t() if k.endswith(GPT.TRANSPOSED) else sd[k])
    dt = getattr(torch, dtype)
    return ours.to(device, dt).eval(), hf.to(device, dt).eval()


if __name__ == "__main__":
    print(f"torch {torch.__version__}, device {device}, dtype {dtype}, threads {torch.get_num_threads()}")
    print("| config | params | forward ours tok/s | forward HF tok/s | ratio | sample ours tok/s | HF generate tok/s | ratio |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name in configs.split(","):
        if name not in CONFIGS:
            sys.exit(f"error: unknown config {name!r} (known: {', '.join(CONFIGS)})")
        torch.manual_seed(0)
        ours, hf = twins(CONFIGS[name])
        x = torch.randint(0, ours.config.vocab_size, (batch_size, seq_len), device=device)
        with torch.no_grad():
            f_ours = batch_size * seq_len / best_time(lambda: ours(x))
            f_hf = batch_size * seq_len / best_time(lambda: hf(x).logits)
        p = x[:, :prompt_len]
        g = torch.Generator(device=device)
        s_ours = batch_size * new_tokens / best_time(lambda: ours.generate(p.tolist(), new_tokens, generator=g))
        s_hf = batch_size * new_tokens / best_time(lambda: hf.generate(
            p, attention_mask=torch.ones_like(p), do_sample=True, top_k=0, max_new_tokens=new_tokens,
            min_new_tokens=new_tokens, pad_token_id=0))
        n = sum(q.numel() for q in ours.parameters()) / 1e6
        print(f"| {name} | {n:.1f}M | {f_ours:,.0f} | {f_hf:,.0f} | {f_ours / f_hf:.2f} "
              f"| {s_ours:,.0f} | {s_hf:,.0f} | {s_ours / s_hf:.2f} |", flush=True)
