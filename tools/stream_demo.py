#!/usr/bin/env python3
"""Stream video from the shipped sprite model in four attention settings and compare them.

Each setting continues the same ground-truth clips (``--prime-chunks`` given chunks: the neutral sink and the
colour cue) for ``--frames`` frames: dense full history, sink + window only, window + linear memory, and window +
memory + top-k block-sparse attention. The cue colour returns after a blackout longer than the window, so only
settings that remember evicted chunks can render it. Writes to ``--out``:

- ``stream.gif`` (and ``stream.mp4`` when PyAV is installed): ground truth and the four settings side by side;
- ``stream_demo.png``: per-chunk latency, memory and PSNR against the ground truth over the frames generated;
- ``summary.json`` / ``summary.md``: frames per second, memory and per-phase PSNR of each setting.

On CUDA the memory curve is the peak allocated memory of each chunk step (``torch.cuda.max_memory_allocated``);
on CPU it is the attention state in use (filled cache slots + memory), which grows with the stream for dense
attention (its cache is preallocated for the whole stream) and stays flat for the windowed settings.

    python tools/stream_demo.py --frames 120
"""
import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
from visionmix.adapters.streaming import StreamingGenerator  # noqa: E402
from visionmix.adapters.streaming.recipes import SETTINGS, load_stream_model, setting  # noqa: E402
from visionmix.data.sprites import SpriteRecallConfig, sprite_recall_events, sprite_recall_video  # noqa: E402

CHECKPOINT = REPO_ROOT / 'assets' / 'stream_sprites.pt'


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--checkpoint', type=Path, default=CHECKPOINT)
    p.add_argument('--frames', type=int, default=120, help='frames per stream (rounded up to whole chunks)')
    p.add_argument('--clips', type=int, default=8, help='ground-truth clips streamed together (the batch)')
    p.add_argument('--prime-chunks', type=int, default=2, help='ground-truth chunks the streams start from')
    p.add_argument('--settings', nargs='+', default=list(SETTINGS), choices=SETTINGS)
    p.add_argument('--out', type=Path, default=REPO_ROOT / 'runs' / 'stream_demo')
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--cuda-graph', action='store_true', help='replay steady chunk steps from a CUDA graph')
    p.add_argument('--seed', type=int, default=5_000_000, help='first clip seed (training draws seeds below 3e6)')
    p.add_argument('--threads', type=int, default=0)
    return p.parse_args(argv)


def stream(model, ckpt, name, prime, num_chunks, args):
    """Generate ``num_chunks`` chunks; returns frames [B, C, T, H, W] and per-chunk latency (s) and memory (bytes)."""
    device = torch.device(args.device)
    layout, config = setting(name, model, ckpt['stream'], num_chunks)
    batch, f = prime.shape[0], model.frames_per_chunk
    state = model.new_state(layout, config, batch, device)
    gen = StreamingGenerator(model.forward_chunk, state, (batch, model.in_chans, f, *prime.shape[3:]), device=device)
    rng = torch.Generator(device).manual_seed(args.seed)
    chunks, latency, memory = [], [], []
    bar = tqdm(total=num_chunks, desc=f"{name:>22}", unit='chunk', dynamic_ncols=True)
    it = gen.generate(num_chunks, prime=prime, generator=rng, use_cuda_graph=args.cuda_graph)
    while True:
        if device.type == 'cuda':
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        chunk = next(it, None)
        if chunk is None:
            break
        if device.type == 'cuda':
            torch.cuda.synchronize()
        latency.append(time.perf_counter() - start)
        memory.append(torch.cuda.max_memory_allocated() if device.type == 'cuda' else state.live_nbytes())
        chunks.append(chunk.float().cpu())
        bar.update(1)
        bar.set_postfix(fps=f"{batch * f / latency[-1]:.0f}")
    bar.close()
    return torch.cat(chunks, 2), latency, memory


