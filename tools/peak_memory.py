#!/usr/bin/env python3
"""Peak memory of one forward+backward of a registered model, per visionmix backend, side by side.

On CUDA it is ``torch.cuda.max_memory_allocated``. Elsewhere it is the peak of the bytes held by live tensors
created during the step, tracked op by op. With ``TRITON_INTERPRET=1`` the Triton kernels run in the
interpreter; its own host copies are not tensors of the step and are not counted, so what is counted is what
the kernels' launchers allocate (outputs, softmax statistics, index tables): the tensors a GPU run allocates::

    TRITON_INTERPRET=1 python tools/peak_memory.py biformer_tiny --img-size 512 1024 --backends torch triton

Writes a json next to the printed markdown table (``--out``).
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import timm  # noqa: E402
import torch  # noqa: E402
from torch.multiprocessing.reductions import StorageWeakRef  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_leaves  # noqa: E402
from tqdm import tqdm  # noqa: E402

import visionmix  # noqa: E402,F401


def _step(model, x):
    model(x).float().sum().backward()


def peak_bytes(model, x) -> int:
    """Peak bytes allocated by PyTorch during one forward+backward, beyond what was allocated before it."""
    if x.is_cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        _step(model, x)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    tracker = LiveTensorBytes()
    with tracker:
        _step(model, x)
    return tracker.peak


class LiveTensorBytes(TorchDispatchMode):
    """Peak bytes of tensor storages created inside the mode and still alive, op by op (device-agnostic).

    Storages a custom op allocates and frees internally are not seen; its outputs are.
    """

    def __init__(self):
        super().__init__()
        self.live = {}
        self.current = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for key in [key for key, (ref, _) in self.live.items() if ref.expired()]:
            self.current -= self.live.pop(key)[1]
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type != 'meta':
                storage = t.untyped_storage()
                key = (storage.device.type, storage.data_ptr())
                if key not in self.live and storage.nbytes():
                    self.live[key] = (StorageWeakRef(storage), storage.nbytes())
                    self.current += storage.nbytes()
        self.peak = max(self.peak, self.current)
        return out


def measure(name: str, img_size: int, backend: str, batch: int, device: str) -> dict:
    os.environ['VISIONMIX_BACKEND'] = backend
    torch.manual_seed(0)
    model = timm.create_model(name).to(device).train()  # models that take any input size
    x = torch.randn(batch, 3, img_size, img_size, device=device)
    start = time.perf_counter()
    peak = peak_bytes(model, x)
    return dict(model=name, img_size=img_size, backend=backend, batch=batch, device=device,
                peak_mib=peak / 2 ** 20, seconds=time.perf_counter() - start)


def main(argv=None) -> list:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('model')
    parser.add_argument('--img-size', type=int, nargs='+', default=[224])
    parser.add_argument('--backends', nargs='+', default=['torch', 'triton'], choices=['torch', 'triton'])
    parser.add_argument('--batch', type=int, default=1)
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--out', type=Path, default=None, help='json file for the rows')
    args = parser.parse_args(argv)
    rows = []
    jobs = [(s, b) for s in args.img_size for b in args.backends]
    for size, backend in tqdm(jobs, desc=f'{args.model} peak memory', unit='run', file=sys.stderr):
        rows.append(measure(args.model, size, backend, args.batch, args.device))
        tqdm.write(f"{args.model} {size} px {backend}: {rows[-1]['peak_mib']:,.0f} MiB", file=sys.stderr)
    print(f'| model | input | backend | peak MiB (fwd+bwd, batch {args.batch}, {args.device}) |')
    print('|:--|--:|:--|--:|')
    for r in rows:
        print(f"| `{r['model']}` | {r['img_size']} | {r['backend']} | {r['peak_mib']:,.0f} |")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(dict(rows=rows, torch=torch.__version__, argv=sys.argv), indent=2))
    return rows


if __name__ == '__main__':
    main()
