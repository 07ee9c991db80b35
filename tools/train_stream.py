#!/usr/bin/env python3
"""Train the small streaming video model on procedural sprite-recall clips, in two phases (Hybrid Forcing's
decoupled schedule, https://arxiv.org/abs/2604.10103, with flow matching in place of distillation):

- phase A: dense softmax attention, half the batches over a sink + short window, half over the full history;
- phase B: the linear memory and top-k block-sparse attention switched on; clips longer than the window so chunks
  are evicted and the memory is read (and trained) at the recall event; a share of batches takes its history from
  the model's own few-step rollout (no gradient) instead of the ground truth.

Every chunk is trained against the clean history the stream would have cached (``StreamingVideoDiT.forward_clip``),
at noise levels drawn mostly from the sampler's own few levels.

    python tools/train_stream.py --out assets/stream_sprites.pt
"""
import argparse
import math
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from visionmix.adapters.streaming import StreamingGenerator, StreamingVideoDiT, shifted_sigmas
from visionmix.adapters.streaming.recipes import load_stream_model, save_stream_model, setting
from visionmix.data.sprites import SpriteRecallConfig, sprite_recall_video


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--out', type=Path, required=True, help='checkpoint path (a loss plot is written beside it)')
    p.add_argument('--steps-a', type=int, default=1000)
    p.add_argument('--steps-b', type=int, default=1200)
    p.add_argument('--batch-size', type=int, default=6)
    p.add_argument('--clip-chunks', type=int, default=10, help='chunks per training clip (must exceed the window)')
    p.add_argument('--lr', type=float, default=2e-3)
    p.add_argument('--warmup-steps', type=int, default=100)
    p.add_argument('--rollout-prob', type=float, default=0.2, help='phase B share of self-rollout histories')
    p.add_argument('--embed-dim', type=int, default=64)
    p.add_argument('--depth', type=int, default=4)
    p.add_argument('--num-heads', type=int, default=4)
    p.add_argument('--sink-chunks', type=int, default=1)
    p.add_argument('--window-chunks', type=int, default=2)
    p.add_argument('--rope-frame-cap', type=int, default=9)
    p.add_argument('--sparsity-ratio', type=float, default=0.5)
    p.add_argument('--block-size', type=int, default=12)
    p.add_argument('--feature-map', default='elu1', choices=('relu', 'elu1'))
    p.add_argument('--init', type=Path, default=None,
                   help='continue from a checkpoint of this script (its model and stream options are kept)')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--threads', type=int, default=0, help='torch CPU threads (0: leave the default)')
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    return p.parse_args(argv)


def batch_of_clips(step: int, args, data: SpriteRecallConfig, device) -> torch.Tensor:
    frames = args.clip_chunks * data.frames_per_chunk
    seeds = [args.seed * 1_000_003 + step * args.batch_size + i for i in range(args.batch_size)]
    return torch.stack([sprite_recall_video(frames, s, data) for s in seeds]).to(device)


