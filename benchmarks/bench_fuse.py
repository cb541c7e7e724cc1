"""End to end: a small transformer as built by transformers vs the same model after nnfast.fuse.

Inference (a forward under no_grad) and a training step (forward, loss, backward, AdamW step),
both models from the same weights, providers interleaved round by round in one process (medians).

    python benchmarks/bench_fuse.py [--models llama,bert] [--batch 4] [--seq 128]
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # noqa: E402

import nnfast  # noqa: E402


def build(name: str):
    import transformers

    if name == "llama":
        cfg = transformers.LlamaConfig(
            vocab_size=1000,
            hidden_size=512,
            intermediate_size=1376,
            num_hidden_layers=2,
            num_attention_heads=8,
            num_key_value_heads=8,
            max_position_embeddings=512,
        )
        return transformers.LlamaForCausalLM(cfg), "512 hidden, 1376 ffn (swiglu), 2 layers"
    cfg = transformers.BertConfig(
        vocab_size=1000,
        hidden_size=512,
        intermediate_size=2048,
        num_hidden_layers=2,
        num_attention_heads=8,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return transformers.BertForMaskedLM(cfg), "512 hidden, 2048 ffn (gelu), 2 layers"


def main(argv=None) -> list[harness.Row]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="llama,bert")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--min-run-time", type=float, default=1.0)
    p.add_argument("--device", default=harness.default_device())
    p.add_argument("--out-dir", type=Path, default=harness.RESULTS)
    opt = p.parse_args(argv)
    rows: list[harness.Row] = []
    print(f"# bench_fuse on {harness.machine_line()}", flush=True)
    for name in opt.models.split(","):
        torch.manual_seed(0)
        plain, desc = build(name)
        plain = plain.to(opt.device)
        fused = nnfast.fuse(copy.deepcopy(plain))
        print(f"\n{name}: {desc}; {nnfast.fuse_report(fused).__str__().splitlines()[0]}")
        ids = torch.randint(0, 1000, (opt.batch, opt.seq), device=opt.device)
        opts = {m: torch.optim.AdamW(m.parameters(), lr=1e-4) for m in (plain, fused)}

        def infer(m, ids=ids):
            def run():
                with torch.no_grad():
                    return m(input_ids=ids).logits

            return run

        def train(m, ids=ids, opt_of=opts):
            opt = opt_of[m]

            def run():
                loss = m(input_ids=ids, labels=ids).loss
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()

            return run

        for mode, make in (("inference", infer), ("train step", train)):
            for m in (plain, fused):
                m.train(mode != "inference")
            runs = {"transformers": make(plain), "nnfast.fuse": make(fused)}
            timings = harness.time_interleaved(runs, opt.device, opt.min_run_time)
            for provider, t in timings.items():
                rows.append(
                    harness.Row(
                        "fuse",
                        provider,
                        mode,
                        f"{name} {opt.batch}x{opt.seq}",
                        "fp32",
                        name,
                        t.median_ms,
                        t.spread_ms,
                        0.0,
                        "-",
                    )
                )
    print("\n| model (batch x seq) | mode | transformers ms | nnfast.fuse ms | fused / plain |")
    print("|---|---|---|---|---|")
    by = {}
    for r in rows:
        by.setdefault((r.shape, r.mode), {})[r.provider] = r
    for (shape, mode), d in by.items():
        a, b = d["transformers"], d["nnfast.fuse"]
        print(
            f"| {shape} | {mode} | {a.median_ms:.2f} ± {a.spread_ms:.2f} |"
            f" {b.median_ms:.2f} ± {b.spread_ms:.2f} | {b.median_ms / a.median_ms:.2f}x |"
        )
    harness.write_csv(rows, "bench_fuse", opt.out_dir)
    print("\nnnfast-auto decisions:\n" + nnfast.dispatch_report())
    return rows


if __name__ == "__main__":
    main()