def psnr_per_frame(video, target):
    """PSNR (dB) of each frame, averaged over the batch, for videos in [-1, 1]."""
    mse = ((video.clamp(-1, 1) - target) / 2).square().mean(dim=(1, 3, 4))  # [B, T]
    return (10 * torch.log10(1 / mse.clamp_min(1e-10))).mean(0)


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.checkpoint.exists():
        raise SystemExit(f"checkpoint {args.checkpoint} not found (train one with tools/train_stream.py)")
    model, ckpt = load_stream_model(args.checkpoint, args.device)
    data = SpriteRecallConfig(**ckpt['data'])
    f = model.frames_per_chunk
    num_chunks = -(-args.frames // f)
    if num_chunks <= args.prime_chunks:
        raise SystemExit(f"--frames must cover more than --prime-chunks ({args.prime_chunks}) chunks of {f} frames")
    frames = num_chunks * f
    truth = torch.stack([sprite_recall_video(frames, args.seed + i, data) for i in range(args.clips)])
    prime = truth[:, :, :args.prime_chunks * f]
    events = sprite_recall_events(data, frames)
    args.out.mkdir(parents=True, exist_ok=True)
    results, videos = {}, {}
    for name in args.settings:
        video, latency, memory = stream(model, ckpt, name, prime, num_chunks, args)
        psnr = psnr_per_frame(video, truth)
        warm = latency[args.prime_chunks + 2:] or latency
        phase = {k: float(psnr[list(r)].mean()) for k, r in events.items() if len(r) and min(r) >= prime.shape[2]}
        generated = list(range(prime.shape[2], frames))
        results[name] = dict(latency_s=latency, memory_bytes=memory, psnr=psnr.tolist(), psnr_by_phase=phase,
                             psnr_generated=float(psnr[generated].mean()),
                             fps=args.clips * f / statistics.median(warm), first_memory=memory[0],
                             last_memory=memory[-1])
        videos[name] = video
    device = torch.cuda.get_device_name() if args.device.startswith('cuda') else f"CPU ({os.cpu_count()} cores)"
    summary = dict(device=device, checkpoint=str(args.checkpoint.relative_to(REPO_ROOT)
                                                 if args.checkpoint.is_relative_to(REPO_ROOT) else args.checkpoint),
                   frames=frames, clips=args.clips, prime_frames=prime.shape[2],
                   events={k: [r.start, r.stop] for k, r in events.items()}, settings=results)
    (args.out / 'summary.json').write_text(json.dumps(summary, indent=1))
    write_markdown(summary, args.out / 'summary.md')
    plot(summary, args.out / 'stream_demo.png', on_cuda=args.device.startswith('cuda'))
    write_video(truth[0], {k: v[0] for k, v in videos.items()}, args.out)
    print((args.out / 'summary.md').read_text())
    print(f"wrote {args.out}/stream.gif, stream_demo.png, summary.json")
    if 'window' in results and 'window+memory' in results:
        gain = results['window+memory']['psnr_by_phase'].get('recall', 0) - results['window']['psnr_by_phase'].get(
            'recall', 0)
        print(f"memory vs window-only on the recall frames: {gain:+.2f} dB")


def write_markdown(summary, path: Path) -> None:
    base = summary['settings'].get('dense', {}).get('fps')
    lines = [f"Streaming {summary['frames']} frames x {summary['clips']} clips on {summary['device']} "
             f"({summary['prime_frames']} ground-truth frames first).", '',
             '| setting | frames/s | vs dense | state/peak memory first -> last chunk | PSNR generated | PSNR blackout '
             '| PSNR recall |', '|---|---|---|---|---|---|---|']
    for name, r in summary['settings'].items():
        ratio = f"{r['fps'] / base:.2f}x" if base else '-'
        ph = r['psnr_by_phase']
        lines.append(f"| {name} | {r['fps']:.0f} | {ratio} | {r['first_memory'] / 2 ** 20:.2f} -> "
                     f"{r['last_memory'] / 2 ** 20:.2f} MiB | {r['psnr_generated']:.2f} | "
                     f"{ph.get('blackout', float('nan')):.2f} | {ph.get('recall', float('nan')):.2f} |")
    path.write_text('\n'.join(lines) + '\n')


def plot(summary, path: Path, on_cuda: bool) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.2))
    f = summary['frames'] // len(next(iter(summary['settings'].values()))['latency_s'])
    for name, r in summary['settings'].items():
        x = [(i + 1) * f for i in range(len(r['latency_s']))]
        axes[0].plot(x, [1000 * t for t in r['latency_s']], label=name)
        axes[1].plot(x, [m / 2 ** 20 for m in r['memory_bytes']], label=name)
        start = summary['prime_frames']  # the given frames are the ground truth itself
        axes[2].plot(range(start, len(r['psnr'])), r['psnr'][start:], label=name)
    colours = dict(sink='0.85', cue='tab:orange', blackout='0.4', recall='tab:green')
    for i, (key, (a, b)) in enumerate(summary['events'].items()):
        if b > a:
            axes[2].axvspan(a - 0.5, b - 0.5, color=colours.get(key, '0.9'), alpha=0.12, lw=0)
            axes[2].text(a, 0.98 - 0.06 * (i % 3), key, transform=axes[2].get_xaxis_transform(), fontsize=8,
                         va='top')
    axes[2].axvline(summary['prime_frames'] - 0.5, color='k', ls=':', lw=1)
    axes[2].set_xlim(0, summary['frames'])
    axes[0].set(xlabel='frames generated', ylabel='ms per chunk', title=f"latency ({summary['device']})")
    axes[1].set(xlabel='frames generated', ylabel='MiB',
                title='peak memory per chunk' if on_cuda else 'attention state in use (cache + memory)')
    axes[2].set(xlabel='frame (dotted: end of the given frames)', ylabel='PSNR vs ground truth (dB)',
                title='quality over time')
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[2].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_video(truth, videos, out: Path, scale: int = 6) -> None:
    from PIL import Image, ImageDraw
    panels = [('ground truth', truth)] + list(videos.items())
    frames = []
    for t in range(truth.shape[1]):
        tiles = []
        for label, video in panels:
            img = ((video[:, t].clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
            tile = Image.fromarray(img).resize((img.shape[1] * scale, img.shape[0] * scale), Image.NEAREST)
            canvas = Image.new('RGB', (tile.width, tile.height + 14), 'white')
            canvas.paste(tile, (0, 14))
            ImageDraw.Draw(canvas).text((2, 1), label, fill='black')
            tiles.append(canvas)
        sheet = Image.new('RGB', (sum(t.width + 4 for t in tiles), tiles[0].height), 'white')
        x = 0
        for tile in tiles:
            sheet.paste(tile, (x, 0))
            x += tile.width + 4
        ImageDraw.Draw(sheet).text((sheet.width - 40, 1), f"t={t}", fill='black')
        frames.append(sheet)
    frames[0].save(out / 'stream.gif', save_all=True, append_images=frames[1:], duration=120, loop=0)
    try:
        import av
    except ImportError:
        return
    with av.open(str(out / 'stream.mp4'), 'w') as container:
        s = container.add_stream('libx264', rate=8)
        s.width, s.height, s.pix_fmt = frames[0].width // 2 * 2, frames[0].height // 2 * 2, 'yuv420p'
        for frame in frames:
            for packet in s.encode(av.VideoFrame.from_image(frame.crop((0, 0, s.width, s.height)))):
                container.mux(packet)
        for packet in s.encode():
            container.mux(packet)


if __name__ == '__main__':
    main()