def sample_sigmas(shape, levels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Mostly the sampler's own levels (plus clean-ish 0.02), sometimes uniform in (0, 1)."""
    table = torch.cat([levels, torch.tensor([0.02])])
    pick = table[torch.randint(len(table), shape, generator=generator)]
    uniform = torch.rand(shape, generator=generator).clamp_min(1e-3)
    return torch.where(torch.rand(shape, generator=generator) < 0.75, pick, uniform)


@torch.no_grad()
def rollout_history(model, clips, stream, prime_chunks: int, generator) -> torch.Tensor:
    """The model's own stream continuing the first ``prime_chunks`` chunks of ``clips`` (window + memory)."""
    f = model.frames_per_chunk
    n = clips.shape[2] // f
    layout, config = setting('window+memory', model, stream, n)
    state = model.new_state(layout, config, clips.shape[0], clips.device)
    gen = StreamingGenerator(model.forward_chunk, state, (clips.shape[0], 3, f, *clips.shape[3:]), device=clips.device)
    chunks = list(gen.generate(n, prime=clips[:, :, :prime_chunks * f], generator=generator))
    return torch.cat(chunks, 2)


def lr_at(step: int, total: int, args) -> float:
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    return args.lr * 0.5 * (1 + math.cos(math.pi * (step - args.warmup_steps) / max(1, total - args.warmup_steps)))


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.clip_chunks <= args.sink_chunks + args.window_chunks + 1:
        raise SystemExit(f"--clip-chunks must exceed sink + window + 1 = {args.sink_chunks + args.window_chunks + 1} "
                         f"so chunks are evicted during training, got {args.clip_chunks}")
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    device = torch.device(args.device)
    data = SpriteRecallConfig()
    model_args = dict(in_chans=3, frame_size=data.size, patch_size=4, embed_dim=args.embed_dim, depth=args.depth,
                      num_heads=args.num_heads, frames_per_chunk=data.frames_per_chunk)
    stream = dict(sink_chunks=args.sink_chunks, window_chunks=args.window_chunks, rope_frame_cap=args.rope_frame_cap,
                  sparsity_ratio=args.sparsity_ratio, block_size=args.block_size, feature_map=args.feature_map)
    earlier = None
    if args.init is not None:
        model, ckpt = load_stream_model(args.init)
        model_args, stream, earlier = ckpt['model_args'], ckpt['stream'], ckpt['history']
        model.train()
    else:
        model = StreamingVideoDiT(**model_args)
    model = model.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.99))
    levels = shifted_sigmas()
    total = args.steps_a + args.steps_b
    history = dict(step=[], loss=[], phase=[], setting=[])
    start = time.time()
    bar = tqdm(range(total), desc='train', dynamic_ncols=True)
    for step in bar:
        phase = 'A' if step < args.steps_a else 'B'
        if phase == 'A':
            name = rng.choices(['window', 'dense'], weights=[2, 1])[0]
        else:
            name = rng.choices(['dense', 'window+memory', 'window+memory+sparse'], weights=[1, 3, 1])[0]
        clips = batch_of_clips(step, args, data, device)
        n = args.clip_chunks
        layout, config = setting(name, model, stream, n)
        history_clips = clips
        if phase == 'B' and name != 'dense' and rng.random() < args.rollout_prob:
            model.eval()
            history_clips = rollout_history(model, clips, stream, 2, gen)
            model.train()
        sigma = sample_sigmas((clips.shape[0], n), levels, gen).to(device)
        noise = torch.randn(clips.shape, generator=gen).to(device)
        s = sigma.repeat_interleave(data.frames_per_chunk, 1)[:, None, :, None, None]
        noisy = (1 - s) * clips + s * noise
        for group in opt.param_groups:
            group['lr'] = lr_at(step, total, args)
        velocity = model.forward_clip(history_clips, noisy, sigma, layout, config)
        loss = F.mse_loss(velocity, noise - clips)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        history['step'].append(step), history['loss'].append(loss.item())
        history['phase'].append(phase), history['setting'].append(name)
        bar.set_postfix(phase=phase, loss=f"{loss.item():.4f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    history['seconds'] = time.time() - start
    history['args'] = {k: str(v) for k, v in vars(args).items()}
    history['earlier'] = earlier
    save_stream_model(args.out, model.cpu(), model_args, stream, data.__dict__.copy(), history)
    plot_history(history, args.out.with_suffix('.png'))
    print(f"saved {args.out} ({args.out.stat().st_size / 2 ** 20:.2f} MiB) after {history['seconds'] / 60:.1f} min")


def plot_history(history, path: Path) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for name in sorted(set(history['setting'])):
        pts = [(s, v) for s, v, n in zip(history['step'], history['loss'], history['setting']) if n == name]
        xs, ys = zip(*pts)
        k = max(1, len(ys) // 50)
        smooth = [sum(ys[i:i + k]) / len(ys[i:i + k]) for i in range(0, len(ys), k)]
        ax.plot(xs[::k][:len(smooth)], smooth, label=name)
    ax.set_yscale('log'), ax.set_xlabel('step'), ax.set_ylabel('flow-matching loss'), ax.legend()
    ax.set_title('phase A: dense windowed / full; phase B: + memory, sparsity, rollouts')
    fig.tight_layout(), fig.savefig(path, dpi=120), plt.close(fig)


if __name__ == '__main__':
    main()
