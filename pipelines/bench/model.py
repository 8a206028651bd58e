"""``instalign bench model``: training-step throughput, peak memory and latency of InstAlign.

Measures, for a preset or YAML config (default ``paper``) at its image size:

* the **training step** (forward under the run's precision, the real criterion of
  ``instalign.losses`` with matching, backward, AdamW step over the engine's parameter
  groups) on random synthetic batches — images/s and seconds per step (median of
  ``--steps`` after ``--warmup``), eager and/or ``torch.compile``;
* **peak memory** of the training step (CUDA: ``max_memory_allocated``; CPU: the
  process's peak RSS, which includes everything the process ever held);
* **single-image forward latency** (eval mode, no grad, batch 1; median).

On CPU the row also carries ``step_cpu_s`` (process CPU seconds per step), which stays
meaningful when other jobs share the cores and inflate the wall-clock numbers.

bf16 autocast on CUDA (``train.precision=auto``), fp32 on CPU. Weights are random:
they do not change the speed, so the benchmark never needs the hub — except for the
text encoder's *architecture*: when ``roberta-base``'s config is not cached offline,
transformers' ``RobertaConfig()`` defaults (which are roberta-base's architecture) are
used and the row says so. Prints one JSON object per mode and a markdown table.

Examples::

    instalign bench model --batch-size 32                       # GPU: paper preset, eager + compile
    instalign bench model --config tiny --batch-size 8          # CPU-friendly
    instalign bench model --batch-size 1 --steps 3 model.num_queries=50
    instalign bench model --deform-memory                       # saved bytes of deformable attention (CPU)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import statistics
import sys
import tempfile
import time
from typing import Any

import torch
from transformers import RobertaConfig

from instalign.config import TextEncoderConfig, load_config
from instalign.data.batch import Batch
from instalign.engine import autocast, resolve_precision
from instalign.errors import USAGE
from instalign.losses import build_criterion
from instalign.modeling import TextEncoderLoadError, build_model, ms_deform_attn_memory
from instalign.optim import build_optimizer
from pipelines.bench.command import BenchError
from pipelines.core import flags
from pipelines.core.output_dirs import check_report_path
def add_arguments(parser: argparse.ArgumentParser) -> None:
    flags.add_config(parser, default="paper")
    flags.add_overrides(parser)
    parser.add_argument("--batch-size", type=int, default=32, help="training batch size [32]")
    parser.add_argument("--steps", type=int, default=10, help="timed training steps per mode [10]")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation happens here) [3]")
    parser.add_argument("--latency-iters", type=int, default=10, help="timed single-image forwards [10]")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N [auto]")
    parser.add_argument("--compile", choices=["auto", "off", "only", "both"], default="auto",
                        help="eager and/or torch.compile; auto = both on CUDA, eager only on CPU [auto]")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    parser.add_argument("--deform-memory", type=int, nargs="?", const=1, default=None, metavar="BATCH",
                        help="instead: saved-activation bytes of one pixel-decoder deformable attention call "
                             "(reference vs lean), counted on CPU at the config's sizes, batch BATCH [1]")


def synthetic_batch(*, batch_size: int, image_size: int, max_tokens: int, vocab_size: int, seed: int) -> Batch:
    """Random images, token ids and 0–3 rectangular instances per sample (0 = no target)."""
    g = torch.Generator().manual_seed(seed)
    s = image_size
    lengths = torch.randint(3, max_tokens + 1, (batch_size,), generator=g)
    attention_mask = (torch.arange(max_tokens)[None] < lengths[:, None]).long()
    input_ids = torch.randint(5, vocab_size, (batch_size, max_tokens), generator=g) * attention_mask
    masks = []
    for _ in range(batch_size):
        m = int(torch.randint(0, 4, (1,), generator=g))
        inst = torch.zeros(m, s, s, dtype=torch.bool)
        for j in range(m):
            y0, x0 = (int(v) for v in torch.randint(0, s // 2, (2,), generator=g))
            h, w = (int(v) for v in torch.randint(s // 8, s // 2, (2,), generator=g))
            inst[j, y0:y0 + h, x0:x0 + w] = True
        masks.append(inst)
    union = torch.stack([m.any(0) if len(m) else torch.zeros(s, s, dtype=torch.bool) for m in masks])
    return Batch(images=torch.randn(batch_size, 3, s, s, generator=g), input_ids=input_ids,
                 attention_mask=attention_mask, instance_masks=masks, union_masks=union,
                 no_target=torch.tensor([len(m) == 0 for m in masks]),
                 sample_ids=[f"synthetic:{i}" for i in range(batch_size)])


def build_bench_model(model_cfg) -> tuple[Any, str]:
    # random weights: speed does not depend on them, and no download is needed
    model_cfg = dataclasses.replace(
        model_cfg,
        backbone=dataclasses.replace(model_cfg.backbone, pretrained=False),
        text_encoder=dataclasses.replace(model_cfg.text_encoder, pretrained=False),
    )
    try:
        return build_model(model_cfg), model_cfg.text_encoder.name
    except TextEncoderLoadError:
        if model_cfg.text_encoder.name != "roberta-base":
            raise
    local = tempfile.mkdtemp(prefix="bench-roberta-base-")
    RobertaConfig().save_pretrained(local)  # the defaults are roberta-base's architecture
    text = TextEncoderConfig(name=local, pretrained=False, config_overrides=model_cfg.text_encoder.config_overrides,
                             max_tokens=model_cfg.text_encoder.max_tokens)
    print("note: roberta-base config not cached offline; using RobertaConfig() defaults (its architecture)",
          file=sys.stderr)
    return build_model(dataclasses.replace(model_cfg, text_encoder=text)), "roberta-base (architecture only)"


def sync_device(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


def measure(args: argparse.Namespace, cfg, mode: str) -> dict[str, Any]:
    device = torch.device(args.device)
    precision = resolve_precision(cfg.train.precision, device)
    torch.manual_seed(args.seed)
    model, text_name = build_bench_model(cfg.model)
    model = model.to(device).train()
    vocab = int(model.text_encoder.encoder.config.vocab_size)
    n_params = sum(p.numel() for p in model.parameters())
    # No prepared split to balance an ``auto`` weight on; a number costs the same step time.
    criterion = build_criterion(dataclasses.replace(cfg.loss, nt_pos_weight=1.0)
                                if cfg.loss.nt_pos_weight == "auto" else cfg.loss)
    optimizer = build_optimizer(model, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay,
                                backbone_lr_mult=cfg.train.backbone_lr_mult,
                                text_encoder_lr_mult=cfg.train.text_encoder_lr_mult)
    runner = torch.compile(model) if mode == "compile" else model
    batches = [synthetic_batch(batch_size=args.batch_size, image_size=cfg.model.image_size,
                               max_tokens=cfg.model.text_encoder.max_tokens, vocab_size=vocab,
                               seed=args.seed + i).to(device) for i in range(2)]

    def step(batch: Batch) -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast(device, precision):
            outputs = runner(batch.images, batch.input_ids, batch.attention_mask)
        criterion(outputs, batch)["loss"].backward()
        optimizer.step()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for i in range(args.warmup):
        step(batches[i % 2])
    sync_device(device)
    warmup_s = time.perf_counter() - start
    times, cpu_times = [], []
    for i in range(args.steps):
        t0, c0 = time.perf_counter(), time.process_time()
        step(batches[i % 2])
        sync_device(device)
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
    peak = peak_bytes(device)

    runner.eval()
    one = batches[0]
    lat = []
    with torch.no_grad(), autocast(device, precision):
        for i in range(args.latency_iters + 2):
            t0 = time.perf_counter()
            runner(one.images[:1], one.input_ids[:1], one.attention_mask[:1])
            sync_device(device)
            if i >= 2:  # two warm-up forwards (compile for batch 1 happens here)
                lat.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    return {
        "config": str(args.config), "overrides": list(args.overrides), "text_encoder": text_name,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
        "precision": precision, "mode": mode, "image_size": cfg.model.image_size, "batch_size": args.batch_size,
        "params_M": round(n_params / 1e6, 2), "step_s": round(step_s, 4),
        # process CPU seconds per step: on a shared CPU machine this is steadier than wall time
        "step_cpu_s": round(statistics.median(cpu_times), 3),
        "images_per_s": round(args.batch_size / step_s, 2), "warmup_s": round(warmup_s, 2),
        "peak_mem_GiB": round(peak / 2**30, 2), "peak_mem_kind": "cuda_allocated" if device.type == "cuda" else "process_rss",
        "latency_ms_b1": round(1e3 * statistics.median(lat), 1) if lat else None,
    }


def markdown(rows: list[dict[str, Any]]) -> str:
    cols = ["config", "device", "precision", "mode", "image_size", "batch_size", "params_M", "step_s", "step_cpu_s",
            "images_per_s", "peak_mem_GiB", "latency_ms_b1"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def deform_memory(args: argparse.Namespace) -> int:
    """``--deform-memory``: what autograd saves for one deformable attention call, per implementation.

    Saved bytes do not depend on the device, so they are counted on CPU with saved-tensor
    hooks (``instalign.modeling.ms_deform_attn_memory``); the figures go to docs/performance.md.
    """
    if args.deform_memory < 1:
        raise BenchError("model: --deform-memory BATCH must be >= 1", exit_code=USAGE)
    cfg = load_config(args.config, args.overrides)
    pd = cfg.model.pixel_decoder
    rows = ms_deform_attn_memory.measure(batch=args.deform_memory, image_size=cfg.model.image_size,
                                         dim=cfg.model.hidden_dim, heads=pd.num_heads, points=pd.num_points,
                                         seed=args.seed)
    for row in rows:
        print(json.dumps(row), flush=True)
    print(ms_deform_attn_memory.markdown(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


def run(args: argparse.Namespace) -> int:
    check_report_path(args.json)  # before minutes of measuring: never a file this project did not write
    if args.deform_memory is not None:
        return deform_memory(args)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.batch_size < 1 or args.steps < 1 or args.warmup < 0 or args.latency_iters < 0:
        raise BenchError("model: --batch-size and --steps must be >= 1, --warmup/--latency-iters >= 0", exit_code=USAGE)
    cfg = load_config(args.config, args.overrides)
    choice = args.compile
    if choice == "auto":
        choice = "both" if args.device.startswith("cuda") else "off"
    modes = {"off": ["eager"], "only": ["compile"], "both": ["eager", "compile"]}[choice]
    rows = []
    for mode in modes:
        row = measure(args, cfg, mode)
        print(json.dumps(row), flush=True)
        rows.append(row)
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
    print(markdown(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    p = argparse.ArgumentParser(prog="instalign bench model")
    add_arguments(p)
    sys.exit(run(p.parse_args()))
